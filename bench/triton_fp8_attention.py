"""A Triton flash attention over e4m3 Q, K, V for Hopper, tried against cuDNN's fp8 attention (which the model runs).

On an H100 its best tiles (128 x 64, 4 warps, 3 stages) run the DiT's 32928-token self-attention in 30.7 ms (724
TFLOP/s) against cuDNN's 26.7 ms (831), with a smaller error against float32 (0.054 vs 0.060): see bench/RESULTS.md.
`python -m bench.attention_kernels --sweep` times it under each of its tilings.

Q·Kᵀ and P·V run on fp8 tensor cores with float32 accumulation; the softmax runs in float32 and its probabilities
are scaled to e4m3's range (P ∈ [0, 1] times `_P_SCALE`) for the second product, as cuDNN's fp8 kernel does. Unlike
cuDNN's (whose Hopper kernel writes e4m3 only), the output leaves in bf16: one rounding fewer before the output
projection quantises it by rows. V comes transposed, `[B, H, D, L]`, because fp8 wgmma reads both operands
K-major; the quantisation that makes V writes it so.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from wan.model.fp8 import quantize_tensor

_LOG2E = 1.4426950408889634
_P_SCALE = 448.0  # e4m3's largest value: P = 1 maps onto it


@triton.jit
def _attend_keys(q, k_desc, vt_desc, start_n, column, seq_len, qk_scale, m_i, l_i, acc,
                 BLOCK_N: tl.constexpr, P_SCALE: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
    """One tile of keys into the online softmax: the running max, the running sum and the output accumulator."""
    k = k_desc.load([start_n, column])
    s = tl.dot(q, k.T) * qk_scale
    if MASK:
        keys = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(keys[None, :] < seq_len, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    vt = vt_desc.load([column, start_n])
    acc = tl.dot((p * P_SCALE).to(tl.float8e4nv), vt.T, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _fp8_flash_kernel(
    q_desc,
    k_desc,
    vt_desc,
    o_desc,
    descales_ptr,  # float32 [3]: Q, K, V
    seq_len,
    num_heads,
    softmax_scale,  # 1 / sqrt(head_dim), times log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    P_SCALE: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    column = head * HEAD_DIM
    descale_q = tl.load(descales_ptr)
    descale_k = tl.load(descales_ptr + 1)
    descale_v = tl.load(descales_ptr + 2)
    qk_scale = descale_q * descale_k * softmax_scale

    q = q_desc.load([start_m, column])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_blocks = seq_len // BLOCK_N * BLOCK_N
    for start_n in tl.range(0, full_blocks, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        m_i, l_i, acc = _attend_keys(q, k_desc, vt_desc, start_n, column, seq_len, qk_scale, m_i, l_i, acc,
                                     BLOCK_N, P_SCALE, False)  # fmt: skip
    if full_blocks < seq_len:  # the last keys: the descriptors pad with zeros, which must not count
        m_i, l_i, acc = _attend_keys(q, k_desc, vt_desc, full_blocks, column, seq_len, qk_scale, m_i, l_i, acc,
                                     BLOCK_N, P_SCALE, True)  # fmt: skip
    out = acc * (descale_v / P_SCALE) / l_i[:, None]
    o_desc.store([start_m, column], out.to(o_desc.dtype))


def fp8_flash_attention(
    q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, descales: torch.Tensor, *, block_m=128, block_n=64,
    num_warps=4, num_stages=3, warp_specialize=False,
) -> torch.Tensor:  # fmt: skip
    """q, k e4m3 `[1, L, H, D]` (tokens' heads side by side), vt e4m3 `[1, H, D, L]`, descales float32 `[3]` (Q, K,
    V, with x ≈ values * descale) -> bf16 `[1, L, H, D]`, softmax(Q·Kᵀ/√D)·V."""
    batch, seq_len, heads, head_dim = q.shape
    if batch != 1:
        raise ValueError(f"fp8_flash_attention takes one sequence, got a batch of {batch}")
    q, k, vt = _rows_of(q), _rows_of(k), _padded_rows(vt)
    out = torch.empty(q.shape, device=q.device, dtype=torch.bfloat16)
    width = heads * head_dim
    rows = (seq_len, width)
    q_desc = TensorDescriptor(q, rows, (q.stride(1), 1), (block_m, head_dim))
    k_desc = TensorDescriptor(k, rows, (k.stride(1), 1), (block_n, head_dim))
    vt_desc = TensorDescriptor(vt, (width, seq_len), (vt.stride(2), 1), (head_dim, block_n))
    o_desc = TensorDescriptor(out, rows, (out.stride(1), 1), (block_m, head_dim))
    grid = (triton.cdiv(seq_len, block_m), heads)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _fp8_flash_kernel[grid](
            q_desc, k_desc, vt_desc, o_desc, descales, seq_len, heads, head_dim**-0.5 * _LOG2E,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, P_SCALE=_P_SCALE, WARP_SPECIALIZE=warp_specialize,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return out


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """x `[1, L, H, D]` whose heads lie side by side in each token's row, as a 2-D descriptor reads it."""
    if x.stride(3) != 1 or x.stride(2) != x.shape[3] or x.stride(1) % 16:
        x = x.contiguous()
    return x


def _padded_rows(vt: torch.Tensor) -> torch.Tensor:
    """vt `[1, H, D, L]` with each row of L values 16-byte aligned (a descriptor's stride must be)."""
    if vt.stride(3) == 1 and vt.stride(1) == vt.shape[2] * vt.stride(2) and vt.stride(2) % 16 == 0:
        return vt
    seq_len = vt.shape[3]
    padded = vt.new_empty(*vt.shape[:3], -(-seq_len // 16) * 16)[..., :seq_len]
    padded.copy_(vt)
    return padded


def triton_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`wan.model.fp8.fp8_attention`'s interface through this kernel (CUDA): Q, K, V and the probabilities in e4m3,
    the output in bf16."""
    return torch.ops.bench.triton_fp8_attention(*kernel_inputs(q, k, v)).to(q.dtype)


def kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`fp8_flash_attention`'s q, k, vt and descales for attention over q, k, v `[1, L, H, D]`: each quantised per
    tensor (`wan.model.fp8.quantize_tensor`), V transposed."""
    (q8, descale_q), (k8, descale_k), (v8, descale_v) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
    vt = _padded_rows(v8.permute(0, 2, 3, 1))  # V as [B, H, D, L] for fp8 wgmma, rows 16-byte aligned
    descales = torch.cat([descale_q.reshape(1), descale_k.reshape(1), descale_v.reshape(1)])
    return q8, k8, vt, descales


@torch.library.custom_op("bench::triton_fp8_attention", mutates_args=())
def _triton_fp8_attention(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, descales: torch.Tensor) -> torch.Tensor:
    return fp8_flash_attention(q, k, vt, descales)


@_triton_fp8_attention.register_fake
def _(q, k, vt, descales):
    return torch.empty(q.shape, device=q.device, dtype=torch.bfloat16)
