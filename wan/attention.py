"""The one attention entry point of the project: SDPA by default, FlashAttention 3 when it is installed and usable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import flash_attn_interface
except ImportError:
    flash_attn_interface = None

_FLASH_DTYPES = (torch.bfloat16, torch.float16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) softmax attention with scale 1/sqrt(head_dim).

    q `[B, Lq, heads, head_dim]`, k/v `[B, Lk, heads, head_dim]` of one dtype; returns `[B, Lq, heads, head_dim]`.
    """
    if flash_attn_interface is not None and q.is_cuda and q.dtype in _FLASH_DTYPES:
        out = flash_attn_interface.flash_attn_func(q, k, v)
        # Older FA3 releases return (out, softmax_lse).
        return out[0] if isinstance(out, tuple) else out
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
