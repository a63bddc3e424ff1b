"""Rotary position embeddings of the MultiTalk DiT: 3-D RoPE for video tokens and 1-D label RoPE for speakers.

Both rotate adjacent pairs `(x[2i], x[2i+1])` like a complex product, in float32 with real cos/sin tables.
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to the (frame, height, width) axes: d - 4*(d//6), 2*(d//6), 2*(d//6)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_angles(length: int, axis_dim: int, device: torch.device | None) -> torch.Tensor:
    """Angles `pos * theta**(-2j/axis_dim)` for positions 0..length-1, float64 `[length, axis_dim // 2]`."""
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim
    inv_freq = 1.0 / torch.pow(ROPE_THETA, exponents)
    positions = torch.arange(length, dtype=torch.float64, device=device)
    return torch.outer(positions, inv_freq)


def grid_rope(
    head_dim: int, grid: tuple[int, int, int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[T*N_h*N_w, head_dim // 2]` (float32) for tokens in frame-major, row, column order.

    The angles are computed in float64 (a few hundred values per forward) so that the float32 tables equal the
    reference's complex128 ones rounded once.
    """
    frames, rows, cols = grid
    parts = []
    for axis, (length, axis_dim) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        angles = _axis_angles(length, axis_dim, device)
        shape = [1, 1, 1, axis_dim // 2]
        shape[axis] = length
        parts.append(angles.view(shape).expand(frames, rows, cols, axis_dim // 2))
    angles = torch.cat(parts, dim=-1).reshape(frames * rows * cols, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def label_rope(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[*positions.shape, head_dim // 2]` for fractional 1-D positions, float32 like the reference."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def label_rope_table(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`label_rope` as an opaque op, so that its table is written once: inside a compiled block inductor would fuse the
    cos/sin of each token's angles into `apply_rope` and compute them again for every head (on an H100, with two
    speakers, 1.2 ms a block for the audio queries' rotation)."""
    return torch.ops.multitalk.label_rope(positions, head_dim)


@torch.library.custom_op("multitalk::label_rope", mutates_args=())
def _label_rope(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return label_rope(positions, head_dim)


@_label_rope.register_fake
def _(positions, head_dim):
    shape = (*positions.shape, head_dim // 2)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of `x [..., L, heads, head_dim]` by per-token angles; cos/sin `[..., L, head_dim // 2]`.

    Returns float32; callers cast to the attention dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2)
