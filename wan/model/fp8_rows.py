"""Row-wise e4m3 quantisation of activations: per token, one float32 scale and e4m3 values.

On CUDA the quantisation of GELU(x), the input of the FFN's second linear, runs as one Triton pass in which each
program holds a whole row (13824 values) in registers: inductor compiled it as a looped reduction reading the
hidden twice, 1.6 ms per block against 1.05 ms here on an H100. Elsewhere inductor's own kernels are faster, because
they fuse the quantisation into the norm that makes x (measured: bench/RESULTS.md), so the torch arithmetic serves,
and it is also the CPU path. Both give the same bits.

`norm_quantize_rows` goes one step further for the inputs that a block's LayerNorm makes: normalisation, modulation,
the roundings to the activation dtype and the quantisation in one pass over the row, so the normalised activations
never reach memory (opt-in, `quantize_blocks(fused_norms=True)`; not yet timed on a card).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_MIN_AMAX = 1e-12


class Fp8Rows(NamedTuple):
    """An activation `[..., K]` already quantised for an `Fp8Linear`: e4m3 `values` `[M, K]` and float32 `scales`
    `[M, 1]` of its M rows, with the `shape` and `dtype` it has unquantised (the linear's output takes them)."""

    values: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


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
def _store_quantized_row(y, values_ptr, scales_ptr, row, n_cols, cols, mask):
    """One float32 row (0 in the padding lanes, below every |y|) as e4m3 values and its scale, as `quantize_rows`."""
    # _MIN_AMAX and FP8_MAX as literals; IEEE division (`/` is approximate in Triton) keeps torch's bits.
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12), 448.0)
    values = tl.clamp(tl.math.div_rn(y, scale), -448.0, 448.0)
    tl.store(values_ptr + row * n_cols + cols, values.to(tl.float8e4nv), mask=mask)
    tl.store(scales_ptr + row, scale)


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
    _store_quantized_row(x.to(tl.float32), values_ptr, scales_ptr, row, n_cols, cols, mask)


@triton.jit
def _norm_quantize_rows_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    shift_ptr,
    scale_ptr,
    values_ptr,
    scales_ptr,
    n_cols,
    row_stride,
    eps,
    WEIGHT: tl.constexpr,
    BIAS: tl.constexpr,
    MODULATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    # LayerNorm in float32, the variance from the centred values (two passes over registers, not E[x^2] - E[x]^2).
    mean = tl.sum(xf, axis=0) / n_cols
    centred = tl.where(mask, xf - mean, 0.0)
    y = centred * tl.math.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    if WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if BIAS:
        y = y + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = y.to(x.dtype)  # the norm's output, in the activation dtype
    if MODULATE:
        scale = tl.load(scale_ptr + cols, mask=mask, other=0.0)
        y = (y.to(tl.float32) * (1.0 + scale) + tl.load(shift_ptr + cols, mask=mask, other=0.0)).to(x.dtype)
    # The padding lanes hold 0 (0 * (1 + 0) + 0).
    _store_quantized_row(y.to(tl.float32), values_ptr, scales_ptr, row, n_cols, cols, mask)


def _row_warps(block: int) -> int:
    """~32 values per thread: the row stays in registers without spilling."""
    return max(4, min(32, block // (32 * 32)))


def _row_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A row kernel's input with unit column stride, its e4m3 values and float32 scales to fill, the row's block."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    values = torch.empty(rows, cols, dtype=FP8, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    return x, values, scales, triton.next_power_of_2(cols)


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on x's GPU; a CPU tensor runs under Triton's interpreter (TRITON_INTERPRET=1, the tests)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("multitalk::quantize_rows", mutates_args=())
def _quantize_rows_triton(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`_quantize_rows_kernel` over `[M, K]` rows, as one op for torch.compile."""
    x, values, scales, block = _row_outputs(x)
    with _on_device(x):
        _quantize_rows_kernel[(x.shape[0],)](
            x, values, scales, x.shape[1], x.stride(0), GELU=gelu, BLOCK=block, num_warps=_row_warps(block)
        )
    return values, scales


@_quantize_rows_triton.register_fake
def _(x, gelu):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("multitalk::norm_quantize_rows", mutates_args=())
def norm_quantize_rows(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_norm_quantize_rows_kernel` over `[M, K]` rows, as one op for torch.compile: e4m3 values `[M, K]` and float32
    scales `[M, 1]` of `modulated(layer_norm(x))`; `weight`, `bias` `[K]` of the norm, float32 `shift`, `scale`
    with K values (one modulation for every row), each optional."""
    cols = x.shape[1]
    for name, tensor in dict(weight=weight, bias=bias, shift=shift, scale=scale).items():
        if tensor is not None and tensor.numel() != cols:
            raise ValueError(
                f"{name}: {tuple(tensor.shape)} holds {tensor.numel()} values, not one per column ({cols})"
            )
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale modulate together: give both or neither")
    x, values, scales, block = _row_outputs(x)
    vector = [t if t is None else t.reshape(-1).contiguous() for t in (weight, bias, shift, scale)]
    placeholder = scales  # a pointer for the absent vectors; the kernel never reads it
    with _on_device(x):
        _norm_quantize_rows_kernel[(x.shape[0],)](
            x,
            *(placeholder if t is None else t for t in vector),
            values,
            scales,
            cols,
            x.stride(0),
            eps,
            WEIGHT=weight is not None,
            BIAS=bias is not None,
            MODULATE=shift is not None,
            BLOCK=block,
            num_warps=_row_warps(block),
        )
    return values, scales


@norm_quantize_rows.register_fake
def _(x, weight, bias, shift, scale, eps):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)
