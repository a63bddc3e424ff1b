"""What the predictor decides per request, kept out of `predict.py`: the sampling recipe from a preset and the
user's overrides, the audio a request needs, and the time check that refuses a request before it runs."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .configs import FPS, INFINITETALK_MOTION_FRAME, PRESETS, QUALITY_SHIFT
from .generation.clips import ClipPlan, frames_read, plan_clips
from .generation.conditioning import choose_bucket
from .generation.estimate import Costs, estimate_seconds
from .generation.request import GuidanceOptions, Model, SamplingOptions

log = logging.getLogger(__name__)

MAX_REQUEST_SECONDS = 1800.0  # Replicate's limit for one prediction
GPUS_ENV = "MULTITALK_GPUS"


@dataclass(frozen=True)
class Recipe:
    """A request's sampling settings as the user chose them."""

    preset: str  # fast, turbo, quality
    model: Model
    resolution: str  # 480p, 720p
    size_bucket: str | Mapping[str, Sequence[int]]  # that resolution's bucket table (or its name)
    steps: int | None = None
    text_scale: float | None = None
    audio_scale: float | None = None
    color_correction: float = 1.0
    use_apg: bool = False


def sampling_options(recipe: Recipe, max_frames: int | None, seed: int) -> SamplingOptions:
    """The preset's steps, shift and guidance with the user's overrides; InfiniteTalk's motion frames and names."""
    preset = PRESETS[recipe.preset]
    return SamplingOptions(
        model=recipe.model,
        size_bucket=recipe.size_bucket,
        motion_frame=INFINITETALK_MOTION_FRAME if recipe.model == "infinitetalk" else 25,
        max_frames=max_frames,
        steps=recipe.steps or preset.sampling_steps,
        shift=QUALITY_SHIFT[recipe.resolution] if recipe.preset == "quality" else preset.shift,
        text_scale=preset.text_guide_scale if recipe.text_scale is None else recipe.text_scale,
        audio_scale=preset.audio_guide_scale if recipe.audio_scale is None else recipe.audio_scale,
        seed=seed,
        color_correction=recipe.color_correction,
        vae_dtype=preset_vae_dtype(recipe.preset),
        guidance=GuidanceOptions(
            use_teacache=preset.teacache_thresh is not None,
            teacache_thresh=preset.teacache_thresh or 0.0,
            use_apg=recipe.use_apg,
        ),
    )


def preset_vae_dtype(preset: str) -> torch.dtype:
    """The dtype a preset's VAE computes in (`Preset.vae_dtype`)."""
    return getattr(torch, PRESETS[preset].vae_dtype)


def gpus_to_use(visible: int) -> int:
    """Every visible GPU, or the first `MULTITALK_GPUS` of them (e.g. 1: the single-process path on a bigger host)."""
    text = os.environ.get(GPUS_ENV, "").strip()
    if not text:
        return max(1, visible)
    if not text.isdigit() or not 1 <= int(text) <= max(1, visible):
        raise ValueError(f"{GPUS_ENV}={text!r}: give a whole number from 1 to {max(1, visible)} (the visible GPUs)")
    return int(text)


def plan_request(audio_frames: int, options: SamplingOptions) -> tuple[ClipPlan, int]:
    """The clip plan for person 1's audio, and how many of its frames the plan reads (the rest need no wav2vec2)."""
    plan = plan_clips(audio_frames, options.frame_num, options.motion_frame, options.max_frames)
    return plan, min(audio_frames, frames_read(plan))


def check_time(
    costs: Costs,
    audio_frames: int,
    source_hw: tuple[int, int],
    recipe: Recipe,
    options: SamplingOptions,
    limit: float = MAX_REQUEST_SECONDS,
    computed_steps: Callable[[SamplingOptions], int] | None = None,
) -> float:
    """The request's estimated seconds; a ValueError that says what fits if that is over `limit`. `computed_steps`
    (e.g. `Pipeline.teacache_steps`): the steps of a clip whose passes run, TeaCache's skips taken off; default:
    every step."""

    steps_of: dict[int, int] = {}  # per options object: the advice below estimates each many times

    def estimate(options: SamplingOptions, frames: int) -> float:
        plan = plan_clips(frames, options.frame_num, options.motion_frame, options.max_frames)
        height, width = choose_bucket(*source_hw, options.size_bucket)
        if id(options) not in steps_of:  # TeaCache's prediction runs the time embedding, maybe in the DiT workers
            steps_of[id(options)] = computed_steps(options) if computed_steps is not None else options.steps
        return estimate_seconds(costs, plan, height, width, steps_of[id(options)], options.text_scale)

    seconds = estimate(options, audio_frames)
    length = plan_clips(audio_frames, options.frame_num, options.motion_frame, options.max_frames).total / FPS
    log.info("estimate: %.0f s for %.1f s of video (%s)", seconds, length, recipe.preset)
    if seconds <= limit:
        return seconds
    others = {name: sampling_options(replace(recipe, preset=name, steps=None), options.max_frames, 0)
              for name in PRESETS if name != recipe.preset}
    fits = [name for name, other in others.items() if estimate(other, audio_frames) <= limit]
    frames = audio_frames
    while frames > 1 and estimate(options, frames) > limit:
        frames = max(1, frames - (options.frame_num - options.motion_frame))
    advice = []
    if fits:
        advice.append(f"the {' or '.join(fits)} preset")
    if estimate(options, frames) <= limit:
        advice.append(f"at most {frames / FPS:.0f} s of audio (num_frames={frames}) with this preset")
    raise ValueError(
        f"audio: {length:.1f} s of video would take about {_duration(seconds)} here, over the {_duration(limit)} "
        f"limit; use {', or '.join(advice) or 'a shorter audio'}"
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def trimmed_samples(frames: int, sample_rate: int) -> int:
    """Samples of audio that give `frames` video frames (`int(seconds * 25)`, as the embedding counts them)."""
    return math.ceil(frames * sample_rate / FPS)
