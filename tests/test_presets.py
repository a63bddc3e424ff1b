"""The presets per model and resolution, written out from the references they follow (each preset's comment in
service/presets.py names its source)."""

import pytest
import torch

from service.presets import FAST_LORA, Recipe, sampling_options


def options(preset: str, model: str, resolution: str = "480p"):
    return sampling_options(Recipe(preset, model, resolution, f"{model}-{resolution[:-1]}"), None, 0)


@pytest.mark.parametrize("resolution, shift", [("480p", 7.0), ("720p", 11.0)])
def test_quality_is_each_reference_cli_recipe(resolution, shift):
    for model in ("multitalk", "infinitetalk"):
        quality = options("quality", model, resolution)
        assert (quality.steps, quality.text_scale, quality.audio_scale, quality.shift) == (40, 5.0, 4.0, shift)
        assert not quality.guidance.use_teacache and quality.vae_dtype == torch.float32


def test_infinitetalk_has_its_own_turbo_and_fast():
    turbo, fast = options("turbo", "infinitetalk"), options("fast", "infinitetalk", "720p")
    # The CLI recipe with --use_teacache at the CLI's default threshold.
    assert (turbo.steps, turbo.text_scale, turbo.audio_scale, turbo.shift) == (40, 5.0, 4.0, 7.0)
    assert turbo.guidance.use_teacache and turbo.guidance.teacache_thresh == 0.2
    # The LoRA recipe: lightx2v's 4 steps, text 1 and audio 2, the CLI's shift.
    assert (fast.steps, fast.text_scale, fast.audio_scale, fast.shift) == (4, 1.0, 2.0, 11.0)
    assert turbo.motion_frame == fast.motion_frame == 9


def test_multitalk_turbo_and_fast_take_the_references_shift_at_720p():
    assert options("turbo", "multitalk").shift == options("fast", "multitalk").shift == 5.0
    assert options("turbo", "multitalk", "720p").shift == options("fast", "multitalk", "720p").shift == 11.0
    turbo = options("turbo", "multitalk")
    assert (turbo.text_scale, turbo.audio_scale, turbo.guidance.teacache_thresh) == (3.0, 3.0, 0.5)


def test_only_fast_takes_the_lora():
    for model in ("multitalk", "infinitetalk"):
        loras = {name: Recipe(name, model, "480p", "").settings.lora for name in ("fast", "turbo", "quality")}
        assert loras == {"fast": FAST_LORA, "turbo": None, "quality": None}


def test_the_speed_presets_decode_in_bfloat16_and_quality_as_the_reference():
    dtypes = {name: options(name, "multitalk").vae_dtype for name in ("fast", "turbo", "quality")}
    assert dtypes == {"fast": torch.bfloat16, "turbo": torch.bfloat16, "quality": torch.float32}
