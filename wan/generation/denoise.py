"""One clip's sampling: the guided velocity (2 or 3 DiT passes a step, CFG or APG) and the Euler loop with the
motion latent held in place."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from . import sampling
from .backend import DiTBackend
from .clip_condition import MotionLatent
from .request import GuidanceOptions

log = logging.getLogger(__name__)


class GuidedVelocity:
    """The guided velocity of one clip. Three passes a step (cond, drop_text, uncond) combine text and audio guidance;
    a scale of exactly 1 drops the pass its contrast needs (`sampling.guidance_branches`), and the velocity is then
    computed without it whatever was run, so dropping the pass changes nothing. The passes run on the `dit` backend;
    APG momentum lives here, so it starts fresh every clip."""

    def __init__(
        self,
        dit: DiTBackend | None,
        text_scale: float,
        audio_scale: float,
        guidance: GuidanceOptions,
    ):
        self.dit = dit
        self.text_scale, self.audio_scale = text_scale, audio_scale
        self.norm_threshold = guidance.apg_norm_threshold
        self.needed = sampling.guidance_branches(text_scale, audio_scale)
        self.branches = self.needed  # the passes run: the needed ones
        self.buffers = None  # APG's, one per contrast that guides
        if guidance.use_apg:
            self.buffers = [sampling.MomentumBuffer(guidance.apg_momentum) for _ in self.needed[1:]]

    def velocities(self, latent: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each pass's velocity, by branch name."""
        return self.dit.velocities(latent, t, self.branches)

    def combine(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The guided velocity from the passes' velocities (plain CFG, or APG), using only the passes this clip's
        scales need (`self.needed`), whatever else ran."""
        if self.needed == ("cond",):
            return v["cond"]
        if len(self.needed) == 2:
            dropped = self.needed[1]
            scale = self.audio_scale if dropped == "drop_audio" else self.text_scale
            if self.buffers:
                return sampling.guide_apg_one(v["cond"], v[dropped], scale, self.buffers[0], self.norm_threshold)
            if dropped == "drop_audio":
                return sampling.guide_audio_only(v["cond"], v["drop_audio"], self.audio_scale)
            return sampling.guide_text_only(v["cond"], v["drop_text"], self.text_scale)
        if self.buffers:
            return sampling.guide_apg(
                v["cond"],
                v["drop_text"],
                v["uncond"],
                self.text_scale,
                self.audio_scale,
                *self.buffers,
                self.norm_threshold,
            )
        return sampling.guide(v["cond"], v["drop_text"], v["uncond"], self.text_scale, self.audio_scale)

    def __call__(self, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.combine(self.velocities(latent, t))


def denoise(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latent: torch.Tensor,
    timesteps: torch.Tensor,
    motion: MotionLatent | None,
    generator: torch.Generator,
    on_step: Callable[[int], None] = lambda step: None,
) -> torch.Tensor:
    """Euler steps along `timesteps` (`[steps + 1]`, ending at 0). A motion latent takes `latent[:, :T]` before the
    first step and after every step (see `MotionLatent`; re-noised, the last hold at t = 0 is exact)."""

    def hold_motion(t: torch.Tensor) -> None:
        frames = motion.latent.shape[1]
        noise = torch.randn(motion.latent.shape, generator=generator, device=latent.device) if motion.draws else None
        latent[:, :frames] = sampling.add_noise(motion.latent, noise, t) if motion.renoise else motion.latent

    if motion is not None:
        hold_motion(timesteps[0])
    for i in range(len(timesteps) - 1):
        v = velocity(latent, timesteps[i : i + 1])
        latent = sampling.euler_step(latent, v, timesteps[i], timesteps[i + 1])
        if motion is not None:
            hold_motion(timesteps[i + 1])
        on_step(i + 1)
    return latent
