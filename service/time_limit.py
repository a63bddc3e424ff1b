"""A request's time, estimated from its plan before any model work, against Replicate's limit for one prediction;
a request over it is refused with what would fit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from wan.configs import FPS
from wan.generation.estimate import Costs, estimate_seconds
from wan.generation.plan import GenerationPlan, plan_generation
from wan.generation.request import SamplingOptions

from .presets import PRESET_NAMES, Recipe, sampling_options

log = logging.getLogger(__name__)

MAX_REQUEST_SECONDS = 1800.0  # Replicate's limit for one prediction
ComputedSteps = Callable[[SamplingOptions], int]  # `Pipeline.computed_steps`


def check_time(
    costs: Costs,
    plan: GenerationPlan,
    source_hw: tuple[int, int],
    recipe: Recipe,
    options: SamplingOptions,
    limit: float = MAX_REQUEST_SECONDS,
    computed_steps: ComputedSteps | None = None,
) -> float:
    """The request's estimated seconds; a ValueError that says what fits if that is over `limit`. The advice plans
    the same audio with the other presets and shorter audio with this one (`computed_steps`: the steps of a clip whose
    passes run, asked once per preset; default: every step)."""
    seconds = estimate_seconds(costs, plan)
    log.info("estimate: %.0f s for %.1f s of video (%s)", seconds, plan.frames / FPS, recipe.preset)
    if seconds <= limit:
        return seconds

    steps_of: dict[int, int] = {id(options): plan.computed_steps}

    def estimate(other: SamplingOptions, frames: int) -> float:
        if id(other) not in steps_of:  # TeaCache's prediction runs the time embedding, maybe in the DiT workers
            steps_of[id(other)] = computed_steps(other) if computed_steps is not None else other.steps
        return estimate_seconds(costs, plan_generation(frames, source_hw, other, steps_of[id(other)]))

    others = {
        name: sampling_options(replace(recipe, preset=name, steps=None), options.max_frames, 0)
        for name in PRESET_NAMES
        if name != recipe.preset
    }
    fits = [name for name, other in others.items() if estimate(other, plan.speech_frames) <= limit]
    frames = plan.speech_frames
    while frames > 1 and estimate(options, frames) > limit:
        frames = max(1, frames - (options.frame_num - options.motion_frame))
    advice = []
    if fits:
        advice.append(f"the {' or '.join(fits)} preset")
    if estimate(options, frames) <= limit:
        advice.append(f"at most {frames / FPS:.0f} s of audio (num_frames={frames}) with this preset")
    raise ValueError(
        f"audio: {plan.frames / FPS:.1f} s of video would take about {_duration(seconds)} here, over the "
        f"{_duration(limit)} limit; use {', or '.join(advice) or 'a shorter audio'}"
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
