"""The product's presets: each owns its steps, guidance, TeaCache, VAE precision, LoRA and shift per resolution, per
model; a user's choices on top of one become the library's `SamplingOptions`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from wan.configs import INFINITETALK_MOTION_FRAME
from wan.generation.request import GuidanceOptions, Model, SamplingOptions

FAST_LORA = "lightx2v"  # lightx2v's step-distillation LoRA, fetched by setup (`service.weights.resolve_fast_lora`)


@dataclass(frozen=True)
class Preset:
    steps: int
    shift: Mapping[str, float]  # flow shift per resolution
    text_scale: float
    audio_scale: float
    teacache_thresh: float | None  # None: off
    # The reference decodes in float32. bfloat16 (with channels-last) takes about half the time a clip, 1.5 %
    # (relative L2) from float32, as far as the bf16 DiT is from its float32 self (bench/RESULTS.md).
    vae_dtype: torch.dtype = torch.float32
    lora: str | None = None  # FAST_LORA, merged while the preset runs


_MULTITALK = {
    # The reference CLI recipe: 40 steps, 3 passes each, no caching; shift 7 at 480p and 11 at 720p (both CLIs).
    "quality": Preset(
        steps=40, shift={"480p": 7.0, "720p": 11.0}, text_scale=5.0, audio_scale=4.0, teacache_thresh=None
    ),
    # cog-MultiTalk's turbo guidance and shift; TeaCache at the top of the reference README's useful range (0.2-0.5)
    # instead of cog-MultiTalk's 0.8, which skips so many steps that lips lose sync.
    "turbo": Preset(
        steps=40,
        shift={"480p": 5.0, "720p": 5.0},
        text_scale=3.0,
        audio_scale=3.0,
        teacache_thresh=0.5,
        vae_dtype=torch.bfloat16,
    ),
    # The step-distilled LoRA (4 steps): text guidance off (2 passes per step), light audio guidance.
    "fast": Preset(
        steps=4,
        shift={"480p": 5.0, "720p": 5.0},
        text_scale=1.0,
        audio_scale=2.0,
        teacache_thresh=None,
        vae_dtype=torch.bfloat16,
        lora=FAST_LORA,
    ),
}
# InfiniteTalk runs MultiTalk's recipes over its own audio layers.
PRESETS: dict[Model, dict[str, Preset]] = {"multitalk": _MULTITALK, "infinitetalk": _MULTITALK}
PRESET_NAMES = tuple(_MULTITALK)


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

    @property
    def settings(self) -> Preset:
        return PRESETS[self.model][self.preset]


def sampling_options(recipe: Recipe, max_frames: int | None, seed: int) -> SamplingOptions:
    """The preset's steps, shift and guidance with the user's overrides; InfiniteTalk's motion frames."""
    preset = recipe.settings
    return SamplingOptions(
        model=recipe.model,
        size_bucket=recipe.size_bucket,
        motion_frame=INFINITETALK_MOTION_FRAME if recipe.model == "infinitetalk" else 25,
        max_frames=max_frames,
        steps=recipe.steps or preset.steps,
        shift=preset.shift[recipe.resolution],
        text_scale=preset.text_scale if recipe.text_scale is None else recipe.text_scale,
        audio_scale=preset.audio_scale if recipe.audio_scale is None else recipe.audio_scale,
        seed=seed,
        color_correction=recipe.color_correction,
        vae_dtype=preset.vae_dtype,
        guidance=GuidanceOptions(
            use_teacache=preset.teacache_thresh is not None,
            teacache_thresh=preset.teacache_thresh or 0.0,
            use_apg=recipe.use_apg,
        ),
    )
