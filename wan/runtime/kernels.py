"""Which kernel runs the DiT's full self-attention, chosen once per DiT from the card and the memory plan."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.attention import attention, flash_attention_4, flash_attention_4_available
from .plans import MemoryPlan

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def self_attention_kernel(plan: MemoryPlan, device: str | torch.device) -> AttentionKernel:
    """fp8 DiTs on Hopper: cuDNN's fp8 attention (on a CPU its emulation). Otherwise, fp8 linears on Ada and Blackwell
    included (cuDNN's fp8 attention is built and measured for Hopper alone): FlashAttention 4 where it is installed
    and passes its check on the card (Hopper, Blackwell), else SDPA (`wan.model.attention.attention`)."""
    device = torch.device(device)
    if plan.dit_weights == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] == 9):
        from ..model.fp8 import fp8_attention  # imports Triton

        return fp8_attention
    return flash_attention_4 if flash_attention_4_available(device) else attention


def kernel_name(kernel: AttentionKernel) -> str:
    return getattr(kernel, "__name__", type(kernel).__name__)
