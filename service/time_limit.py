"""A request's time, estimated from its plan before any model work, against Replicate's limit for one prediction;
a request that would not finish inside it is refused with what would fit.

What counts: the model time of the plan (`wan.generation.estimate`: the costs measured at start, the passes that
run), plus a weight switch when the request needs other weights than the DiT holds (measured at start too), with a
margin: the estimate has held to 5 % of the model time (bench/RESULTS.md), so it is taken 10 % high, and a minute is
kept for what it leaves out (decoding the inputs, wav2vec2, the last clip's mp4, the response).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from wan.configs import FPS
from wan.generation.estimate import Costs, estimate_seconds
from wan.generation.plan import GenerationPlan, plan_generation
from wan.generation.request import SamplingOptions

from .presets import PRESET_NAMES, Recipe, sampling_options

log = logging.getLogger(__name__)

MAX_REQUEST_SECONDS = 1800.0  # Replicate's limit for one prediction
ESTIMATE_MARGIN = 1.10  # the model-time estimate, taken this much high
RESERVED_SECONDS = 60.0  # what the estimate leaves out
ComputedSteps = Callable[[SamplingOptions], int]  # `Pipeline.computed_steps` for the request's weights


@dataclass(frozen=True)
class Budget:
    """What a request may take: `limit` seconds, of which `switch_seconds` go to changing the DiT's weights."""

    limit: float = MAX_REQUEST_SECONDS
    switch_seconds: float = 0.0

    def needed(self, model_seconds: float) -> float:
        """The seconds a request with this model time is counted at."""
        return model_seconds * ESTIMATE_MARGIN + self.switch_seconds + RESERVED_SECONDS

    def fits(self, model_seconds: float) -> bool:
        return self.needed(model_seconds) <= self.limit


def check_time(
    costs: Costs,
    plan: GenerationPlan,
    source_hw: tuple[int, int],
    recipe: Recipe,
    options: SamplingOptions,
    budget: Budget = Budget(),
    computed_steps: ComputedSteps | None = None,
    presets: Collection[str] = PRESET_NAMES,
    speech_input: str = "audio",
) -> float:
    """The request's estimated model seconds; a ValueError that says what fits if the request would not finish in
    the budget, naming `speech_input` (the input the video's length comes from: `audio`, or `text` once spoken). The
    advice plans the same audio with the other `presets` this runner can run, and shorter audio with this one
    (`computed_steps`: the steps of a clip whose passes run, asked once per preset; default: every step)."""
    seconds = estimate_seconds(costs, plan)
    switch = f" + {budget.switch_seconds:.0f} s to switch weights" if budget.switch_seconds else ""
    log.info("estimate: %.1f s%s for %.1f s of video (%s)", seconds, switch, plan.frames / FPS, recipe.preset)
    if budget.fits(seconds):
        return seconds

    steps_of: dict[int, int] = {id(options): plan.computed_steps}

    def estimate(other: SamplingOptions, frames: int) -> float:
        if id(other) not in steps_of:  # TeaCache's prediction runs the time embedding, maybe in the DiT workers
            steps_of[id(other)] = computed_steps(other) if computed_steps is not None else other.steps
        return estimate_seconds(costs, plan_generation(frames, source_hw, other, steps_of[id(other)]))

    others = {
        name: sampling_options(replace(recipe, preset=name, steps=None), options.max_frames, 0)
        for name in PRESET_NAMES
        if name != recipe.preset and name in presets
    }
    fits = [name for name, other in others.items() if budget.fits(estimate(other, plan.speech_frames))]
    frames = plan.speech_frames
    while frames > 1 and not budget.fits(estimate(options, frames)):
        frames = max(1, frames - (options.frame_num - options.motion_frame))
    advice = []
    if fits:
        advice.append(f"the {' or '.join(fits)} preset")
    if budget.fits(estimate(options, frames)):
        shorter = "a text that speaks at most {} s" if speech_input == "text" else "at most {} s of audio"
        advice.append(f"{shorter.format(f'{frames / FPS:.0f}')} (num_frames={frames}) with this preset")
    raise ValueError(
        f"{speech_input}: {plan.frames / FPS:.1f} s of video would take about {_duration(budget.needed(seconds))} "
        f"here (with a margin), over the {_duration(budget.limit)} limit; use "
        f"{', or '.join(advice) or f'a shorter {speech_input}'}"
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
