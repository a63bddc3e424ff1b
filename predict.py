"""Cog predictor: inputs in, library calls, one mp4 out."""

import logging
import secrets
import tempfile
import time
from pathlib import Path as FilePath
from typing import Optional

import soundfile
import torch
from cog import BasePredictor, Input, Path, current_scope
from PIL import Image

from src.audio import audio_prepare_multi, audio_prepare_single, get_embedding, load_wav2vec
from wan import MultiTalkPipeline
from wan.configs import FPS, PRESETS, QUALITY_SHIFT
from wan.video import write_mp4
from wan.lora import LoRAError
from wan.weights import fetch_lora, resolve_fast_lora, resolve_weights

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("predict")

MAX_FRAMES = 1000  # 40 s at 25 fps, the reference's streaming cap
SAMPLE_RATE = 16000
RESOLUTIONS = {"480p": "multitalk-480", "720p": "multitalk-720"}


def parse_bbox(text: Optional[str], name: str) -> Optional[list[float]]:
    if not text:
        return None
    try:
        box = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{name}: expected 'x1,y1,x2,y2' in image pixels with x2 > x1 and y2 > y1, got {text!r}")
    return box


def check_image(path: FilePath) -> None:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for corrupt files
        raise ValueError(f"image: cannot read the file as an image ({error}); upload a PNG, JPEG or WebP") from error


class Predictor(BasePredictor):
    def setup(self, weights: Optional[str] = None) -> None:
        paths = resolve_weights(weights)
        on_gpu = torch.cuda.is_available()
        device = "cuda" if on_gpu else "cpu"
        # Every visible GPU: with more than one the DiT runs in one worker process per GPU (wan.parallel).
        gpus = torch.cuda.device_count() if on_gpu else 1
        # Compiled blocks run ~30 % faster (bench/NOTES.md); the compile itself belongs here, not in a request.
        self.pipeline = MultiTalkPipeline(
            checkpoint_dir=paths.wan, multitalk_dir=paths.multitalk, device=device, compile=on_gpu, gpus=gpus
        )
        if on_gpu:
            self.pipeline.warm_up()
        self.feature_extractor, self.wav2vec = load_wav2vec(paths.wav2vec, device=device)
        # Both go away with the predictor (cog never deletes outputs; each request removes the previous one).
        self._outputs = tempfile.TemporaryDirectory(prefix="multitalk-outputs-")
        self._lora_cache = tempfile.TemporaryDirectory(prefix="multitalk-loras-")
        self.outputs, self.lora_cache = FilePath(self._outputs.name), FilePath(self._lora_cache.name)
        try:
            self.fast_lora, self.fast_lora_error = resolve_fast_lora(paths), None
        except Exception as error:  # the base model still works; only `fast` needs this file
            self.fast_lora, self.fast_lora_error = None, f"{type(error).__name__}: {error}"
            log.warning("fast mode unavailable: %s", self.fast_lora_error)

    def predict(
        self,
        image: Path = Input(description="Image with one or two people (two: person 1 left, person 2 right)."),
        audio: Path = Input(description="Speech of person 1: any audio file, or a video to take the sound from."),
        second_audio: Optional[Path] = Input(default=None, description="Speech of person 2 (optional)."),
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
        check_image(image)
        boxes = [parse_bbox(person1_bbox, "person1_bbox"), parse_bbox(person2_bbox, "person2_bbox")]
        if second_audio is None and boxes[1] is not None:
            raise ValueError("person2_bbox: given without second_audio; add the second speaker's audio or drop the box")
        if any(boxes) and second_audio is not None and not all(boxes):
            raise ValueError("person1_bbox, person2_bbox: give both boxes or neither")
        if fast and self.fast_lora is None:
            raise ValueError(f"fast: the lightx2v LoRA could not be set up ({self.fast_lora_error}); use turbo instead")
        bucket = RESOLUTIONS[resolution]
        mode = "fast" if fast else "turbo" if turbo else "quality"
        preset = PRESETS[mode]
        shift = QUALITY_SHIFT[bucket] if mode == "quality" else preset.shift
        if seed is None:
            seed = secrets.randbelow(100_000_000)

        for old in self.outputs.iterdir():
            old.unlink()
        with tempfile.TemporaryDirectory(prefix="multitalk-") as work:
            if second_audio is None:
                tracks = [audio_prepare_single(audio, SAMPLE_RATE, name="audio")]
                mix = tracks[0]
            else:
                *tracks, mix = audio_prepare_multi(audio, second_audio, audio_type, SAMPLE_RATE)
            soundtrack = FilePath(work) / "soundtrack.wav"
            soundfile.write(soundtrack, mix, SAMPLE_RATE)
            embeddings = {
                f"person{k + 1}": get_embedding(t, self.feature_extractor, self.wav2vec, SAMPLE_RATE, self.wav2vec.device)
                for k, t in enumerate(tracks)
            }
            # After the inputs are known good: a LoRA merge is the first expensive step.
            loras = [(self.fast_lora, 1.0)] if fast else []
            if lora_url:
                loras.append((fetch_lora(lora_url, self.lora_cache), lora_scale))
            try:
                self.pipeline.set_loras(loras)  # merges or restores only when the set changes
            except LoRAError as error:
                raise ValueError(f"{'lora_url' if lora_url else 'fast'}: {error}") from error
            input_data = {"prompt": prompt, "cond_image": str(image), "cond_audio": embeddings}
            if any(boxes):
                input_data["bbox"] = {f"person{k + 1}": box for k, box in enumerate(boxes) if box}
            video = self.pipeline.generate(
                input_data,
                size_bucket=bucket,
                sampling_steps=sampling_steps or preset.sampling_steps,
                shift=shift,
                text_guide_scale=preset.text_guide_scale if text_guidance_scale is None else text_guidance_scale,
                audio_guide_scale=preset.audio_guide_scale if audio_guidance_scale is None else audio_guidance_scale,
                n_prompt=negative_prompt,
                seed=seed,
                max_frames_num=num_frames or MAX_FRAMES,
                offload_model=False,
                color_correction_strength=color_correction_strength,
                extra_args={
                    "use_teacache": preset.teacache_thresh is not None,
                    "teacache_thresh": preset.teacache_thresh,
                    "use_apg": use_apg,
                },
            )
            output = write_mp4(video, self.outputs / f"multitalk-{seed}-{int(time.time())}.mp4", soundtrack, fps=FPS)

        frames, height, width = video.shape[1:]
        scope = current_scope()
        scope.record_metric("video_output_count", 1)
        scope.record_metric("video_output_duration_seconds", frames / FPS)
        scope.record_metric("video_output_total_pixel_count", frames * height * width)
        log.info("wrote %d frames %dx%d in %.1fs", frames, width, height, time.monotonic() - started)
        return Path(output)
