"""How long a request will take, before it runs: its clips, steps and passes times the costs measured on this
machine when the pipeline warmed up (so the estimate holds on any card, a CPU included)."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import VAE_STRIDE
from .plan import GenerationPlan, latent_frames

# Share of a DiT pass that grows linearly with the tokens (the linear layers); the rest, the self-attention, grows
# with their square. From the FLOP count of the 14B DiT at 32928 tokens (bench/RESULTS.md): 0.93 PFLOP in linear
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

    def describe(self) -> str:
        return (
            f"a DiT pass {self.pass_seconds:.2f} s at {self.tokens} tokens, a clip's VAE and CLIP {self.clip_seconds:.2f} s "
            f"at {self.frames} frames of {self.pixels} pixels, the prompt {self.text_seconds:.2f} s"
        )


def tokens_of(frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    return latent_frames(frames) * (height // VAE_STRIDE[1] // patch[1]) * (width // VAE_STRIDE[2] // patch[2])


def estimate_seconds(costs: Costs, plan: GenerationPlan) -> float:
    """The request's model time: prompt + per clip (VAE and CLIP, scaled by pixels x frames; DiT passes, scaled by
    tokens: linearly for the linear layers, quadratically for the attention). Only the passes that run count
    (`GenerationPlan.computed_steps`: TeaCache's skips taken off)."""
    clips = plan.clips
    ratio = tokens_of(clips.frames, plan.height, plan.width) / costs.tokens
    per_pass = costs.pass_seconds * (LINEAR_SHARE * ratio + (1 - LINEAR_SHARE) * ratio**2)
    per_clip = costs.clip_seconds * (plan.height * plan.width * clips.frames) / (costs.pixels * costs.frames)
    return costs.text_seconds + clips.clips * (per_clip + plan.passes_per_clip * per_pass)
