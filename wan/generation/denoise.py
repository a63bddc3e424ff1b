"""One clip's sampling: the guided velocity (2 or 3 DiT passes a step, CFG or APG, TeaCache) and the Euler loop
with the motion latent held in place."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Branch:
    """One guidance pass: which text and audio the DiT gets."""

    name: str  # one of sampling.GUIDANCE_BRANCHES
    context: torch.Tensor
    audio: torch.Tensor


class GuidedVelocity:
    """The guided velocity of one clip. Three passes a step (cond, drop_text, uncond) combine text and audio guidance;
    with text scale 1, two (cond, drop_audio). The silent passes get ONE all-zero speaker, as the reference. APG
    momentum and TeaCache state live here, so they start fresh every clip."""

    def __init__(
        self,
        dit: Callable[..., torch.Tensor],
        inputs: ClipInputs,
        text_scale: float,
        audio_scale: float,
        guidance: GuidanceOptions,
        teacache_bucket: str,
    ):
        self.dit, self.inputs = dit, inputs
        self.text_scale, self.audio_scale = text_scale, audio_scale
        self.norm_threshold = guidance.apg_norm_threshold
        silent = torch.zeros_like(inputs.audio[-1:])
        if sampling.passes_per_step(text_scale) == 2:
            self.branches = (Branch("cond", inputs.context, inputs.audio), Branch("drop_audio", inputs.context, silent))
        else:
            self.branches = (
                Branch("cond", inputs.context, inputs.audio),
                Branch("drop_text", inputs.context_null, inputs.audio),
                Branch("uncond", inputs.context_null, silent),
            )
        self.teacache = sampling.TeaCache(guidance.teacache_thresh, teacache_bucket) if guidance.use_teacache else None
        self.buffers = None
        if guidance.use_apg:
            self.buffers = [sampling.MomentumBuffer(guidance.apg_momentum) for _ in self.branches[1:]]

    def predict(self, branch: Branch, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cache = self.teacache.branch(branch.name) if self.teacache is not None else None
        i = self.inputs
        return self.dit(latent, t, branch.context, i.clip_fea, i.y, branch.audio, i.masks, cache=cache)

    def combine(self, predictions: list[torch.Tensor]) -> torch.Tensor:
        """The guided velocity from the branches' predictions, in `self.branches` order."""
        if len(predictions) == 2:
            cond, drop_audio = predictions
            if self.buffers:
                return sampling.guide_apg_audio_only(cond, drop_audio, self.audio_scale, self.buffers[0],
                                                     self.norm_threshold)
            return sampling.guide_audio_only(cond, drop_audio, self.audio_scale)
        cond, drop_text, uncond = predictions
        if self.buffers:
            return sampling.guide_apg(cond, drop_text, uncond, self.text_scale, self.audio_scale, *self.buffers,
                                      self.norm_threshold)
        return sampling.guide(cond, drop_text, uncond, self.text_scale, self.audio_scale)

    def __call__(self, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.combine([self.predict(branch, latent, t) for branch in self.branches])


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
