"""The one attention entry point of the project: SDPA by default, FlashAttention 3 when it is installed and usable."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import flash_attn_interface
except ImportError:
    flash_attn_interface = None

_FLASH_DTYPES = (torch.bfloat16, torch.float16)
# On an H100 cuDNN's fused attention runs our 32k-token self-attention in 37 ms against 60 ms for SDPA's default
# flash backend (../shared/perf), so it goes first; the others remain as fallbacks for shapes cuDNN refuses.
_CUDA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
# Without `set_priority` (torch < 2.6) the list only restricts the choice, and SDPA's own order applies.
_PRIORITY = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) softmax attention with scale 1/sqrt(head_dim).

    q `[B, Lq, heads, head_dim]`, k/v `[B, Lk, heads, head_dim]` of one dtype; returns `[B, Lq, heads, head_dim]`.
    """
    if flash_attn_interface is not None and q.is_cuda and q.dtype in _FLASH_DTYPES:
        out = flash_attn_interface.flash_attn_func(q, k, v)
        # Older FA3 releases return (out, softmax_lse).
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda:
        with sdpa_kernel(_CUDA_BACKENDS, **_PRIORITY):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)
