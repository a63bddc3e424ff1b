"""Row-wise e4m3 quantisation of activations: per token, one float32 scale and e4m3 values.

On CUDA the quantisation of GELU(x), the input of the FFN's second linear, runs as one Triton pass in which each
program holds a whole row (13824 values) in registers: inductor compiled it as a looped reduction reading the
hidden twice, 1.6 ms per block against 1.05 ms here on an H100. Elsewhere inductor's own kernels are faster, because
they fuse the quantisation into the norm that makes x (measured: bench/RESULTS.md), so the torch arithmetic serves,
and it is also the CPU path. Both give the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_MIN_AMAX = 1e-12


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`[M, K]` -> e4m3 values `[M, K]` and float32 scales `[M, 1]` with f(x) ≈ values * scales, where f is the
    identity or, with `gelu`, `F.gelu(x, approximate="tanh")` rounded to x's dtype (as the unquantised model)."""
    if x.is_cuda and gelu:
        return torch.ops.multitalk.quantize_rows(x, gelu)
    if gelu:
        x = F.gelu(x, approximate="tanh")
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(_MIN_AMAX) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def _quantize_rows_kernel(x_ptr, values_ptr, scales_ptr, n_cols, row_stride, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0)
    if GELU:
        # tanh-GELU, 0.5 x (1 + tanh(z)) = x sigmoid(2 z), rounded to the input dtype like torch's GELU output.
        xf = x.to(tl.float32)
        z = 0.7978845608028654 * (xf + 0.044715 * xf * xf * xf)
        x = (xf * tl.sigmoid(2.0 * z)).to(x.dtype)
    x = x.to(tl.float32)
    # _MIN_AMAX and FP8_MAX as literals; IEEE division (`/` is approximate in Triton) keeps torch's bits.
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 448.0)
    values = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)
    tl.store(values_ptr + row * n_cols + cols, values.to(tl.float8e4nv), mask=mask)
    tl.store(scales_ptr + row, scale)


@torch.library.custom_op("multitalk::quantize_rows", mutates_args=())
def _quantize_rows_cuda(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    values = torch.empty(rows, cols, dtype=FP8, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    # ~32 values per thread: the row stays in registers without spilling.
    num_warps = max(4, min(32, block // (32 * 32)))
    with torch.cuda.device(x.device):
        _quantize_rows_kernel[(rows,)](
            x, values, scales, cols, x.stride(0), GELU=gelu, BLOCK=block, num_warps=num_warps
        )
    return values, scales


@_quantize_rows_cuda.register_fake
def _(x, gelu):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)
