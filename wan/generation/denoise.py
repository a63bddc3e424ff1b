"""One clip's sampling: the guided velocity (2 or 3 DiT passes a step, CFG or APG, TeaCache) and the Euler loop
with the motion latent held in place."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from . import sampling
from .clip_condition import MotionLatent
from .request import GuidanceOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipInputs:
    """Everything the DiT sees for a clip besides the latent and t."""

    context: torch.Tensor  # [L, text_dim], the prompt
    context_null: torch.Tensor  # the negative prompt
    clip_fea: torch.Tensor  # [1, 257, clip_dim]
    y: torch.Tensor  # [1, 20, T, h, w]
    audio: torch.Tensor  # [speakers, frames, window, layers, channels]
    masks: torch.Tensor  # [3, h, w]

    def to(self, device: torch.device | str) -> "ClipInputs":
        return ClipInputs(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def branch_inputs(self, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, audio) of a guidance pass; a dropped audio is ONE silent speaker, as the reference."""
        if branch not in sampling.GUIDANCE_BRANCHES:
            raise ValueError(f"unknown guidance branch {branch!r}; expected one of {sampling.GUIDANCE_BRANCHES}")
        text = self.context_null if branch in ("drop_text", "uncond") else self.context
        audio = torch.zeros_like(self.audio[-1:]) if branch in ("drop_audio", "uncond") else self.audio
        return text, audio


def guidance_branches(text_scale: float) -> tuple[str, ...]:
    """The DiT passes of one step: (cond, drop_audio) without text guidance, else (cond, drop_text, uncond)."""
    return ("cond", "drop_audio") if sampling.passes_per_step(text_scale) == 2 else ("cond", "drop_text", "uncond")


def branch_velocity(
    dit: Callable[..., torch.Tensor],
    latent: torch.Tensor,
    t: torch.Tensor,
    inputs: ClipInputs,
    branch: str,
    cache: sampling.TeaCacheBranch | None = None,
    **dit_options,
) -> torch.Tensor:
    """One guidance pass of the DiT (`dit_options`, e.g. `parallel`, go to its forward)."""
    text, audio = inputs.branch_inputs(branch)
    return dit(latent, t, text, inputs.clip_fea, inputs.y, audio, inputs.masks, cache=cache, **dit_options)


class BranchRunner(Protocol):
    """Runs the passes of a step elsewhere (e.g. `wan.parallel.workers.WorkerGroup`, one process per GPU)."""

    def velocities(self, latent: torch.Tensor, t: torch.Tensor, branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
        ...


class GuidedVelocity:
    """The guided velocity of one clip. Three passes a step (cond, drop_text, uncond) combine text and audio guidance;
    with text scale 1, two (cond, drop_audio). The passes run here one after the other, or on a `runner`. APG momentum
    and TeaCache state live here (TeaCache's in the runner's processes when there is one), so they start fresh every
    clip."""

    def __init__(
        self,
        dit: Callable[..., torch.Tensor],
        inputs: ClipInputs,
        text_scale: float,
        audio_scale: float,
        guidance: GuidanceOptions,
        teacache_bucket: str,
        runner: BranchRunner | None = None,
    ):
        self.dit, self.inputs, self.runner = dit, inputs, runner
        self.text_scale, self.audio_scale = text_scale, audio_scale
        self.norm_threshold = guidance.apg_norm_threshold
        self.branches = guidance_branches(text_scale)
        self.teacache = None
        if guidance.use_teacache and runner is None:
            self.teacache = sampling.TeaCache(guidance.teacache_thresh, teacache_bucket)
        self.buffers = None
        if guidance.use_apg:
            self.buffers = [sampling.MomentumBuffer(guidance.apg_momentum) for _ in self.branches[1:]]

    def velocities(self, latent: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each pass's velocity, by branch name."""
        if self.runner is not None:
            return self.runner.velocities(latent, t, self.branches)
        caches = {b: self.teacache.branch(b) if self.teacache is not None else None for b in self.branches}
        return {b: branch_velocity(self.dit, latent, t, self.inputs, b, caches[b]) for b in self.branches}

    def combine(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The guided velocity from the passes' velocities (plain CFG, or APG)."""
        if "drop_audio" in v:
            if self.buffers:
                return sampling.guide_apg_audio_only(v["cond"], v["drop_audio"], self.audio_scale, self.buffers[0],
                                                     self.norm_threshold)
            return sampling.guide_audio_only(v["cond"], v["drop_audio"], self.audio_scale)
        if self.buffers:
            return sampling.guide_apg(v["cond"], v["drop_text"], v["uncond"], self.text_scale, self.audio_scale,
                                      *self.buffers, self.norm_threshold)
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
