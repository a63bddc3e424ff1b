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


# Shift per resolution, as both reference CLIs set it when none is given (7 at 480p, 11 at 720p).
_REFERENCE_SHIFT = {"480p": 7.0, "720p": 11.0}

_MULTITALK = {
    # The reference CLI recipe (generate_multitalk.py): 40 steps, text 5 and audio 4, 3 passes each, no caching.
    "quality": Preset(steps=40, shift=_REFERENCE_SHIFT, text_scale=5.0, audio_scale=4.0, teacache_thresh=None),
    # zsxkib/cog-MultiTalk's turbo guidance (3/3) and its shift 5 at 480p (11 at 720p, the reference's); TeaCache at
    # the top of the reference README's useful range (0.2-0.5) instead of cog-MultiTalk's 0.8, which skips so many
    # steps that lips lose sync.
    "turbo": Preset(steps=40, shift={"480p": 5.0, "720p": 11.0}, text_scale=3.0, audio_scale=3.0,
                    teacache_thresh=0.5, vae_dtype=torch.bfloat16),
    # lightx2v's step-distilled LoRA: 4 steps, text guidance off (2 passes a step), audio 2 (the reference README's
    # values after a LoRA); shift 5 at 480p (lightx2v's own Wan configs), 11 at 720p (the reference's).
    "fast": Preset(steps=4, shift={"480p": 5.0, "720p": 11.0}, text_scale=1.0, audio_scale=2.0, teacache_thresh=None,
                   vae_dtype=torch.bfloat16, lora=FAST_LORA),
}  # fmt: skip
_INFINITETALK = {
    # InfiniteTalk's CLI recipe (generate_infinitetalk.py): 40 steps, text 5 and audio 4, shift 7 / 11, no caching.
    "quality": Preset(steps=40, shift=_REFERENCE_SHIFT, text_scale=5.0, audio_scale=4.0, teacache_thresh=None),
    # The CLI recipe with its --use_teacache at the CLI's own threshold, 0.2.
    "turbo": Preset(steps=40, shift=_REFERENCE_SHIFT, text_scale=5.0, audio_scale=4.0, teacache_thresh=0.2,
                    vae_dtype=torch.bfloat16),
    # Its LoRA recipe (README: lightx2v takes 4 steps; text 1 and audio 2 after a LoRA; the app runs LoRAs at the
    # CLI's shift, 7 / 11).
    "fast": Preset(steps=4, shift=_REFERENCE_SHIFT, text_scale=1.0, audio_scale=2.0, teacache_thresh=None,
                   vae_dtype=torch.bfloat16, lora=FAST_LORA),
}  # fmt: skip
PRESETS: dict[Model, dict[str, Preset]] = {"multitalk": _MULTITALK, "infinitetalk": _INFINITETALK}
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
