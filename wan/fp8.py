"""Opt-in float8 linear layers for the DiT blocks (H100 fp8 tensor cores through `torch._scaled_mm`).

Weights are quantised once to e4m3 with one scale per output row; activations are quantised per token on the fly.
Both scales are applied by the matmul itself (row-wise scaling), so the result comes back in bf16. The accuracy
against bf16 is measured by `bench/gpu_check.py`; this path is off unless asked for.
"""

from __future__ import annotations

import torch
import torch.nn as nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[M, K]` -> e4m3 values `[M, K]` and float32 scales `[M, 1]` with x ≈ values * scales."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """Drop-in for an `nn.Linear` whose weight is stored in e4m3 with per-output-row scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.T.contiguous())  # [1, N], the layout _scaled_mm wants
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        values, scale = quantize_rows(rows)
        out = torch._scaled_mm(
            values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype
        )
        return out.view(*x.shape[:-1], self.out_features)


def quantize_blocks(model: nn.Module, min_features: int = 1024) -> int:
    """Replace every `nn.Linear` inside `model.blocks` with at least `min_features` inputs by an `Fp8Linear`.

    Small layers (the audio key/value projection from 768 features) stay in bf16. Returns the number replaced.
    """
    replaced = 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear) and module.in_features >= min_features:
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child, Fp8Linear(module))
                replaced += 1
    return replaced
