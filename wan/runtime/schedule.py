"""How N GPUs share the guidance passes of a sampling step.

A step runs the DiT 1 to 3 times (`wan.generation.sampling.guidance_branches`) and combines the velocities. On one GPU
the passes run one after the other. On N GPUs a step runs in rounds (a `Schedule`): in each round the workers form
`Split.groups` groups of `Split.degree` GPUs, and each group runs one of the step's passes, sequence-parallel over its
GPUs, all groups at the same time; the driver combines the velocities and sends the next latent to every worker.

Which schedule is fastest depends on the passes per step and on how well a pass scales with the sequence degree, so
it is chosen from measured pass times (`choose_schedule`): e.g. 2 GPUs run the 2 passes of `fast` one per GPU, and
the 3 passes of `quality` as two passes one per GPU, then the third over both GPUs (a 3.2 s pass on one H200 and
1.8 s on two: 5.0 s a step, against 5.4 s for all three over both GPUs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


# A step's rounds: each round runs the step's next `groups` passes at once, one per group; the last split repeats
# while passes remain, so `(Split(2, 1),)` runs 3 passes as 2 (one per GPU), then 1.
Schedule = tuple[Split, ...]


def describe(schedule: Schedule) -> str:
    return " then ".join(map(str, schedule))


def schedule_rounds(schedule: Schedule, branches: tuple[str, ...]) -> list[tuple[Split, tuple[str, ...]]]:
    """(split, the branches of that round, one per group in group order) for every round the branches need."""
    rounds, start = [], 0
    while start < len(branches):
        split = schedule[min(len(rounds), len(schedule) - 1)]
        rounds.append((split, branches[start : start + split.groups]))
        start += split.groups
    return rounds


def valid_splits(gpus: int, passes: int, heads: int) -> list[Split]:
    """Every split of at most `gpus` GPUs with at most one group per pass and a sequence degree that divides the
    heads (Ulysses gives each GPU whole heads; 40 heads: 1, 2, 4, 5, 8, ...)."""
    return [
        Split(groups, degree)
        for groups in range(1, min(passes, gpus) + 1)
        for degree in range(1, gpus // groups + 1)
        if heads % degree == 0
    ]


def candidate_schedules(gpus: int, passes: int, heads: int, degrees: set[int]) -> Iterator[Schedule]:
    """Every schedule whose rounds run exactly `passes` passes (no round with an idle group) at measured degrees."""
    if passes == 0:
        yield ()
        return
    for split in valid_splits(gpus, passes, heads):
        if split.degree in degrees:
            for rest in candidate_schedules(gpus, passes - split.groups, heads, degrees):
                yield (split, *rest)


def predicted_step_seconds(schedule: Schedule, pass_seconds: Mapping[int, float]) -> float:
    """A round takes one pass at its sequence degree; a step, the sum of its rounds."""
    return sum(pass_seconds[split.degree] for split in schedule)


def choose_schedule(gpus: int, passes: int, heads: int, pass_seconds: Mapping[int, float]) -> Schedule:
    """The schedule with the shortest predicted step, from `pass_seconds` (seconds of one pass per measured sequence
    degree); ties (within 2 %) go to the one that uses fewer GPUs, then to fewer rounds (fewer exchanges), then to
    the one with its widest rounds first."""
    candidates = list(candidate_schedules(gpus, passes, heads, set(pass_seconds)))
    if not candidates:
        raise ValueError(f"no measured sequence degree in {sorted(pass_seconds)} fits {gpus} GPUs and {heads} heads")
    fastest = min(predicted_step_seconds(s, pass_seconds) for s in candidates)
    near = [s for s in candidates if predicted_step_seconds(s, pass_seconds) <= fastest * 1.02]
    return min(near, key=lambda s: (max(split.gpus for split in s), len(s), [-split.groups for split in s]))
