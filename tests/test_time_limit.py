"""The request time check: the estimate from measured costs (hand-computed), the refusal and its advice, and the
runner refusing before any model work."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from support.cog_inputs import run_inputs
from service.presets import Recipe, sampling_options
from service.settings import GPUS_ENV, Settings
from service.talking_video import WeightSwitches
from service.time_limit import Budget, check_time
from wan.generation.estimate import Costs, estimate_seconds, tokens_of
from wan.generation.plan import plan_generation

# What an H200 measured in its warm-up (bench/RESULTS.md).
H200 = Costs(pass_seconds=3.2307, tokens=32928, clip_seconds=4.559, pixels=448 * 896, frames=81, text_seconds=0.0886)
WIDE = (1440, 2560)  # a 16:9 source: the 448x896 bucket


def recipe(preset: str) -> Recipe:
    return Recipe(preset=preset, model="multitalk", resolution="480p", size_bucket="multitalk-480")


def plan(options, frames: int = 250, hw=WIDE, computed_steps=None):
    return plan_generation(frames, hw, options, options.steps if computed_steps is None else computed_steps)


def test_estimate_is_clips_times_passes_at_the_warm_up_shape():
    fast = sampling_options(recipe("fast"), None, 0)
    fast_plan = plan(fast)  # 10 s: 5 clips of 81 frames at 448x896
    assert fast_plan.clips.clips == 5 and (fast_plan.height, fast_plan.width) == (448, 896)
    assert tokens_of(81, 448, 896) == 21 * 28 * 56 == H200.tokens
    # 4 steps x 2 passes (fast): 0.0886 + 5 x (4.559 + 8 x 3.2307)
    assert estimate_seconds(H200, fast_plan) == pytest.approx(0.0886 + 5 * (4.559 + 8 * 3.2307))
    # Twice the tokens: the linear half twice, the attention half four times; twice the pixels for the VAE.
    quality = dataclasses.replace(sampling_options(recipe("quality"), None, 0), size_bucket={"1.00": [896, 896]})
    doubled = estimate_seconds(H200, plan(quality, hw=(896, 896)))
    assert doubled == pytest.approx(0.0886 + 5 * (2 * 4.559 + 120 * 3.2307 * (0.51 * 2 + 0.49 * 4)))


def test_a_request_over_the_limit_is_refused_with_what_fits():
    options = sampling_options(recipe("quality"), 1000, 1)
    with pytest.raises(ValueError) as refused:
        check_time(H200, plan(options), WIDE, recipe("quality"), options)
    message = str(refused.value)
    # The length, the estimate with its margin (5 x (4.56 + 120 x 3.23) s = 1961 s; x 1.1 + 60 s = 37 min), the limit
    # and what fits: 8 s are 4 clips, 1569 s; x 1.1 + 60 s = 1786 s.
    for part in ("10.0 s of video", "about 37 min", "30 min limit", "the fast preset", "at most 8 s of audio"):
        assert part in message, message
    fast = sampling_options(recipe("fast"), 1000, 1)
    assert check_time(H200, plan(fast), WIDE, recipe("fast"), fast) == pytest.approx(152.11, abs=0.01)
    assert check_time(H200, plan(options), WIDE, recipe("quality"), options, Budget(2300)) < 2300
    with pytest.raises(ValueError, match="about 37 min"):
        check_time(H200, plan(options), WIDE, recipe("quality"), options, Budget(2200))  # 2217 s needed


def test_speech_from_text_over_the_limit_names_the_text():
    options = sampling_options(recipe("quality"), 1000, 1)
    with pytest.raises(ValueError) as refused:
        check_time(H200, plan(options), WIDE, recipe("quality"), options, speech_input="text")
    message = str(refused.value)
    assert message.startswith("text: 10.0 s of video would take about 37 min"), message
    assert "a text that speaks at most 8 s (num_frames=194) with this preset" in message


def test_a_weight_switch_counts_and_advice_names_only_what_the_runner_can_run():
    fast = sampling_options(recipe("fast"), 1000, 1)  # 152.1 s x 1.1 + 60 s = 227.3 s
    assert check_time(H200, plan(fast), WIDE, recipe("fast"), fast, Budget(260)) == pytest.approx(152.11, abs=0.01)
    with pytest.raises(ValueError, match="about 4 min"):  # + 35 s to switch the weights: 262.3 s
        check_time(H200, plan(fast), WIDE, recipe("fast"), fast, Budget(260, switch_seconds=35))
    quality = sampling_options(recipe("quality"), 1000, 1)
    with pytest.raises(ValueError) as refused:  # without the fast LoRA there is no fast preset to advise
        check_time(H200, plan(quality), WIDE, recipe("quality"), quality, presets=("quality", "turbo"))
    assert "fast" not in str(refused.value) and "at most 8 s of audio" in str(refused.value)


def test_teacache_skips_known_ahead_are_taken_off_the_estimate():
    turbo = sampling_options(recipe("turbo"), 1000, 1)
    quality = sampling_options(recipe("quality"), 1000, 1)
    skips = lambda options: 18 if options.guidance.use_teacache else options.steps  # noqa: E731 (18 of 40 run)
    # 10 s of turbo: 5 x (4.559 + 18 steps x 3 passes x 3.2307) + 0.0886 = 895.2 s, where all 40 steps (1961 s) would
    # be refused.
    assert check_time(H200, plan(turbo, computed_steps=skips(turbo)), WIDE, recipe("turbo"), turbo) == pytest.approx(
        0.0886 + 5 * (4.559 + 18 * 3 * 3.2307)
    )
    with pytest.raises(ValueError, match="about 37 min"):
        check_time(H200, plan(turbo), WIDE, recipe("turbo"), turbo)
    # A quality request over the limit is pointed to turbo as well as fast; each preset's steps are asked for once,
    # however many lengths the advice tries.
    asked = []

    def counted(options):
        asked.append(options)
        return skips(options)

    with pytest.raises(ValueError, match="use the turbo or fast preset"):
        check_time(
            H200,
            plan(quality, computed_steps=counted(quality)),
            WIDE,
            recipe("quality"),
            quality,
            computed_steps=counted,
        )
    assert len(asked) == 3


def test_the_runner_refuses_before_any_model_work_and_stays_ready(runner, monkeypatch):
    service = runner.service
    merged = list(service.pipeline.dit.weights.loras.active)
    monkeypatch.setattr(service, "max_seconds", 1e-3)
    inputs = run_inputs(image="examples/two_people.png", audio="examples/person1.wav", fast=True, seed=1)
    with pytest.raises(ValueError, match=r"audio: 2.0 s of video would take about .* limit"):
        runner.run(**inputs)
    assert service.pipeline.dit.weights.loras.active == merged  # the fast LoRA was not merged
    monkeypatch.undo()
    assert runner.run(**inputs).exists()


def test_gpus_default_to_every_visible_one_and_the_setting_takes_fewer():
    assert Settings.from_env({}).gpus_to_use(4) == 4 and Settings.from_env({}).gpus_to_use(0) == 1
    assert Settings.from_env({GPUS_ENV: "1"}).gpus_to_use(4) == 1
    for bad in ("5", "0", "two"):
        with pytest.raises(ValueError, match=f"{GPUS_ENV}='{bad}'.*1 to 4"):
            Settings.from_env({GPUS_ENV: bad}).gpus_to_use(4)


def test_a_switch_is_counted_when_the_request_needs_other_weights(runner, monkeypatch):
    switches = WeightSwitches(audio_layers_seconds=30.0, loras_seconds=5.0)
    dit = SimpleNamespace(active_audio_layers="multitalk", active_loras=())
    assert switches.seconds(dit, "multitalk", []) == 0.0
    assert switches.seconds(dit, "multitalk", [(Path("a.safetensors"), 1.0)]) == 5.0
    assert switches.seconds(dit, "infinitetalk-single", []) == 30.0
    # The runner replaces the prior by what its switches take (a tiny LoRA: far less than the prior's 40 s).
    monkeypatch.setattr(runner.service, "switches", WeightSwitches())
    runner.run(**run_inputs(image="examples/two_people.png", audio="examples/person1.wav", fast=True, num_frames=5))
    assert runner.service.switches.loras_seconds < WeightSwitches().loras_seconds
