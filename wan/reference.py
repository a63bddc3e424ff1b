"""The reference's interface: `MultiTalkPipeline(config, checkpoint_dir, ...)` and `generate(input_data, ...)`.

Only this edge takes the reference's dicts; everything past it is a typed `GenerationRequest` and `SamplingOptions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .configs import DEFAULT_NEGATIVE_PROMPT, NUM_TRAIN_TIMESTEPS
from .runtime.factory import load_pipeline
from .generation.pipeline import Pipeline
from .generation.request import GenerationRequest, GuidanceOptions, SamplingOptions
from .runtime.plans import FP8, RESIDENT


class MultiTalkPipeline:
    """The reference's `MultiTalkPipeline`: same constructor and `generate()` call pattern, over a `Pipeline`
    (`.pipeline`). Multi-GPU and quantised-checkpoint arguments are refused, not ignored."""

    def __init__(
        self,
        config: Any = None,
        checkpoint_dir: str | Path = "weights/Wan2.1-I2V-14B-480P",
        device_id: int = 0,
        rank: int = 0,
        t5_fsdp: bool = False,
        dit_fsdp: bool = False,
        use_usp: bool = False,
        t5_cpu: bool = False,
        init_on_cpu: bool = True,
        num_timesteps: int = NUM_TRAIN_TIMESTEPS,
        use_timestep_transform: bool = True,
        lora_dir: list[str] | None = None,
        lora_scales: list[float] | None = None,
        quant_dir: str | None = None,
        quant: str | None = None,
        *,
        multitalk_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        compile: bool = False,
        fp8: bool = False,
    ):
        # `init_on_cpu` needs no handling: the weights always stream to the device one tensor at a time.
        if t5_fsdp or dit_fsdp or use_usp or rank != 0:
            raise NotImplementedError("FSDP / sequence-parallel arguments: this package splits work over GPUs itself")
        if quant or quant_dir:
            raise NotImplementedError("quantised checkpoints: load the bf16 weights (fp8=True quantises them here)")
        if num_timesteps != NUM_TRAIN_TIMESTEPS or not use_timestep_transform:
            raise NotImplementedError("the sampler is the trained one: num_timesteps=1000 with the shift transform")
        loras = list(zip(lora_dir or [], lora_scales or [1.0] * len(lora_dir or [])))
        if lora_dir and len(loras) != len(lora_dir):
            raise ValueError(f"lora_scales: got {len(lora_scales)} scales for {len(lora_dir)} LoRA files")
        if device is None:
            device = f"cuda:{device_id}" if torch.cuda.is_available() else "cpu"
        plan = FP8 if fp8 else RESIDENT
        self.pipeline: Pipeline = load_pipeline(
            checkpoint_dir,
            multitalk_dir,
            device=device,
            dtype=dtype,
            compile=compile,
            memory_plan=dataclasses.replace(plan, text_encoder="cpu") if t5_cpu else plan,
            loras=loras,
            negative_prompt=getattr(config, "sample_neg_prompt", None) or DEFAULT_NEGATIVE_PROMPT,
        )

    def generate(
        self,
        input_data: Mapping[str, Any],
        size_buckget: str | Mapping[str, list[int]] = "multitalk-480",
        motion_frame: int = 25,
        frame_num: int = 81,
        shift: float = 5.0,
        sampling_steps: int = 40,
        text_guide_scale: float = 5.0,
        audio_guide_scale: float = 4.0,
        n_prompt: str = "",
        seed: int = -1,
        offload_model: bool = True,
        max_frames_num: int | None = None,
        face_scale: float = 0.05,
        progress: bool = True,
        color_correction_strength: float = 0.0,
        extra_args: Any = None,
    ) -> torch.Tensor:
        """Video `[3, frames, H, W]` in [-1, 1] at 25 fps.

        `input_data`: `prompt`, `cond_image` (path or PIL image), `cond_audio` (`{"person1": ..., "person2": ...}`:
        `[frames, layers, channels]` embeddings or paths of saved ones), optional `bbox` (`{"person1": [x1, y1, x2,
        y2], ...}` in source-image pixels, x = column). The video is as long as person 1's audio unless
        `max_frames_num` asks for fewer frames. A mapping for `size_buckget` is a custom table `{"h/w": [h, w]}`.
        `offload_model` has no effect: where each model lives is the memory plan chosen at load (`wan.runtime.plans`), which
        keeps everything resident on a card that holds it and parks or streams weights on smaller ones.
        """
        options = SamplingOptions(
            size_bucket=size_buckget,
            frame_num=frame_num,
            motion_frame=motion_frame,
            max_frames=max_frames_num,
            steps=sampling_steps,
            shift=shift,
            text_scale=text_guide_scale,
            audio_scale=audio_guide_scale,
            seed=seed,
            face_scale=face_scale,
            color_correction=color_correction_strength,
            guidance=guidance_options(extra_args),
        )
        return self.pipeline.generate(request_from_input_data(input_data, n_prompt), options, progress=progress)


def guidance_options(extra_args: Any) -> GuidanceOptions:
    """The reference's `extra_args` (an argparse namespace or a mapping; None: all off) as `GuidanceOptions`."""
    if extra_args is None:
        return GuidanceOptions()
    get = extra_args.get if isinstance(extra_args, Mapping) else lambda k, d: getattr(extra_args, k, d)
    defaults = GuidanceOptions()
    return GuidanceOptions(**{f: get(f, getattr(defaults, f)) for f in GuidanceOptions.__dataclass_fields__})


def request_from_input_data(input_data: Mapping[str, Any], negative_prompt: str = "") -> GenerationRequest:
    audio = input_data.get("cond_audio") or {}
    names = sorted(audio)
    boxes = input_data.get("bbox")
    if boxes:
        missing = [name for name in names if name not in boxes]
        if missing:
            raise ValueError(f"bbox: no box for {', '.join(missing)}; give one [x1, y1, x2, y2] box per speaker")
        boxes = tuple(tuple(boxes[name]) for name in names)
    return GenerationRequest(
        prompt=input_data.get("prompt", ""),
        image=_load_image(input_data["cond_image"]),
        audio=tuple(_load_embedding(audio[name]) for name in names),
        boxes=boxes or None,
        negative_prompt=negative_prompt,
    )


def _load_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"cond_image: cannot read {image!r} as an image ({error})") from error


def _load_embedding(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.load(value, map_location="cpu", weights_only=True)
