"""The attention kernels of the project: SDPA (cuDNN first on CUDA), and FlashAttention 4's Hopper/Blackwell kernel
for the DiT's full self-attention when `flash_attn.cute` is installed. Which one a DiT uses is chosen in
`wan.runtime.kernels`."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

_FLASH_DTYPES = (torch.bfloat16, torch.float16)
# On an H100 cuDNN's fused attention runs our 32k-token self-attention in 37 ms against 60 ms for SDPA's default
# flash backend (bench/RESULTS.md), so it goes first; the others remain as fallbacks for shapes cuDNN refuses.
_CUDA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) softmax attention with scale 1/sqrt(head_dim).

    q `[B, Lq, heads, head_dim]`, k/v `[B, Lk, heads, head_dim]` of one dtype; returns `[B, Lq, heads, head_dim]`.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda:
        with sdpa_kernel(_CUDA_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


@functools.cache
def _flash_attn_cute():
    try:
        import flash_attn.cute
    except Exception:  # not installed, or its CUDA DSL does not load here
        return None
    return flash_attn.cute


def flash_attention_4_available(device: torch.device) -> bool:
    """Whether FA4 is installed and its forward kernel runs, correctly, on `device` (compute capability 9.x or 10.x).

    The first answer for a device runs one small attention through FA4 and SDPA (which also compiles FA4's kernel):
    a package that installs but fails on this machine's driver or torch must not take the service down.
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return False
    return _flash_attn_cute() is not None and _flash_attention_4_works(device.index or 0)


@functools.cache
def _flash_attention_4_works(device_index: int) -> bool:
    generator = torch.Generator(f"cuda:{device_index}").manual_seed(0)
    q, k, v = torch.randn(3, 1, 256, 2, 128, generator=generator, device=generator.device, dtype=torch.bfloat16)
    try:
        with torch.no_grad():
            error = (flash_attention_4(q, k, v).float() - attention(q, k, v).float()).abs().max().item()
    except Exception as exception:  # FA4's compile or launch failed here
        log.warning("FlashAttention 4 does not run on cuda:%d, using SDPA: %s", device_index, exception)
        return False
    if not error < 0.02:  # bf16 rounding of outputs of size ~0.1 is ~1e-3
        log.warning("FlashAttention 4 disagrees with SDPA on cuda:%d (max abs %.3g), using SDPA", device_index, error)
        return False
    return True


def flash_attention_4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attention` through FlashAttention 4 (bf16/fp16 on CUDA; see `flash_attention_4_available`).

    On an H100 it runs the DiT's 32928-token self-attention 16 % faster than cuDNN (bench/RESULTS.md).
    """
    if q.dtype not in _FLASH_DTYPES:
        return attention(q, k, v)
    return torch.ops.multitalk.flash_attention_4(q, k, v)


@torch.library.custom_op("multitalk::flash_attention_4", mutates_args=())
def _flash_attention_4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = _flash_attn_cute().flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # (out, lse)


@_flash_attention_4.register_fake
def _(q, k, v):
    return torch.empty_like(q)
