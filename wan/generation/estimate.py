"""How long a request will take, before it runs: its clips, steps and passes times the costs measured on this
machine when the pipeline warmed up (so the estimate holds on any card, a CPU included)."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import VAE_STRIDE
from . import sampling
from .clips import ClipPlan

# Share of a DiT pass that grows linearly with the tokens (the linear layers); the rest, the self-attention, grows
# with their square. From the FLOP count of the 14B DiT at 32928 tokens (bench/NOTES.md): 0.93 PFLOP in linear
# layers, 0.89 in attention.
LINEAR_SHARE = 0.51


@dataclass(frozen=True)
class Costs:
    """Seconds measured once on this machine: a DiT pass at `tokens` tokens (two speakers), a clip's VAE encode,
    decode and CLIP features at `pixels` pixels per frame and `frames` frames, and the prompt encoding."""

    pass_seconds: float
    tokens: int
    clip_seconds: float
    pixels: int
    frames: int
    text_seconds: float


def tokens_of(frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    latent_frames = (frames - 1) // VAE_STRIDE[0] + 1
    return latent_frames * (height // VAE_STRIDE[1] // patch[1]) * (width // VAE_STRIDE[2] // patch[2])


def estimate_seconds(costs: Costs, plan: ClipPlan, height: int, width: int, steps: int, text_scale: float) -> float:
    """The request's model time: prompt + per clip (VAE and CLIP, scaled by pixels x frames; DiT passes, scaled by
    tokens: linearly for the linear layers, quadratically for the attention). `steps`: those of a clip whose passes
    run (TeaCache's skips taken off: `Pipeline.teacache_steps`)."""
    ratio = tokens_of(plan.frames, height, width) / costs.tokens
    per_pass = costs.pass_seconds * (LINEAR_SHARE * ratio + (1 - LINEAR_SHARE) * ratio**2)
    per_clip = costs.clip_seconds * (height * width * plan.frames) / (costs.pixels * costs.frames)
    passes = steps * sampling.passes_per_step(text_scale)
    return costs.text_seconds + plan.clips * (per_clip + passes * per_pass)
