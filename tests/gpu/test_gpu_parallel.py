"""The DiT over several GPUs (`wan.runtime.workers`, one worker process per GPU) against the plain single-GPU path
(1x1, in worker 0): the velocity of every branch of a guided step under every split GxD (G guidance groups of D GPUs,
sequence parallel inside a group) and every two-round schedule.

- A tiny DiT (2 blocks, 40 heads of 8 dims, so that every sequence degree of the 14B model exists) in float32, 1 and
  2 speakers, 3-pass steps: rel < 1e-5 (float32 rounding).
- The 14B config (40 blocks, dim 5120) in bf16 on the 81-frame 448x896 clip (32928 tokens), random weights: 3-pass
  and 2-pass steps with two speakers, 3-pass with one, at the bf16 bar of the single-GPU checks (rel < 2e-2 with one
  speaker, < 5e-2 with two: near-tie speaker routing may move a few tokens). Marked slow (a few minutes).

Needs at least 2 CUDA GPUs. Where CUDA is missing the `gpu` marker skips these; with that skip lifted the tiny part
runs on 2 CPU workers (gloo), which checks the tests themselves.
"""

from __future__ import annotations

import pytest
import torch

from bench import RandomSource, full_config, relative_error
from bench.bench_dit import FULL_CLIP, TINY_CLIP
from bench.parallel_check import SEED, TINY_40_HEADS, conditioning, step_velocities
from wan.runtime.schedule import Schedule, Split, candidate_schedules, describe, valid_splits
from wan.runtime.workers import WorkerGroup

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# Without CUDA (the marker's skip lifted): two CPU workers for the tiny part.
DEVICES = [f"cuda:{i}" for i in range(GPUS)] if GPUS else ["cpu", "cpu"]
needs_two_gpus = pytest.mark.skipif(
    0 < GPUS < 2, reason=f"the DiT over several GPUs needs at least 2 CUDA GPUs; {GPUS} visible"
)
FP32_REL_TOL = 1e-5
BF16_REL_TOL = {1: 2e-2, 2: 5e-2}  # by number of speakers, as tests/gpu/test_gpu_dit.py
ONE_GPU = (Split(1, 1),)
WORKERS = max(len(DEVICES), 2)  # the schedules are listed for at least 2, so that one GPU skips with the reason above


def schedules(gpus: int, passes: int, heads: int) -> list[Schedule]:
    """Each split for every round of a step, and each schedule of two different rounds; 1x1 left out."""
    uniform = [(split,) for split in valid_splits(gpus, passes, heads)]
    every = candidate_schedules(gpus, passes, heads, set(range(1, gpus + 1)))
    mixed = [s for s in every if len(s) == 2 and len(set(s)) > 1]
    return [s for s in uniform + mixed if s != ONE_GPU]


class Workers:
    """A started worker group and its 1x1 velocities per (speakers, passes), computed once."""

    def __init__(self, source: RandomSource, clip) -> None:
        self.source, self.clip = source, clip
        self.group = WorkerGroup(source, DEVICES)
        self.group.start()
        self.truths: dict = {}
        self.open: int | None = None  # the speakers of the clip the workers hold

    def velocities(self, speakers: int, passes: int, schedule: Schedule) -> tuple[dict, dict]:
        cond, latent = conditioning(self.source.config, self.clip, speakers)
        if self.open != speakers:
            if self.open is not None:
                self.group.end_clip()
            self.group.begin_clip(cond)
            self.open = speakers
        if (speakers, passes) not in self.truths:
            self.truths[speakers, passes] = step_velocities(self.group, ONE_GPU, cond, latent, passes)
        return step_velocities(self.group, schedule, cond, latent, passes), self.truths[speakers, passes]

    def close(self) -> None:
        self.group.close()


def assert_near(velocities: dict, truth: dict, tolerance: float, what: str) -> None:
    errors = {branch: relative_error(velocities[branch], truth[branch]) for branch in truth}
    worst = max(error["rel"] for error in errors.values())
    detail = ", ".join(f"{b} rel {e['rel']:.2g} max_abs {e['max_abs']:.2g}" for b, e in errors.items())
    assert worst < tolerance, f"{what}: {detail} (< {tolerance})"


@pytest.fixture(scope="module")
def tiny_workers():
    workers = Workers(RandomSource(TINY_40_HEADS, torch.float32, SEED), TINY_CLIP)
    yield workers
    workers.close()


@pytest.fixture(scope="module")
def full_workers():
    if not GPUS:
        pytest.skip("the 14B DiT runs on CUDA GPUs only")
    workers = Workers(RandomSource(full_config(), torch.bfloat16, SEED), FULL_CLIP)
    yield workers
    workers.close()


@needs_two_gpus
@pytest.mark.parametrize("schedule", schedules(WORKERS, 3, TINY_40_HEADS.num_heads), ids=describe)
@pytest.mark.parametrize("speakers", [1, 2])
def test_tiny_float32_step_over_the_workers_equals_one_gpu(tiny_workers, speakers, schedule):
    velocities, truth = tiny_workers.velocities(speakers, 3, schedule)
    assert_near(velocities, truth, FP32_REL_TOL, f"tiny fp32 {speakers}p 3-pass {describe(schedule)}")


FULL_CASES = [
    (speakers, passes, schedule)
    for speakers, passes in ((2, 3), (2, 2), (1, 3))
    for schedule in schedules(WORKERS, passes, full_config().num_heads)
]


@pytest.mark.slow
@needs_two_gpus
@pytest.mark.parametrize(
    "speakers, passes, schedule", FULL_CASES, ids=[f"{s}p-{p}pass-{describe(c)}" for s, p, c in FULL_CASES]
)
def test_14b_bf16_step_over_the_workers_is_near_one_gpu(full_workers, speakers, passes, schedule):
    velocities, truth = full_workers.velocities(speakers, passes, schedule)
    assert_near(velocities, truth, BF16_REL_TOL[speakers], f"14B bf16 {speakers}p {passes}-pass {describe(schedule)}")
