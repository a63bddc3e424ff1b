"""Model configuration as data: the DiT config, aspect-ratio buckets and constants.

Field names follow the published `config.json` of Wan2.1-I2V-14B-480P and the constructor of the reference
`WanModel`, so a config file or a golden `case.json` maps onto `DiTConfig` without renaming.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The MultiTalk DiT (Wan2.1-I2V-14B + audio layers). Defaults are the published 14B model."""

    model_type: str = "i2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 36
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # MultiTalk audio layers; not in the published config.json, so the reference's constructor defaults apply.
    audio_window: int = 5
    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32
    vae_scale: int = 4
    norm_input_visual: bool = True
    norm_output_audio: bool = True
    # Fixed in the reference code rather than in any config file.
    clip_dim: int = 1280
    audio_layers: int = 12
    audio_channels: int = 768
    class_range: int = 24
    class_interval: int = 4

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiTConfig":
        """Build from a config.json-style dict; keys starting with `_` (diffusers metadata) are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"unknown DiT config keys {unknown}")
        kwargs = {k: v for k, v in values.items() if k in fields}
        for key in ("patch_size", "window_size"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        config = cls(**kwargs)
        if config.model_type != "i2v":
            raise ValueError(f"MultiTalk needs an i2v DiT, config says model_type={config.model_type!r}")
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


MULTITALK_14B = DiTConfig()

NUM_TRAIN_TIMESTEPS = 1000
VAE_STRIDE = (4, 8, 8)
FPS = 25  # the video's frame rate: the audio embedding has one frame per video frame

DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)

# Aspect-ratio buckets: key (h / w) -> [h, w] in pixels. Ties go to the first key in this order.
# fmt: off
ASPECT_RATIO_BUCKETS: dict[str, dict[str, list[int]]] = {
    "multitalk-480": {
        "0.26": [320, 1216], "0.38": [384, 1024], "0.50": [448, 896], "0.67": [512, 768],
        "0.82": [576, 704], "1.00": [640, 640], "1.22": [704, 576], "1.50": [768, 512],
        "1.86": [832, 448], "2.00": [896, 448], "2.50": [960, 384], "2.83": [1088, 384],
        "3.60": [1152, 320], "3.80": [1216, 320], "4.00": [1280, 320],
    },
    "multitalk-720": {
        "0.22": [448, 2048], "0.29": [512, 1792], "0.36": [576, 1600], "0.45": [640, 1408],
        "0.55": [704, 1280], "0.63": [768, 1216], "0.76": [832, 1088], "0.88": [896, 1024],
        "1.00": [960, 960], "1.14": [1024, 896], "1.31": [1088, 832], "1.50": [1152, 768],
        "1.58": [1216, 768], "1.82": [1280, 704], "1.91": [1344, 704], "2.20": [1408, 640],
        "2.30": [1472, 640], "2.67": [1536, 576], "2.89": [1664, 576], "3.62": [1856, 512],
        "3.75": [1920, 512],
    },
}
# fmt: on

# InfiniteTalk names the same tables after itself.
ASPECT_RATIO_BUCKETS["infinitetalk-480"] = ASPECT_RATIO_BUCKETS["multitalk-480"]
ASPECT_RATIO_BUCKETS["infinitetalk-720"] = ASPECT_RATIO_BUCKETS["multitalk-720"]

# TeaCache polynomial coefficients (highest degree first), ret-steps mode, per size bucket (InfiniteTalk: the same).
TEACACHE_COEFFICIENTS: dict[str, list[float]] = {
    "multitalk-480": [2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01],
    "multitalk-720": [8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02],
}
TEACACHE_COEFFICIENTS["infinitetalk-480"] = TEACACHE_COEFFICIENTS["multitalk-480"]
TEACACHE_COEFFICIENTS["infinitetalk-720"] = TEACACHE_COEFFICIENTS["multitalk-720"]

# VAE latent normalisation (per channel), applied on encode and inverted on decode.
# fmt: off
VAE_LATENT_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
VAE_LATENT_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]
# fmt: on

# CLIP preprocessing (OpenAI mean/std), as the reference applies it after a 224x224 bicubic squash.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CLIP_IMAGE_SIZE = 224


# InfiniteTalk's CLI default: clips overlap by 9 frames (MultiTalk's: 25).
INFINITETALK_MOTION_FRAME = 9


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the reference's `WAN_CONFIGS[task]` gives `MultiTalkPipeline`: the model and its sampling defaults."""

    dit: DiTConfig = MULTITALK_14B
    sample_neg_prompt: str = DEFAULT_NEGATIVE_PROMPT
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    sample_fps: int = FPS
    vae_stride: tuple[int, int, int] = VAE_STRIDE


# The reference's task table, so `wan.MultiTalkPipeline(config=WAN_CONFIGS["multitalk-14B"], ...)` runs unchanged.
WAN_CONFIGS = {"multitalk-14B": PipelineConfig()}
