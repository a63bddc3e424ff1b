"""How N GPUs share the guidance passes of a sampling step.

A step runs the DiT 2 or 3 times (`wan.generation.denoise.guidance_branches`) and combines the velocities. On one GPU
the passes run one after the other. On N GPUs the workers form `Split.groups` groups of `Split.degree` GPUs: each
group runs its share of the passes (`assign_branches`), sequence-parallel over its GPUs, all groups at the same time;
the driver combines the velocities and sends the next latent to every worker.

Which split is fastest depends on the passes per step and on how well a pass scales with the sequence degree, so it
is chosen from measured pass times (`choose_split`): e.g. 2 GPUs run the 2 passes of `fast` one per GPU, and the 3
passes of `quality` sequence-parallel over both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


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
