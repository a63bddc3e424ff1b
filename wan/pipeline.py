"""MultiTalkPipeline: one image, one or two audio embeddings and a prompt become a talking video.

Clip mode and streaming are one loop: the first clip is conditioned on the image, every later clip on the last
`motion_frame` frames of the previous one, until the video is as long as it must be. Randomness comes from one
`torch.Generator` seeded per call, drawn in the reference's order and shapes.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import sampling
from .attention import fastest_self_attention
from .conditioning import audio_window, choose_bucket, image_to_tensor, latent_masks, match_colors, speaker_masks
from .configs import ASPECT_RATIO_BUCKETS, DEFAULT_NEGATIVE_PROMPT, VAE_STRIDE, DiTConfig
from .parallel.guidance import (
    ClipConditioning,
    choose_split,
    combine,
    guidance_branches,
    sequential_velocities,
    valid_splits,
)
from .parallel.workers import TeaCacheSettings

log = logging.getLogger(__name__)

StepCallback = Callable[["StepInfo"], None]


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based within the clip
    steps: int
    clip: int  # 1-based
    clips: int
    elapsed: float  # seconds since generate() started


@dataclass(frozen=True)
class GuidanceOptions:
    """What the reference reads from `extra_args`: TeaCache and APG switches."""

    use_teacache: bool = False
    teacache_thresh: float = 0.2
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0

    @classmethod
    def from_extra_args(cls, extra_args: Any) -> "GuidanceOptions":
        if extra_args is None:
            return cls()
        get = extra_args.get if isinstance(extra_args, Mapping) else lambda k, d: getattr(extra_args, k, d)
        return cls(**{f: get(f, getattr(cls, f)) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class _DiTShape:
    """What the pipeline reads of a DiT that lives in worker processes."""

    config: DiTConfig
    dtype: torch.dtype


@dataclass(frozen=True)
class ClipPlan:
    """How a video is cut into clips: `frames` pixel frames per clip, each clip starting at `starts[k]` (in audio
    frames), `total` frames kept in the end. `pad_last` says whether the last clip reads past the audio and gets the
    reference's mirrored padding."""

    frames: int
    starts: tuple[int, ...]
    total: int
    pad_last: bool


def plan_clips(audio_frames: int, frame_num: int, motion_frame: int, max_frames: int | None = None) -> ClipPlan:
    """The reference's clip schedule for `audio_frames` frames of person 1's audio (the reference stops on person 1).

    - Audio longer than `frame_num` and at most `frame_num` frames wanted: one full clip, cut (clip mode).
    - Longer videos: `frame_num`-frame clips advancing by `frame_num - motion_frame`; the first clip whose end reaches
      the wanted length is the last (streaming).
    - Audio of at most `frame_num` frames (the reference rejects it): one clip of the smallest 4n+1 length covering it.
    """
    total = audio_frames if max_frames is None else min(max_frames, audio_frames)
    if total < 1:
        raise ValueError("the video needs at least one frame of audio (1/25 s)")
    if audio_frames <= frame_num:
        return ClipPlan(4 * math.ceil((total - 1) / 4) + 1, (0,), total, pad_last=True)
    if total <= frame_num:
        return ClipPlan(frame_num, (0,), total, pad_last=False)
    stride = frame_num - motion_frame
    if stride <= 0:
        raise ValueError(f"motion_frame ({motion_frame}) must be smaller than frame_num ({frame_num}) for long audio")
    clips = 1 + math.ceil((total - frame_num) / stride)
    return ClipPlan(frame_num, tuple(k * stride for k in range(clips)), total, pad_last=True)


def pad_audio(embedding: torch.Tensor, clip_end: int) -> torch.Tensor:
    """The reference's padding for the last clip: audio that ends at or before `clip_end` gets its last
    `clip_end - L + 3` frames appended in reverse (so frame L + j repeats frame L - 1 - j), which the audio windows
    of the last frames (up to `clip_end + 1`) read. Audio shorter than that appends all of itself, reversed."""
    if clip_end < embedding.shape[0]:
        return embedding
    missing = clip_end - embedding.shape[0] + 3
    return torch.cat([embedding, embedding[-missing:].flip(0)])


def _load_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"cond_image: cannot read {image!r} as an image ({error})") from error


def _load_embedding(value: Any, name: str) -> torch.Tensor:
    embedding = value if isinstance(value, torch.Tensor) else torch.load(value, map_location="cpu", weights_only=True)
    if embedding.ndim != 3 or embedding.shape[0] == 0:
        raise ValueError(f"cond_audio.{name}: expected a [frames, layers, channels] embedding, got {tuple(embedding.shape)}")
    if not torch.isfinite(embedding).all():
        raise ValueError(f"cond_audio.{name}: the embedding contains NaN or inf")
    return embedding.float()


def _bboxes(input_data: Mapping, speakers: int) -> list[list[float]] | None:
    boxes = input_data.get("bbox")
    if not boxes:
        return None
    if isinstance(boxes, Mapping):
        missing = [f"person{k + 1}" for k in range(speakers) if f"person{k + 1}" not in boxes]
        if missing:
            raise ValueError(f"bbox: no box for {', '.join(missing)}; give one [x1, y1, x2, y2] box per speaker")
        return [list(boxes[f"person{k + 1}"]) for k in range(speakers)]
    return [list(box) for box in boxes]


class MultiTalkPipeline:
    """The reference's `MultiTalkPipeline`: same constructor and `generate()` call pattern."""

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
        num_timesteps: int = 1000,
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
        gpus: int = 1,
    ):
        """`gpus` > 1: the DiT runs in one worker process per GPU (`wan.parallel`), cuda:0 .. cuda:gpus-1, with the
        split of the guidance passes and the sequence chosen from pass times measured on the first clip."""
        from .checkpoints import WanFiles, check_files, dit_tensor_reader, load_dit
        from .image_encoder import ImageEncoder
        from .text_encoder import TextEncoder
        from .vae import VideoVAE

        if t5_fsdp or dit_fsdp or use_usp or rank != 0:
            raise NotImplementedError(
                "FSDP and the reference's torchrun sequence parallel are not supported; pass gpus=N instead: this "
                "process then starts one DiT worker per GPU (sequence and guidance parallel)"
            )
        if quant or quant_dir:
            raise NotImplementedError("quantised checkpoints are not supported; use the bf16 weights (or fp8 via bench)")
        if device is None:
            device = f"cuda:{device_id}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        check_files(checkpoint_dir, multitalk_dir)
        files = WanFiles(Path(checkpoint_dir))
        workers = None
        if gpus > 1:
            from .parallel.workers import CheckpointSource, WorkerGroup, WorkerOptions, visible_devices

            if len(visible_devices()) < gpus:
                raise ValueError(f"gpus={gpus}, but only {len(visible_devices())} GPUs are visible")
            source = CheckpointSource(files.root, multitalk_dir, dtype)
            workers = WorkerGroup(source, visible_devices()[:gpus], WorkerOptions(compile=compile, fp8=fp8))
            workers.start()
            dit = _DiTShape(DiTConfig.from_json(files.config), dtype)
        else:
            dit = load_dit(files.root, multitalk_dir, dtype=dtype, device=device)
        self._setup(
            dit=dit,
            text_encoder=TextEncoder.from_checkpoint(
                files.t5, files.t5_tokenizer, text_len=dit.config.text_len, dtype=dtype, device="cpu" if t5_cpu else device
            ),
            image_encoder=ImageEncoder.from_checkpoint(
                files.clip, dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device
            ),
            vae=VideoVAE.from_checkpoint(files.vae, device=device),
            device=device,
            negative_prompt=getattr(config, "sample_neg_prompt", None) or DEFAULT_NEGATIVE_PROMPT,
            workers=workers,
        )
        if workers is None:
            # LoRA merges are undone by re-reading the touched weights from the shards: no copies held in memory.
            self._reload = dit_tensor_reader(files.root, multitalk_dir, dtype=dtype, device=device)
        if lora_dir:
            scales = list(lora_scales or [1.0] * len(lora_dir))
            if len(scales) != len(lora_dir):
                raise ValueError(f"lora_scales: got {len(scales)} scales for {len(lora_dir)} LoRA files")
            self.set_loras(list(zip(lora_dir, scales)))
        if workers is not None:
            return  # the workers chose their kernels and compiled (WorkerOptions)
        if fp8:
            from .fp8 import quantize_blocks

            quantize_blocks(dit)  # after any LoRA merge: the fp8 weights are final
        else:
            dit.set_self_attention(fastest_self_attention(device))
        log.info("DiT self-attention: %s", dit.blocks[0].self_attn.attend.__name__)
        if compile:
            dit.compile_blocks()

    @classmethod
    def from_components(
        cls,
        dit: torch.nn.Module,
        text_encoder: Callable[[list[str]], list[torch.Tensor]],
        image_encoder: Callable[[torch.Tensor], torch.Tensor],
        vae: Any,
        device: str | torch.device = "cpu",
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        workers: Any = None,
    ) -> "MultiTalkPipeline":
        """A pipeline around already-built components (tests, benchmarks, custom loading). With `workers` (a
        `wan.parallel.workers.WorkerGroup`) the DiT runs there and only `dit.config` and `dit.dtype` are read."""
        pipeline = cls.__new__(cls)
        pipeline._setup(dit, text_encoder, image_encoder, vae, torch.device(device), negative_prompt, workers)
        return pipeline

    def _setup(
        self, dit, text_encoder, image_encoder, vae, device: torch.device, negative_prompt: str, workers=None
    ) -> None:
        self.dit = dit
        self.workers = workers  # wan.parallel.workers.WorkerGroup, or None: the DiT runs in this process
        self.pass_seconds: dict[int, float] | None = None  # per sequence degree, measured on the first clip
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.vae = vae
        self.device = device
        self.negative_prompt = negative_prompt
        self.loras: list[tuple[str, float]] = []
        self._merged = None
        self._reload = None

    def close(self) -> None:
        """Stop the DiT worker processes, if any (also done when the pipeline is garbage-collected)."""
        if self.workers is not None:
            self.workers.close()

    def set_loras(self, loras: list[tuple[str | Path, float]], alpha_mode: str = "standard") -> None:
        """Make `loras` ((file, scale) pairs) the merged set: restores the exact base weights of the previous set
        first; no work when the set is unchanged."""
        from .lora import merge_loras

        wanted = [(str(path), float(scale)) for path, scale in loras]
        if wanted == self.loras:
            return
        if self.workers is not None:
            self.workers.set_loras(wanted)
            self.loras = wanted
            return
        if self._merged is not None:
            self._merged.restore()
            self._merged, self.loras = None, []
        if wanted:
            self._merged = merge_loras(self.dit, wanted, alpha_mode=alpha_mode, reload=self._reload)
            self.loras = wanted

    def warm_up(self, size_bucket: str = "multitalk-480", frame_num: int = 81) -> None:
        """One guided step on a two-speaker clip of the most common shape: compiles the one- and two-speaker graphs
        of compiled blocks (and warms kernels) before the first request. With DiT workers: measures the pass times
        that choose the split, and warms the splits chosen for 3 and for 2 passes a step."""
        config = self.dit.config
        height, width = ASPECT_RATIO_BUCKETS[size_bucket]["0.50"]
        audio = torch.zeros(frame_num, config.audio_layers, config.audio_channels)
        for text_scale in (5.0, 1.0) if self.workers is not None else (5.0,):
            self.generate(
                {"prompt": "", "cond_image": Image.new("RGB", (width, height)), "cond_audio": {"person1": audio,
                                                                                             "person2": audio}},
                size_buckget=size_bucket, frame_num=frame_num, sampling_steps=1, seed=0, progress=False,
                text_guide_scale=text_scale,
            )

    @torch.inference_mode()
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
        *,
        size_bucket: str | Mapping[str, list[int]] | None = None,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Video `[3, frames, H, W]` in [-1, 1] at 25 fps.

        `input_data`: `prompt`, `cond_image` (path or PIL image), `cond_audio` (`{"person1": ..., "person2": ...}`:
        `[frames, layers, channels]` embeddings or paths of saved ones), optional `bbox` (`{"person1": [x1, y1, x2,
        y2], ...}` in source-image pixels, x = column). The video is as long as the audio (one frame per embedding
        frame) unless `max_frames_num` asks for fewer frames. `size_bucket` is the correctly spelled alias of
        `size_buckget`; a mapping gives a custom bucket table `{"h/w": [h, w]}`.
        """
        started = time.monotonic()
        buckets = size_bucket if size_bucket is not None else size_buckget
        if frame_num % 4 != 1 or motion_frame % 4 != 1:
            raise ValueError(f"frame_num ({frame_num}) and motion_frame ({motion_frame}) must both be 4n+1")
        if sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {sampling_steps}")
        options = GuidanceOptions.from_extra_args(extra_args)
        if seed is None or seed < 0:
            seed = random.SystemRandom().randint(0, 99_999_999)
        log.info("seed %d", seed)

        # Inputs, validated before any model work.
        audio = input_data.get("cond_audio") or {}
        speakers = [_load_embedding(audio[k], k) for k in sorted(audio)]
        if not 1 <= len(speakers) <= 2:
            raise ValueError(f"cond_audio: MultiTalk drives 1 or 2 speakers, got {len(speakers)}")
        config = self.dit.config
        wanted = (config.audio_layers, config.audio_channels)
        if any(tuple(s.shape[1:]) != wanted for s in speakers):
            shapes = [tuple(s.shape) for s in speakers]
            raise ValueError(f"cond_audio: embeddings {shapes} do not match the model's [frames, {wanted[0]}, {wanted[1]}]")
        image = _load_image(input_data["cond_image"])
        height, width = choose_bucket(image.height, image.width, buckets)
        lat_h, lat_w = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
        boxes = _bboxes(input_data, len(speakers))
        masks = speaker_masks(image.height, image.width, len(speakers), boxes, face_scale)
        masks = latent_masks(masks, height, width, lat_h, lat_w, boxes).to(self.device)

        plan = plan_clips(speakers[0].shape[0], frame_num, motion_frame, max_frames_num)
        clip_frames, starts = plan.frames, plan.starts

        cond_image = image_to_tensor(image, height, width).to(self.device)
        context, context_null = self._encode_text(input_data.get("prompt", ""), n_prompt, offload_model)
        steps = sampling.timesteps(sampling_steps, shift).to(self.device)
        generator = torch.Generator(self.device).manual_seed(seed)
        teacache_bucket = buckets if isinstance(buckets, str) else "multitalk-480"

        frames: list[torch.Tensor] = []
        cond_frames = cond_image
        for index, start in enumerate(starts):
            if plan.pad_last and index == len(starts) - 1:
                speakers = [pad_audio(s, start + clip_frames) for s in speakers]
            windows = torch.stack([audio_window(s, start, clip_frames) for s in speakers]).to(self.device)
            video = self._sample_clip(
                cond_frames=cond_frames,
                motion=index > 0,
                clip_frames=clip_frames,
                audio=windows,
                masks=masks,
                context=context,
                context_null=context_null,
                steps=steps,
                text_scale=text_guide_scale,
                audio_scale=audio_guide_scale,
                options=options,
                teacache_bucket=teacache_bucket,
                generator=generator,
                report=lambda step: self._report(
                    on_step, progress, StepInfo(step, sampling_steps, index + 1, len(starts), time.monotonic() - started)
                ),
            )
            if color_correction_strength > 0:
                video = match_colors(video, cond_image[0, :, 0], color_correction_strength)
            frames.append(video if index == 0 else video[:, motion_frame:])
            cond_frames = video[None, :, -motion_frame:]
        return torch.cat(frames, dim=1)[:, : plan.total].float().cpu()

    def _encode_text(self, prompt: str, n_prompt: str, offload: bool) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.text_encoder
        on_cpu = offload and self.device.type == "cuda" and hasattr(encoder, "to")
        if on_cpu:
            encoder.to(self.device)
        context, context_null = encoder([prompt, n_prompt or self.negative_prompt])
        if on_cpu:
            encoder.to("cpu")
        return context.to(self.device), context_null.to(self.device)

    def _sample_clip(
        self,
        cond_frames: torch.Tensor,
        motion: bool,
        clip_frames: int,
        audio: torch.Tensor,
        masks: torch.Tensor,
        context: torch.Tensor,
        context_null: torch.Tensor,
        steps: torch.Tensor,
        text_scale: float,
        audio_scale: float,
        options: GuidanceOptions,
        teacache_bucket: str,
        generator: torch.Generator,
        report: Callable[[int], None],
    ) -> torch.Tensor:
        """Denoise one clip and decode it: `[3, clip_frames, H, W]`."""
        clip_fea = self.image_encoder(cond_frames[:, :, -1:])
        known = cond_frames.shape[2]
        pixels = torch.cat([cond_frames[0], cond_frames.new_zeros(3, clip_frames - known, *cond_frames.shape[-2:])], 1)
        cond_latent = self.vae.encode(pixels)
        latent_frames, lat_h, lat_w = cond_latent.shape[1:]

        # Mask of known pixel frames, first frame repeated 4x so the frames group into latent frames of 4.
        mask = torch.zeros(1, clip_frames, lat_h, lat_w, device=self.device)
        mask[:, :known] = 1
        mask = torch.cat([mask[:, :1].repeat(1, 4, 1, 1), mask[:, 1:]], dim=1)
        mask = mask.view(1, latent_frames, 4, lat_h, lat_w).transpose(1, 2)
        y = torch.cat([mask, cond_latent[None].to(mask.dtype)], dim=1)

        latent = torch.randn(16, latent_frames, lat_h, lat_w, generator=generator, device=self.device)
        # As the reference, the motion latent is cut from `y` in the DiT's dtype (bf16 at run time), then re-noised
        # in float32.
        motion_latent = cond_latent[:, : 1 + (known - 1) // 4].to(self.dit.dtype).float() if motion else None

        def renoise_motion(t: torch.Tensor) -> None:
            noise = torch.randn(motion_latent.shape, generator=generator, device=self.device)
            latent[:, : motion_latent.shape[1]] = sampling.add_noise(motion_latent, noise, t)

        if motion:
            renoise_motion(steps[0])

        branches = guidance_branches(text_scale)
        cond = ClipConditioning(context, context_null, clip_fea, y, audio, masks)
        buffers = [sampling.MomentumBuffer(options.apg_momentum) for _ in range(2)] if options.use_apg else None
        if self.workers is None:
            teacache = sampling.TeaCache(options.teacache_thresh, teacache_bucket) if options.use_teacache else None

            def velocities(latent: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
                return sequential_velocities(self.dit, latent, t, cond, branches, teacache)

        else:
            self._use_best_split(cond, latent, steps[:1], len(branches))
            settings = TeaCacheSettings(options.teacache_thresh, teacache_bucket) if options.use_teacache else None
            self.workers.begin_clip(cond, settings)

            def velocities(latent: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
                return self.workers.velocities(latent, t, branches)

        for i in range(len(steps) - 1):
            t = steps[i : i + 1]
            v = combine(velocities(latent, t), text_scale, audio_scale, buffers, options.apg_norm_threshold)
            latent = sampling.euler_step(latent, v, steps[i], steps[i + 1])
            if motion:
                renoise_motion(steps[i + 1])
            report(i + 1)
        if options.use_teacache:
            skipped = teacache.skipped_fraction() if self.workers is None else self.workers.end_clip()
            log.info("TeaCache skipped %.0f%% of this clip's DiT passes", 100 * skipped)
        elif self.workers is not None:
            self.workers.end_clip()
        return self.vae.decode(latent)

    def _use_best_split(self, cond: ClipConditioning, latent: torch.Tensor, t: torch.Tensor, passes: int) -> None:
        """Give the workers the fastest split for `passes` passes a step; the first call measures a pass at every
        sequence degree the GPUs allow, on this clip."""
        workers = self.workers
        if self.pass_seconds is None:
            workers.start()
            degrees = sorted({split.degree for split in valid_splits(workers.size, 1, workers.heads)})
            self.pass_seconds = workers.time_passes(cond, latent, t, degrees)
            log.info("DiT pass seconds by sequence degree: %s", self.pass_seconds)
        split = choose_split(workers.size, passes, workers.heads, self.pass_seconds)
        if split != workers.split:
            log.info("%d passes a step: %d guidance groups x %d GPUs each", passes, split.groups, split.degree)
        workers.use_split(split)

    @staticmethod
    def _report(on_step: StepCallback | None, progress: bool, info: StepInfo) -> None:
        if progress:
            log.info("step %d/%d clip %d/%d elapsed %.1fs", info.step, info.steps, info.clip, info.clips, info.elapsed)
        if on_step is not None:
            on_step(info)
