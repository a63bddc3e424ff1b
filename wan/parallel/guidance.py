"""The guidance passes of one sampling step, and how N GPUs share them.

A step runs the DiT 2 or 3 times (`guidance_branches`) and combines the velocities (`combine`). On one GPU the
passes run one after the other (`sequential_velocities`). On N GPUs the workers form `Split.groups` groups of
`Split.degree` GPUs: each group runs its share of the passes (`assign_branches`), sequence-parallel over its GPUs, all
groups at the same time; the driver combines the velocities and sends the next latent to every worker.

Which split is fastest depends on the passes per step and on how well a pass scales with the sequence degree, so it
is chosen from measured pass times (`choose_split`): e.g. 2 GPUs run the 2 passes of `fast` one per GPU, and the 3
passes of `quality` sequence-parallel over both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import sampling
from ..dit import BlockCache, MultiTalkDiT
from .sequence import SequenceParallel


@dataclass(frozen=True)
class Split:
    """`groups` guidance groups of `degree` GPUs each (sequence parallel inside a group)."""

    groups: int
    degree: int

    @property
    def gpus(self) -> int:
        return self.groups * self.degree

    def __str__(self) -> str:
        return f"{self.groups}x{self.degree}"


@dataclass(frozen=True)
class ClipConditioning:
    """Everything the DiT sees of one clip besides the latent and the timestep (tensors on one device)."""

    context: torch.Tensor  # prompt, [L_txt, text_dim]
    context_null: torch.Tensor  # negative prompt
    clip_fea: torch.Tensor
    y: torch.Tensor
    audio: torch.Tensor  # [speakers, frames, window, layers, channels]
    masks: torch.Tensor

    def to(self, device: torch.device | str) -> "ClipConditioning":
        return ClipConditioning(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def branch_inputs(self, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(text context, audio) of a guidance branch; a dropped audio is one silent speaker, as the reference."""
        if branch not in sampling.GUIDANCE_BRANCHES:
            raise ValueError(f"unknown guidance branch {branch!r}; expected one of {sampling.GUIDANCE_BRANCHES}")
        text = self.context_null if branch in ("drop_text", "uncond") else self.context
        audio = torch.zeros_like(self.audio[-1:]) if branch in ("drop_audio", "uncond") else self.audio
        return text, audio


def guidance_branches(text_scale: float) -> tuple[str, ...]:
    """The DiT passes of one step: (cond, drop_audio) without text guidance, else (cond, drop_text, uncond)."""
    return ("cond", "drop_audio") if sampling.passes_per_step(text_scale) == 2 else ("cond", "drop_text", "uncond")


def branch_velocity(
    dit: MultiTalkDiT,
    latent: torch.Tensor,
    t: torch.Tensor,
    cond: ClipConditioning,
    branch: str,
    cache: BlockCache | None = None,
    parallel: SequenceParallel | None = None,
) -> torch.Tensor:
    text, audio = cond.branch_inputs(branch)
    sequence = {} if parallel is None else dict(parallel=parallel)
    return dit(latent, t, text, cond.clip_fea, cond.y, audio, cond.masks, cache=cache, **sequence)


def sequential_velocities(
    dit: MultiTalkDiT,
    latent: torch.Tensor,
    t: torch.Tensor,
    cond: ClipConditioning,
    branches: tuple[str, ...],
    teacache: sampling.TeaCache | None = None,
) -> dict[str, torch.Tensor]:
    """One GPU: the passes of a step one after the other, in branch order."""
    return {
        branch: branch_velocity(dit, latent, t, cond, branch, teacache.branch(branch) if teacache else None)
        for branch in branches
    }


def combine(
    velocities: Mapping[str, torch.Tensor],
    text_scale: float,
    audio_scale: float,
    apg_buffers: list[sampling.MomentumBuffer] | None = None,
    apg_norm_threshold: float = 55.0,
) -> torch.Tensor:
    """The guided velocity from the passes of `guidance_branches(text_scale)` (plain CFG, or APG with buffers)."""
    v = velocities
    if "drop_audio" in v:
        if apg_buffers:
            return sampling.guide_apg_audio_only(
                v["cond"], v["drop_audio"], audio_scale, apg_buffers[1], apg_norm_threshold
            )
        return sampling.guide_audio_only(v["cond"], v["drop_audio"], audio_scale)
    if apg_buffers:
        return sampling.guide_apg(
            v["cond"], v["drop_text"], v["uncond"], text_scale, audio_scale, *apg_buffers, apg_norm_threshold
        )
    return sampling.guide(v["cond"], v["drop_text"], v["uncond"], text_scale, audio_scale)


def assign_branches(branches: tuple[str, ...], groups: int) -> tuple[tuple[str, ...], ...]:
    """The branches each group runs: round robin, so no group runs more than ceil(passes / groups)."""
    return tuple(branches[group::groups] for group in range(groups))


def valid_splits(gpus: int, passes: int, heads: int) -> list[Split]:
    """Every split of at most `gpus` GPUs that can run `passes` passes a step: at most one group per pass, and a
    sequence degree that divides the heads (Ulysses gives each GPU whole heads; 40 heads: 1, 2, 4, 5, 8, ...)."""
    return [
        Split(groups, degree)
        for groups in range(1, min(passes, gpus) + 1)
        for degree in range(1, gpus // groups + 1)
        if heads % degree == 0
    ]


def predicted_step_seconds(split: Split, passes: int, pass_seconds: Mapping[int, float]) -> float:
    """A step takes as long as its busiest group: ceil(passes / groups) passes at that sequence degree."""
    return math.ceil(passes / split.groups) * pass_seconds[split.degree]


def choose_split(gpus: int, passes: int, heads: int, pass_seconds: Mapping[int, float]) -> Split:
    """The split with the shortest predicted step, from `pass_seconds` (seconds of one pass per measured sequence
    degree); ties (within 2 %) go to the split that uses fewer GPUs, then to the fewer groups."""
    candidates = [s for s in valid_splits(gpus, passes, heads) if s.degree in pass_seconds]
    if not candidates:
        raise ValueError(f"no measured sequence degree in {sorted(pass_seconds)} fits {gpus} GPUs and {heads} heads")
    fastest = min(predicted_step_seconds(s, passes, pass_seconds) for s in candidates)
    near = [s for s in candidates if predicted_step_seconds(s, passes, pass_seconds) <= fastest * 1.02]
    return min(near, key=lambda s: (s.gpus, s.groups))
