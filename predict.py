"""Cog runner: inputs in, library calls, one mp4 out."""

import logging
import os
import secrets
import tempfile
import time
from pathlib import Path as FilePath
from typing import Optional

import numpy as np
import soundfile
import torch
from cog import BaseRunner, Input, Path, current_scope
from PIL import Image

from src.audio import audio_prepare_multi, audio_prepare_single, get_embedding, load_wav2vec, video_frame_count
from src.video import read_video
from wan import GenerationRequest, load_pipeline
from wan.compile_cache import compile_cache_file, recording_compiles, save_compiled
from wan.configs import FPS
from wan.generation.timing import StageClock
from wan.generation.video import Mp4Writer
from wan.loading.audio_layers import infinitetalk_set
from wan.loading.lora import LoRAError
from wan.loading.weights import fetch_lora, resolve_fast_lora, resolve_weights
from wan.memory import plan_for_device
from wan.serving import (
    MAX_REQUEST_SECONDS, Recipe, check_time, gpus_to_use, plan_request, preset_vae_dtype, sampling_options,
    trimmed_samples,
)

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("predict")

MAX_FRAMES = 1000  # 40 s at 25 fps, the reference's streaming cap
SAMPLE_RATE = 16000
RESOLUTIONS = ("480p", "720p")
MODELS = ("multitalk", "infinitetalk")


def parse_bbox(text: Optional[str], name: str) -> Optional[tuple[float, ...]]:
    if not text:
        return None
    try:
        box = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{name}: expected 'x1,y1,x2,y2' in image pixels with x2 > x1 and y2 > y1, got {text!r}")
    return tuple(box)


def load_image(path: FilePath) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes the whole file: a truncated one fails here
    except Exception as error:  # PIL raises many types for corrupt files
        raise ValueError(f"image: cannot read the file as an image ({error}); upload a PNG, JPEG or WebP") from error


class Runner(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        paths = resolve_weights(weights)
        self.size_buckets = paths.size_buckets()  # the tiny set serves thumbnails
        on_gpu = torch.cuda.is_available()
        device = "cuda" if on_gpu else "cpu"
        # Every model on the GPU for the runner's life where it fits (80 GB cards), fp8 and parked or streamed weights
        # on smaller ones: chosen from the free memory (or MULTITALK_MEMORY_PLAN) and logged once, here.
        plan = plan_for_device(device)
        # Every visible GPU (or MULTITALK_GPUS): with more than one the DiT runs in a worker process per GPU.
        gpus = gpus_to_use(torch.cuda.device_count()) if on_gpu else 1
        # Compiled blocks run ~30 % faster (bench/NOTES.md); the compile itself belongs here, not in a request, and
        # the kernels and traced graphs of an earlier container on this GPU type are loaded first and this start's
        # saved after the warm-up (DiT workers: each its own file).
        compile_cache = compile_cache_file(torch.device(device)) if on_gpu else None
        with recording_compiles(compile_cache):
            self.pipeline = load_pipeline(paths.wan, paths.multitalk, paths.infinitetalk, device=device,
                                          compile=on_gpu, memory_plan=plan, gpus=gpus, compile_cache=compile_cache)
            self.feature_extractor, self.wav2vec = load_wav2vec(paths.wav2vec, device=self.pipeline.device)
            self._warm_up_audio()
            self.warm_up()
            save_compiled(compile_cache, self.pipeline)
        self.max_seconds = float(os.environ.get("MULTITALK_MAX_REQUEST_SECONDS", MAX_REQUEST_SECONDS))
        # Both go away with the runner (cog never deletes outputs; each request removes the previous one).
        self._outputs = tempfile.TemporaryDirectory(prefix="multitalk-outputs-")
        self._lora_cache = tempfile.TemporaryDirectory(prefix="multitalk-loras-")
        self.outputs, self.lora_cache = FilePath(self._outputs.name), FilePath(self._lora_cache.name)
        try:
            self.fast_lora, self.fast_lora_error = resolve_fast_lora(paths), None
        except Exception as error:  # the base model still works; only `fast` needs this file
            self.fast_lora, self.fast_lora_error = None, f"{type(error).__name__}: {error}"
            log.warning("fast mode unavailable: %s", self.fast_lora_error)

    def warm_up(self, size_bucket=None) -> None:
        """Compile every shape a request can take and measure the costs the time estimate uses (setup's last step;
        again whenever the DiT changes). Clip costs are measured with the VAE of the default preset (turbo; fast's
        too): quality's float32 VAE adds ~2 s to a clip of ~400 s."""
        self.costs = self.pipeline.warm_up(size_bucket or self._buckets("480p", "multitalk"),
                                           vae_dtype=preset_vae_dtype("turbo"))

    def _warm_up_audio(self) -> None:
        """The audio front end once on a second of sound: its first call loads and compiles what the decoding,
        loudness and resampling libraries use lazily (25 s of the first request on the H200 host, bench/NOTES.md)."""
        tone = (0.1 * np.sin(2 * np.pi * 220 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
        with tempfile.TemporaryDirectory(prefix="multitalk-warm-") as work:
            path = FilePath(work) / "tone.wav"
            soundfile.write(path, tone, 44100)  # another rate than the model's: the resampler runs too
            track, _, _ = audio_prepare_multi(path, path, "para", SAMPLE_RATE)
        get_embedding(track, self.feature_extractor, self.wav2vec, SAMPLE_RATE, self.wav2vec.device)

    def _buckets(self, resolution: str, model: str):
        name = f"{model}-{resolution.removesuffix('p')}"
        return self.size_buckets.get(name, name)

    def run(
        self,
        image: Optional[Path] = Input(
            default=None,
            description="Image with one or two people (two: person 1 left, person 2 right). Optional with a video.",
        ),
        audio: Optional[Path] = Input(
            default=None,
            description="Speech of person 1: any audio file, or a video to take the sound from. Optional with a "
            "video: its own soundtrack is used.",
        ),
        video: Optional[Path] = Input(
            default=None,
            description="A video to dub: with model=infinitetalk every clip follows its frames; with multitalk its "
            "first frame stands in for the image. Any container and codec, read at 25 fps.",
        ),
        second_audio: Optional[Path] = Input(default=None, description="Speech of person 2 (optional)."),
        model: str = Input(
            default="multitalk",
            choices=list(MODELS),
            description="multitalk: MeiGen MultiTalk; infinitetalk: its successor, which re-anchors every clip on the "
            "image or the source video (dubbing, long videos).",
        ),
        prompt: str = Input(
            default="A person talking naturally, clear lip movements, realistic facial expressions.",
            description="What the video shows.",
        ),
        negative_prompt: str = Input(default="", description="What to avoid; empty uses the model's default."),
        audio_type: str = Input(
            default="add",
            choices=["add", "para"],
            description="Two speakers: 'add' = person 1 speaks, then person 2; 'para' = both at the same time.",
        ),
        person1_bbox: Optional[str] = Input(
            default=None, description="Box of person 1 as 'x1,y1,x2,y2' in image pixels (default: left half)."
        ),
        person2_bbox: Optional[str] = Input(
            default=None, description="Box of person 2 as 'x1,y1,x2,y2' in image pixels (default: right half)."
        ),
        num_frames: Optional[int] = Input(
            default=None,
            ge=5,
            le=MAX_FRAMES,
            description=f"Frames at 25 fps. Default: as long as the audio (at most {MAX_FRAMES}).",
        ),
        resolution: str = Input(default="480p", choices=list(RESOLUTIONS), description="Output resolution bucket."),
        sampling_steps: Optional[int] = Input(
            default=None, ge=2, le=100, description="Denoising steps (default: 40; 4 in fast mode)."
        ),
        turbo: bool = Input(default=True, description="Faster sampling: TeaCache and lighter guidance."),
        fast: bool = Input(
            default=False,
            description="Step-distilled lightx2v LoRA: 4 steps of 2 passes, ~10x faster than turbo. Overrides turbo.",
        ),
        lora_url: Optional[str] = Input(
            default=None, description="URL of your own Wan 2.1 14B LoRA (.safetensors), merged into the model."
        ),
        lora_scale: float = Input(default=1.0, ge=0.0, le=4.0, description="Strength of the LoRA from lora_url."),
        text_guidance_scale: Optional[float] = Input(
            default=None, ge=0.0, le=20.0, description="Prompt guidance (default from the preset)."
        ),
        audio_guidance_scale: Optional[float] = Input(
            default=None, ge=0.0, le=20.0, description="Audio (lip-sync) guidance (default from the preset)."
        ),
        color_correction_strength: float = Input(
            default=1.0,
            ge=0.0,
            le=1.0,
            description="Match every clip's colours (Lab mean and spread) to the image, against colour drift in long "
            "videos; 0 = off. The reference CLI's default is 1.0.",
        ),
        use_apg: bool = Input(
            default=False,
            description="Adaptive projected guidance (momentum -0.75, norm threshold 55, as the reference CLI) instead "
            "of plain guidance: less over-saturation and drift at high guidance scales.",
        ),
        seed: Optional[int] = Input(default=None, description="Random seed; empty picks one (it is logged)."),
    ) -> Path:
        started = time.monotonic()
        clock = StageClock(self.pipeline.device)
        if image is None and video is None:
            raise ValueError("image: give an image to animate, or a video to dub (video)")
        if audio is None and video is None:
            raise ValueError("audio: give the speech of person 1 (or a video with sound as `video`)")
        boxes = (parse_bbox(person1_bbox, "person1_bbox"), parse_bbox(person2_bbox, "person2_bbox"))
        if second_audio is None and boxes[1] is not None:
            raise ValueError("person2_bbox: given without second_audio; add the second speaker's audio or drop the box")
        if any(boxes) and second_audio is not None and not all(boxes):
            raise ValueError("person1_bbox, person2_bbox: give both boxes or neither")
        if fast and self.fast_lora is None:
            raise ValueError(f"fast: the lightx2v LoRA could not be set up ({self.fast_lora_error}); use turbo instead")
        seed = secrets.randbelow(100_000_000) if seed is None else seed
        recipe = Recipe(
            preset="fast" if fast else "turbo" if turbo else "quality",
            model=model,
            resolution=resolution,
            size_bucket=self._buckets(resolution, model),
            steps=sampling_steps,
            text_scale=text_guidance_scale,
            audio_scale=audio_guidance_scale,
            color_correction=color_correction_strength,
            use_apg=use_apg,
        )
        options = sampling_options(recipe, num_frames or MAX_FRAMES, seed)

        for old in self.outputs.iterdir():
            old.unlink()
        with clock.stage("decode"):
            picture = load_image(image) if image is not None else None
            speech = audio if audio is not None else video  # a video without separate audio speaks for itself
            if second_audio is None:
                tracks = [audio_prepare_single(speech, SAMPLE_RATE, name="audio" if audio is not None else "video")]
                mix = tracks[0]
            else:
                *tracks, mix = audio_prepare_multi(speech, second_audio, audio_type, SAMPLE_RATE)
            frames = video_frame_count(len(tracks[0]), SAMPLE_RATE)
            plan, needed = plan_request(frames, options)
            # Source frames as far as the clips use them: MultiTalk takes the first for the image, InfiniteTalk
            # anchors every clip on the frame at its start (all before the video's end).
            used = 1 if model == "multitalk" else plan.total
            source = read_video(video, max_frames=used, timing="timestamps") if video is not None else None
        source_hw = (picture.height, picture.width) if picture is not None else source.frames.shape[1:3]
        check_time(self.costs, frames, source_hw, recipe, options, self.max_seconds, self.pipeline.teacache_steps)
        # wav2vec2 runs over the audio the video reads, not the whole file.
        tracks = [track[: trimmed_samples(needed, SAMPLE_RATE)] for track in tracks]

        with tempfile.TemporaryDirectory(prefix="multitalk-") as work:
            soundtrack = FilePath(work) / "soundtrack.wav"
            soundfile.write(soundtrack, mix[: trimmed_samples(needed, SAMPLE_RATE)], SAMPLE_RATE)
            with clock.stage("wav2vec2"):
                embeddings = tuple(
                    get_embedding(t, self.feature_extractor, self.wav2vec, SAMPLE_RATE, self.wav2vec.device)
                    for t in tracks
                )
            request = GenerationRequest(
                prompt=prompt,
                image=picture,
                audio=embeddings,
                boxes=tuple(box for box in boxes if box) or None,
                negative_prompt=negative_prompt,
                video=None if source is None else torch.from_numpy(source.frames),
            )
            # After the inputs are known good: swapping weights is the first expensive step.
            loras = [(self.fast_lora, 1.0)] if fast else []
            if lora_url:
                loras.append((fetch_lora(lora_url, self.lora_cache), lora_scale))
            audio_layers = infinitetalk_set(len(embeddings)) if model == "infinitetalk" else "multitalk"
            with clock.stage("weights"):
                try:
                    self.pipeline.set_weights(audio_layers, loras)  # touches only what changes
                except LoRAError as error:
                    raise ValueError(f"{'lora_url' if lora_url else 'fast'}: {error}") from error
            # Each clip is encoded while the next one is generated; what is left after the last is the mp4 stage.
            path = self.outputs / f"{model}-{seed}-{int(time.time())}.mp4"
            with Mp4Writer(path, plan.total, soundtrack, fps=FPS) as writer:
                shape = self.pipeline.stream(request, options, writer.write, clock=clock)
                with clock.stage("mp4"):
                    output = writer.close()

        frames, height, width = shape[1:]
        scope = current_scope()
        scope.record_metric("video_output_count", 1)
        scope.record_metric("video_output_duration_seconds", frames / FPS)
        scope.record_metric("video_output_total_pixel_count", frames * height * width)
        log.info("wrote %d frames %dx%d in %.1fs (%s)", frames, width, height, time.monotonic() - started,
                 clock.summary())
        return Path(output)
