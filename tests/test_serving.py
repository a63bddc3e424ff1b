"""The request time check: the estimate from measured costs (hand-computed), the refusal and its advice, and the
runner refusing before any model work."""

import pytest

from conftest import run_inputs
from wan.generation.estimate import Costs, estimate_seconds, tokens_of
from wan.generation.clips import plan_clips
from wan.serving import GPUS_ENV, Recipe, check_time, gpus_to_use, sampling_options

# What an H200 measured in its warm-up (bench/NOTES.md, session 3).
H200 = Costs(pass_seconds=3.2307, tokens=32928, clip_seconds=4.559, pixels=448 * 896, frames=81, text_seconds=0.0886)


def recipe(preset: str) -> Recipe:
    return Recipe(preset=preset, model="multitalk", resolution="480p", size_bucket="multitalk-480")


def test_estimate_is_clips_times_passes_at_the_warm_up_shape():
    plan = plan_clips(250, 81, 25)  # 10 s: 5 clips of 81 frames
    assert tokens_of(81, 448, 896) == 21 * 28 * 56 == H200.tokens
    # 4 steps x 2 passes (fast): 0.0886 + 5 x (4.559 + 8 x 3.2307)
    assert estimate_seconds(H200, plan, 448, 896, 4, 1.0) == pytest.approx(0.0886 + 5 * (4.559 + 8 * 3.2307))
    # Twice the tokens: the linear half twice, the attention half four times; twice the pixels for the VAE.
    doubled = estimate_seconds(H200, plan_clips(250, 81, 25), 896, 896, 40, 5.0)
    assert doubled == pytest.approx(0.0886 + 5 * (2 * 4.559 + 120 * 3.2307 * (0.51 * 2 + 0.49 * 4)))


def test_a_request_over_the_limit_is_refused_with_what_fits():
    options = sampling_options(recipe("quality"), 1000, 1)
    with pytest.raises(ValueError) as refused:
        check_time(H200, 250, (1440, 2560), recipe("quality"), options)
    message = str(refused.value)
    # The length, the estimate (5 x (4.56 + 120 x 3.23) s = 33 min), the limit and what fits.
    for part in ("10.0 s of video", "about 33 min", "30 min limit", "the fast preset", "at most 8 s of audio"):
        assert part in message, message
    fast = sampling_options(recipe("fast"), 1000, 1)
    assert check_time(H200, 250, (1440, 2560), recipe("fast"), fast) == pytest.approx(152.11, abs=0.01)
    assert check_time(H200, 250, (1440, 2560), recipe("quality"), options, limit=2000) < 2000


def test_teacache_skips_known_ahead_are_taken_off_the_estimate():
    turbo = sampling_options(recipe("turbo"), 1000, 1)
    quality = sampling_options(recipe("quality"), 1000, 1)
    skips = lambda options: 18 if options.guidance.use_teacache else options.steps  # noqa: E731 (18 of 40 run)
    # 10 s of turbo: 5 x (4.559 + 18 steps x 3 passes x 3.2307) + 0.0886 = 895.2 s, where all 40 steps (1961 s) would
    # be refused.
    assert check_time(H200, 250, (1440, 2560), recipe("turbo"), turbo, computed_steps=skips) == pytest.approx(
        0.0886 + 5 * (4.559 + 18 * 3 * 3.2307)
    )
    with pytest.raises(ValueError, match="about 33 min"):
        check_time(H200, 250, (1440, 2560), recipe("turbo"), turbo)
    # A quality request over the limit is pointed to turbo as well as fast; each preset's steps are asked for once,
    # however many lengths the advice tries.
    asked = []
    with pytest.raises(ValueError, match="use the turbo or fast preset"):
        check_time(H200, 250, (1440, 2560), recipe("quality"), quality,
                   computed_steps=lambda options: asked.append(options) or skips(options))
    assert len(asked) == 3


def test_the_runner_refuses_before_any_model_work_and_stays_ready(runner, monkeypatch):
    merged = list(runner.pipeline.weights.loras.active)
    monkeypatch.setattr(runner, "max_seconds", 1e-3)
    inputs = run_inputs(image="examples/two_people.png", audio="examples/person1.wav", fast=True, seed=1)
    with pytest.raises(ValueError, match=r"audio: 2.0 s of video would take about .* limit"):
        runner.run(**inputs)
    assert runner.pipeline.weights.loras.active == merged  # the fast LoRA was not merged
    monkeypatch.undo()
    try:
        assert runner.run(**inputs).exists()
    finally:
        runner.pipeline.set_weights("multitalk", [])  # the shared runner as the other tests expect it: no LoRA


def test_gpus_default_to_every_visible_one_and_the_setting_takes_fewer(monkeypatch):
    monkeypatch.delenv(GPUS_ENV, raising=False)
    assert gpus_to_use(4) == 4 and gpus_to_use(0) == 1
    monkeypatch.setenv(GPUS_ENV, "1")
    assert gpus_to_use(4) == 1
    for bad in ("5", "0", "two"):
        monkeypatch.setenv(GPUS_ENV, bad)
        with pytest.raises(ValueError, match=f"{GPUS_ENV}='{bad}'.*1 to 4"):
            gpus_to_use(4)


def test_the_speed_presets_decode_in_bfloat16_and_quality_as_the_reference():
    import torch

    dtypes = {name: sampling_options(recipe(name), None, 0).vae_dtype for name in ("fast", "turbo", "quality")}
    assert dtypes == {"fast": torch.bfloat16, "turbo": torch.bfloat16, "quality": torch.float32}
