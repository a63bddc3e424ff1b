"""What conditions one clip besides text and audio: the CLIP frame, `y` (known-frame mask + VAE latent) and the motion
latent held fixed while sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class VideoEncoder(Protocol):
    def encode(self, video: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MotionLatent:
    """Latent frames held in `latent[:, :T]` before the first step and after every step: re-noised to the current t
    with a fresh draw (MultiTalk), or put back as they are (InfiniteTalk, which still makes the draws, so the random
    sequence stays the reference's, except on its first clip)."""

    latent: torch.Tensor  # [16, T, h, w] float32
    renoise: bool = True
    draws: bool = True


@dataclass(frozen=True)
class ClipCondition:
    clip_frame: torch.Tensor  # [1, 3, 1, H, W] in [-1, 1], the CLIP input
    y: torch.Tensor  # [1, 4 + 16, T, h, w]: mask of the known pixel frames, then their VAE latent
    motion: MotionLatent | None


def known_frames_mask(known: int, frames: int, lat_h: int, lat_w: int, device: torch.device) -> torch.Tensor:
    """`[1, 4, T, h, w]`: 1 on the first `known` pixel frames; the first frame is repeated 4x so the pixel frames
    group into latent frames of 4, as the VAE's time compression does."""
    mask = torch.zeros(1, frames, lat_h, lat_w, device=device)
    mask[:, :known] = 1
    mask = torch.cat([mask[:, :1].repeat(1, 4, 1, 1), mask[:, 1:]], dim=1)
    return mask.view(1, mask.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)


def encode_known_frames(
    vae: VideoEncoder, known_frames: torch.Tensor, frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE latent of `known_frames` `[1, 3, known, H, W]` followed by zero frames up to `frames`, and `y`: the
    known-frames mask and that latent."""
    known = known_frames.shape[2]
    pixels = torch.cat([known_frames[0], known_frames.new_zeros(3, frames - known, *known_frames.shape[-2:])], dim=1)
    latent = vae.encode(pixels)
    mask = known_frames_mask(known, frames, *latent.shape[-2:], device=latent.device)
    return latent, torch.cat([mask, latent[None].to(mask.dtype)], dim=1)


def multitalk_condition(
    vae: VideoEncoder, cond_frames: torch.Tensor, frames: int, first_clip: bool, dit_dtype: torch.dtype
) -> ClipCondition:
    """MultiTalk: clip 0 is conditioned on the image, later clips on the last `motion_frame` frames of the previous
    clip (`cond_frames` `[1, 3, known, H, W]`), which are VAE-encoded with zeros after them."""
    latent, y = encode_known_frames(vae, cond_frames, frames)
    motion = None
    if not first_clip:
        # As the reference, the motion latent is cut from `y` in the DiT's dtype (bf16 at run time), then re-noised
        # in float32.
        motion = MotionLatent(latent[:, : 1 + (cond_frames.shape[2] - 1) // 4].to(dit_dtype).float())
    return ClipCondition(clip_frame=cond_frames[:, :, -1:], y=y, motion=motion)


def infinitetalk_condition(
    vae: VideoEncoder,
    source_frame: torch.Tensor,
    motion_frames: torch.Tensor | None,
    frames: int,
    previous: ClipCondition | None = None,
) -> ClipCondition:
    """InfiniteTalk: every clip is anchored on the source frame at its start (`source_frame` `[1, 3, 1, H, W]`: the
    CLIP input and the only known frame of `y`), and holds the VAE latent of the previous clip's last frames
    (`motion_frames` `[1, 3, n, H, W]`; on the first clip, of the source frame) clean in `latent[:, :T]`.

    `y` depends on the source frame alone: where it equals the `previous` clip's (every clip of an image, a still
    stretch of a video), that clip's `y` is taken instead of encoding the same frames again."""
    if previous is not None and torch.equal(previous.clip_frame, source_frame):
        y = previous.y
    else:
        _, y = encode_known_frames(vae, source_frame, frames)
    first_clip = motion_frames is None
    # The VAE encodes frame 0 alone, then groups of 4: frames past the last full group are dropped, as the reference.
    motion = vae.encode((source_frame if first_clip else motion_frames)[0])
    return ClipCondition(clip_frame=source_frame, y=y, motion=MotionLatent(motion, renoise=False, draws=not first_clip))
