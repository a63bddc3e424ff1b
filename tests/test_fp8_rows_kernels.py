"""The Triton kernels of `wan.model.fp8_rows` on the CPU, through Triton's interpreter: the fused LayerNorm,
modulation and row quantisation (`norm_quantize_rows`), and the GELU quantisation of the FFN's hidden.

The interpreter runs the kernels' own code (masks, reductions, roundings) with numpy; it is chosen when Triton is
imported, so the cases run in a fresh process with TRITON_INTERPRET=1. Its casts from float32 to bf16 and e4m3 are
not those of compiled Triton: it truncates to bf16, and its e4m3 rounding loses a mantissa overflow into an odd exponent
(127.9 -> 64), so the cases give it torch's round-to-nearest-even, the rounding of CUDA's conversion instructions
(`cvt.rn`). The truth is the block's arithmetic written out in float64, rounded to bf16 where the model rounds, and
the torch path the CPU runs.
"""

from __future__ import annotations

import textwrap

import pytest

from support.triton_interpreter import run_interpreted

CASES = textwrap.dedent(
    """
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter
    from wan.model.dit import FP32LayerNorm
    from wan.model.fp8_rows import norm_quantize_rows, quantize_rows

    ROUNDED = {tl.bfloat16: (torch.bfloat16, torch.int16), tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8)}
    interpreted = interpreter._convert_float

    def convert(data, source, target, rounding_mode):
        if source == tl.float32 and target in ROUNDED:
            dtype, bits = ROUNDED[target]
            values = torch.from_numpy(np.array(data, dtype=np.float32)).to(dtype)
            return values.view(bits).numpy().reshape(np.shape(data))
        return interpreted(data, source, target, rounding_mode)

    interpreter._convert_float = convert

    EPS = 1e-6
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def truth(x, weight, bias, shift, scale):
        # LayerNorm in float64, rounded to bf16 as the norm returns it; the modulation in float64, rounded again.
        xd = x.double()
        mean = xd.mean(dim=1, keepdim=True)
        y = (xd - mean) / ((xd - mean).pow(2).mean(dim=1, keepdim=True) + EPS).sqrt()
        if weight is not None:
            y = y * weight.double()
        if bias is not None:
            y = y + bias.double()
        y = y.bfloat16().double()
        if shift is not None:
            y = (y * (1 + scale.double()) + shift.double()).bfloat16().double()
        return y

    def torch_path(x, weight, bias, shift, scale):
        norm = FP32LayerNorm(x.shape[1], eps=EPS, elementwise_affine=weight is not None, bias=bias is not None)
        with torch.no_grad():
            if weight is not None:
                norm.weight.copy_(weight)
            if bias is not None:
                norm.bias.copy_(bias)
        norm = norm.to(torch.bfloat16)
        return quantize_rows(norm(x, shift, scale))

    def check(name, values, scales, want, reference):
        assert values.dtype == torch.float8_e4m3fn and values.shape == want.shape, (name, values.dtype)
        assert scales.dtype == torch.float32 and scales.shape == (want.shape[0], 1), (name, scales.shape)
        want_scales = want.abs().amax(dim=1, keepdim=True) / 448
        # The amax may sit one bf16 step (2^-8) off where the kernel's statistics round differently.
        assert ((scales.double() / want_scales - 1).abs() <= 2**-7).all(), name
        assert (values.float().abs().amax(dim=1) == 448).all(), name  # every row uses e4m3's range
        # e4m3 keeps 3 mantissa bits (2^-4 of a value) and subnormals down to 2^-9 of 448 scales; a bf16 flip 2^-8.
        error = (values.double() * scales.double() - want).abs()
        assert (error <= want.abs() * (2**-4 + 2**-7) + scales.double() * 2**-9).all(), (name, error.max().item())
        same = (values.view(torch.uint8) == reference[0].view(torch.uint8)).double().mean().item()
        print(name, "codes equal to the torch path:", same)
        assert same > 0.99, (name, same)
        torch.testing.assert_close(scales, reference[1], rtol=2**-7, atol=0)

    # 320 columns: a 512-wide block, so a third of the lanes are padding; rows of very different offsets and sizes.
    rows, cols = 24, 320
    x = (randn(rows, cols) * torch.logspace(-2, 2, rows)[:, None] + 30 * randn(rows, 1)).bfloat16()
    weight, bias = (1 + 0.2 * randn(cols)).bfloat16(), (0.2 * randn(cols)).bfloat16()
    shift, scale = 0.3 * randn(cols), 0.3 * randn(cols)  # float32, as the blocks' modulation
    cases = {
        "plain": (None, None, None, None),
        "affine (norm3, norm_x)": (weight, bias, None, None),
        "weight only": (weight, None, None, None),
        "modulated (norm1, norm2)": (None, None, shift, scale),
        "affine and modulated": (weight, bias, shift, scale),
    }
    for name, (w, b, sh, sc) in cases.items():
        values, scales = norm_quantize_rows(x, w, b, sh, sc, EPS)
        check(name, values, scales, truth(x, w, b, sh, sc), torch_path(x, w, b, sh, sc))

    # A strided view (every other row of a wider tensor) is read in place.
    wide = torch.cat([x, x.flip(1)], dim=1)
    values, scales = norm_quantize_rows(wide[:, :cols], None, None, shift, scale, EPS)
    check("strided rows", values, scales, truth(x, None, None, shift, scale), torch_path(x, None, None, shift, scale))

    try:
        norm_quantize_rows(x, None, None, shift, None, EPS)
    except ValueError as error:
        assert "shift and scale" in str(error)
    else:
        raise AssertionError("a shift without a scale was taken")

    # The FFN's hidden: tanh-GELU rounded to bf16, then quantised per row.
    hidden = (randn(16, 200) * 3).bfloat16()
    values, scales = torch.ops.multitalk.quantize_rows(hidden, True)
    h = hidden.double()
    gelu = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    check("gelu", values, scales, gelu.bfloat16().double(), quantize_rows(hidden, gelu=True))
    print("ok")
    """
)


@pytest.mark.timeout(600)
def test_fp8_row_kernels_in_triton_interpreter_match_the_blocks_arithmetic():
    run_interpreted(CASES)
