"""The service: a user's request checked, planned, timed against the limit and generated into an mp4.

`TalkingVideoService.start` is the container's start (weights, memory plan, GPUs, compile, warm-up); `run` reads as
validate -> decode the media -> plan -> check the time -> prepare (trim, wav2vec2, weights) -> stream to the mp4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import tempfile
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

from src.audio import (
    DEFAULT_MAX_SECONDS,
    DEFAULT_VOICES,
    TARGET_SAMPLE_RATE,
    audio_prepare_multi,
    audio_prepare_single,
    get_embedding,
    load_speech,
    load_wav2vec,
    read_script,
    video_frame_count,
)
from src.audio.speech import Script, Speech
from src.video import Mp4Writer, read_frames, read_picture
from wan import GenerationPlan, GenerationRequest, SamplingOptions, load_pipeline
from wan.configs import FPS
from wan.generation.conditioning import SpeakerRegionError, video_masks
from wan.generation.timing import StageClock
from wan.loading.audio_layers import infinitetalk_set
from wan.loading.lora import LoRAError
from wan.runtime.compile_cache import compile_cache_file, recording_compiles
from wan.runtime.placement import plan_for_device
from wan.runtime.streaming import ParkedWeights

from .presets import FAST_LORA, PRESET_NAMES, PRESETS, Recipe, sampling_options
from .settings import MEMORY_PLAN_ENV, Settings
from .time_limit import Budget, check_time
from .weights import fetch_lora, resolve_fast_lora, resolve_speech, resolve_weights

log = logging.getLogger(__name__)

# A video is as long as its audio, which may be up to 10 min: the time limit decides what is served.
MAX_FRAMES = round(DEFAULT_MAX_SECONDS * FPS)
RESOLUTIONS = ("480p", "720p")
MODELS = ("multitalk", "infinitetalk")
# The service's stages, beside the generation's own (`wan.generation.timing`).
SPEECH, DECODE, WAV2VEC2, WEIGHTS, MP4 = "speech", "decode", "wav2vec2", "weights", "mp4"


# Media inputs arrive as files cog made from an upload, a data URI or a URL; a bare string is a path the client named.
MediaInput = Path | str | None
MEDIA_INPUTS = ("image", "audio", "first_audio", "video", "second_audio")


@dataclass(frozen=True)
class TalkingVideoRequest:
    """The runner's inputs, as the user gave them (`predict.py` documents each)."""

    image: MediaInput = None
    audio: MediaInput = None
    video: MediaInput = None
    second_audio: MediaInput = None
    first_audio: MediaInput = None  # zsxkib/cog-MultiTalk's name for `audio`
    text: str | None = None  # speech to synthesise instead of `audio`: person 1's words, or a (s1)/(s2) dialogue
    voice: str = DEFAULT_VOICES[0]
    second_voice: str = DEFAULT_VOICES[1]
    model: str = "multitalk"
    prompt: str = ""
    negative_prompt: str = ""
    audio_type: str = "add"
    person1_bbox: str | None = None
    person2_bbox: str | None = None
    num_frames: int | None = None
    resolution: str = "480p"
    sampling_steps: int | None = None
    turbo: bool = True
    fast: bool = False
    lora_url: str | None = None
    lora_scale: float = 1.0
    text_guidance_scale: float | None = None
    audio_guidance_scale: float | None = None
    color_correction_strength: float = 1.0
    use_apg: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class Media:
    """A request's decoded media: the picture (or a video's frames), the speakers' tracks and their mix."""

    picture: Image.Image | None
    source: dict[int, np.ndarray] | None  # a video's frames by index: the first, then those the clips start on
    tracks: list[np.ndarray]  # 16 kHz mono, person 1 first
    mix: np.ndarray  # the soundtrack

    @property
    def speech_frames(self) -> int:
        return video_frame_count(len(self.tracks[0]), TARGET_SAMPLE_RATE)

    @property
    def source_hw(self) -> tuple[int, int]:
        """The size of what the first clip is conditioned on: a video's first frame, else the picture."""
        if self.source is not None:
            return tuple(self.source[0].shape[:2])
        return self.picture.height, self.picture.width


Boxes = tuple[tuple[float, ...], ...] | None  # x1, y1, x2, y2 per speaker in source pixels; None: the default halves


@dataclass(frozen=True)
class TalkingVideo:
    path: Path
    frames: int
    width: int
    height: int


class TalkingVideoService:
    """The loaded models, the costs measured at start, and the folders a request writes to (removed with it)."""

    def __init__(self, weights: str | None = None, settings: Settings | None = None):
        settings = settings or Settings.from_env()
        paths = resolve_weights(weights or settings.weights)
        self.size_buckets = paths.size_buckets()  # the tiny set serves thumbnails
        on_gpu = torch.cuda.is_available()
        device = torch.device("cuda" if on_gpu else "cpu")
        # Every model on the GPU for the runner's life where it fits (80 GB cards), fp8 and parked or streamed weights
        # on smaller ones, bf16 streamed where the card has no fp8: chosen from the card (or MULTITALK_MEMORY_PLAN) and
        # logged once, here.
        memory_plan = plan_for_device(device, settings.memory_plan, MEMORY_PLAN_ENV)
        # With more than one GPU the DiT runs in a worker process per GPU.
        gpus = settings.gpus_to_use(torch.cuda.device_count()) if on_gpu else 1
        # Compiled blocks run ~30 % faster; the compile belongs here, not in a request, and an earlier container's
        # kernels and traced graphs on this GPU type are loaded first and this start's saved after the warm-up.
        compile_cache = compile_cache_file(settings.compile_cache, device)
        with recording_compiles(compile_cache):
            self.pipeline = load_pipeline(
                paths.wan,
                paths.multitalk,
                paths.infinitetalk,
                device=device,
                compile=on_gpu,
                memory_plan=memory_plan,
                worker_plan=memory_plan if settings.memory_plan else None,  # else each worker's own card's
                gpus=gpus,
                compile_cache=compile_cache,
            )
            self.feature_extractor, self.wav2vec = load_wav2vec(paths.wav2vec, device=self.pipeline.device)
            self._warm_up_audio()
            self.warm_up()
            self.pipeline.dit.save_compile_cache()
        self.max_seconds = settings.max_request_seconds
        self.hf_endpoint = settings.hf_endpoint
        self.switches = WeightSwitches()
        # Both go away with the service (cog never deletes outputs; each request removes the previous one).
        self._outputs = tempfile.TemporaryDirectory(prefix="multitalk-outputs-")
        self._lora_cache = tempfile.TemporaryDirectory(prefix="multitalk-loras-")
        self.outputs, self.lora_cache = Path(self._outputs.name), Path(self._lora_cache.name)
        try:
            self.fast_lora, self.fast_lora_error = resolve_fast_lora(paths), None
        except Exception as error:  # the base model still works; only `fast` needs this file
            self.fast_lora, self.fast_lora_error = None, f"{type(error).__name__}: {error}"
            log.warning("fast mode unavailable: %s", self.fast_lora_error)
        try:  # the `text` input; every other input works without it
            self.speech, self.speech_error = SpeakerOnDevice(load_speech_weights(paths), device), None
        except Exception as error:
            self.speech, self.speech_error = None, f"{type(error).__name__}: {error}"
            log.warning("text input unavailable: %s", self.speech_error)

    def warm_up(self, size_bucket=None) -> None:
        """Compile every shape a request can take and measure the costs the time estimate uses (the start's last
        step; again whenever the DiT changes). Clip costs are measured with the VAE of the default preset (turbo,
        fast's too): quality's float32 VAE adds a few seconds to a clip of minutes."""
        self.costs = self.pipeline.warm_up(
            size_bucket or self._buckets("480p", "multitalk"), vae_dtype=PRESETS["multitalk"]["turbo"].vae_dtype
        )

    def _warm_up_audio(self) -> None:
        """The audio front end once on a second of sound: its first call loads and compiles what the decoding,
        loudness and resampling libraries use lazily (seconds that would otherwise go to the first request)."""
        rate = TARGET_SAMPLE_RATE
        tone = (0.1 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)
        with tempfile.TemporaryDirectory(prefix="multitalk-warm-") as work:
            path = Path(work) / "tone.wav"
            soundfile.write(path, tone, 44100)  # another rate than the model's: the resampler runs too
            track, _, _ = audio_prepare_multi(path, path, "para", rate)
        get_embedding(track, self.feature_extractor, self.wav2vec, rate, self.wav2vec.device)

    def _buckets(self, resolution: str, model: str):
        name = f"{model}-{resolution.removesuffix('p')}"
        return self.size_buckets.get(name, name)

    def run(self, request: TalkingVideoRequest) -> TalkingVideo:
        started = time.monotonic()
        clock = StageClock(self.pipeline.device)
        request, recipe, boxes, script = self._validate(request)
        loras = self._loras(request, recipe)
        seed = secrets.randbelow(100_000_000) if request.seed is None else request.seed
        options = sampling_options(recipe, request.num_frames, seed)
        for old in self.outputs.iterdir():
            old.unlink()
        with clock.stage(SPEECH):  # before the plan: only the speech says how long the video is
            spoken = self.speech.say(script, seed) if script is not None else None
        with clock.stage(DECODE):
            media = decode_media(request, spoken)
            audio_layers = infinitetalk_set(len(media.tracks)) if request.model == "infinitetalk" else "multitalk"
            plan = self._plan(request, media, options, loras)
            check_speaker_regions(media, plan, boxes, options.face_scale)
            if request.video is not None and plan.source_frames != (0,):  # InfiniteTalk: each clip on its own frame
                media = dataclasses.replace(media, source=read_frames(request.video, plan.source_frames))
        budget = Budget(self.max_seconds, self.switches.seconds(self.pipeline.dit, audio_layers, loras))
        presets = [
            name for name in PRESET_NAMES if self.fast_lora is not None or PRESETS[request.model][name].lora is None
        ]
        check_time(self.costs, plan, media.source_hw, recipe, options, budget,
                   lambda other: self.pipeline.computed_steps(other, loras), presets,
                   "text" if script is not None else "audio")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="multitalk-") as work:
            soundtrack = Path(work) / "soundtrack.wav"
            generation = self._prepare(request, media, plan, boxes, soundtrack, clock)
            with clock.stage(WEIGHTS):
                self.switches.timed(self.pipeline, audio_layers, loras, request)
            path = self.outputs / f"{request.model}-{seed}-{int(time.time())}.mp4"
            # Each clip is encoded while the next one is generated; what is left after the last is the mp4 stage.
            with Mp4Writer(path, plan.frames, soundtrack, fps=FPS) as writer:
                self.pipeline.stream(generation, options, writer.write, plan=plan, clock=clock)
                with clock.stage(MP4):
                    writer.close()
        log.info(
            "wrote %d frames %dx%d in %.1fs (%s)",
            plan.frames,
            plan.width,
            plan.height,
            time.monotonic() - started,
            clock.summary(),
        )
        return TalkingVideo(path, plan.frames, plan.width, plan.height)

    def _loras(self, request: TalkingVideoRequest, recipe: Recipe) -> list[tuple[Path, float]]:
        """The LoRAs the request runs with: its preset's, then the user's (downloaded and checked here)."""
        loras = [(self.fast_lora, 1.0)] if recipe.settings.lora == FAST_LORA else []
        if request.lora_url:
            loras.append(
                (fetch_lora(request.lora_url, self.lora_cache, hf_endpoint=self.hf_endpoint), request.lora_scale)
            )
        return loras

    def _plan(
        self, request: TalkingVideoRequest, media: Media, options: SamplingOptions, loras: list[tuple[Path, float]]
    ) -> GenerationPlan:
        try:
            return self.pipeline.plan(media.speech_frames, media.source_hw, options, loras)
        except LoRAError as error:  # TeaCache's prediction reads the LoRAs: one that does not fit fails here
            raise lora_input_error(request, error) from error

    def _validate(self, request: TalkingVideoRequest) -> tuple[TalkingVideoRequest, Recipe, Boxes, Script | None]:
        """The request with its aliases resolved, its sampling recipe, the speakers' boxes (None: the default halves)
        and the script to speak (None: recorded speech), or a ValueError naming the input, before any work."""
        for name in MEDIA_INPUTS:
            value = getattr(request, name)
            if value is not None and not isinstance(value, PathLike):
                raise ValueError(
                    f"{name}: {value!r} is not a file this model was sent, and it reads no files of its own; send the "
                    "file itself (upload it, or give a data: URI or an http(s) URL)"
                )
        if request.first_audio is not None:
            if request.audio is not None:
                raise ValueError("audio, first_audio: give the speech of person 1 once (first_audio is the old name)")
            request = dataclasses.replace(request, audio=request.first_audio, first_audio=None)
        if request.image is None and request.video is None:
            raise ValueError("image: give an image to animate, or a video to dub (video)")
        if request.image is not None and request.video is not None:
            raise ValueError("image, video: give one of them: a video's frames stand in for the image")
        script = self._script(request)
        if request.audio is None and request.video is None and script is None:
            raise ValueError(
                "audio: give the speech of person 1: a recording as audio, the words as text, or a video with sound as "
                "video"
            )
        two_speakers = request.second_audio is not None or (script is not None and script.speakers == 2)
        boxes = (parse_bbox(request.person1_bbox, "person1_bbox"), parse_bbox(request.person2_bbox, "person2_bbox"))
        if not two_speakers and boxes[1] is not None:
            raise ValueError(
                "person2_bbox: given without a second speaker; add second_audio (or a (s1)/(s2) dialogue as text) or "
                "drop the box"
            )
        if any(boxes) and two_speakers and not all(boxes):
            raise ValueError("person1_bbox, person2_bbox: give both boxes or neither")
        if request.fast and self.fast_lora is None:
            raise ValueError(f"fast: the lightx2v LoRA could not be set up ({self.fast_lora_error}); use turbo instead")
        recipe = Recipe(
            preset="fast" if request.fast else "turbo" if request.turbo else "quality",
            model=request.model,
            resolution=request.resolution,
            size_bucket=self._buckets(request.resolution, request.model),
            steps=request.sampling_steps,
            text_scale=request.text_guidance_scale,
            audio_scale=request.audio_guidance_scale,
            color_correction=request.color_correction_strength,
            use_apg=request.use_apg,
        )
        return request, recipe, tuple(box for box in boxes if box) or None, script

    def _script(self, request: TalkingVideoRequest) -> Script | None:
        """What `text` asks to be spoken, checked (None without text; an empty text counts as none beside audio)."""
        if request.text is None or (not request.text.strip() and (request.audio or request.video)):
            return None
        if request.audio is not None or request.second_audio is not None:
            given = "audio" if request.audio is not None else "second_audio"
            raise ValueError(f"text, {given}: give the speech as text or as recordings, not both")
        script = read_script(request.text, request.voice, request.second_voice)
        if self.speech is None:
            raise ValueError(f"text: speech synthesis could not be set up ({self.speech_error}); send audio instead")
        return script

    def _prepare(
        self,
        request: TalkingVideoRequest,
        media: Media,
        plan: GenerationPlan,
        boxes: Boxes,
        soundtrack: Path,
        clock: StageClock,
    ) -> GenerationRequest:
        """The soundtrack and the embeddings of the audio the clips read (not the whole file)."""
        samples = plan.audio_samples(TARGET_SAMPLE_RATE)
        soundfile.write(soundtrack, media.mix[:samples], TARGET_SAMPLE_RATE)
        with clock.stage(WAV2VEC2):
            embeddings = tuple(
                get_embedding(
                    track[:samples], self.feature_extractor, self.wav2vec, TARGET_SAMPLE_RATE, self.wav2vec.device
                )
                for track in media.tracks
            )
        return GenerationRequest(
            prompt=request.prompt,
            image=media.picture,
            audio=embeddings,
            boxes=boxes,
            negative_prompt=request.negative_prompt,
            video=None if media.source is None else {k: torch.from_numpy(v) for k, v in media.source.items()},
        )


@dataclass
class WeightSwitches:
    """What changing the DiT's weights costs here, for the time estimate: the last measured switch of each kind (an
    audio-layer set, which also takes the LoRAs off and on again; LoRAs alone), a prior before the first. The prior
    is the slowest switch measured on a GPU (bench/RESULTS.md: 34.9 s for InfiniteTalk's layers and a LoRA)."""

    audio_layers_seconds: float = 40.0
    loras_seconds: float = 40.0

    def seconds(self, dit, audio_layers: str, loras: list[tuple[Path, float]]) -> float:
        kind = _switch(dit, audio_layers, loras)
        return 0.0 if kind is None else getattr(self, kind)

    def timed(self, pipeline, audio_layers: str, loras: list[tuple[Path, float]], request: TalkingVideoRequest) -> None:
        """Put the weights in place (only what changes is touched), timing the switch for the next estimates.
        Swapping them is the first expensive step: it comes after every input is known good."""
        kind = _switch(pipeline.dit, audio_layers, loras)
        started = time.monotonic()
        try:
            pipeline.set_weights(audio_layers, loras)
        except LoRAError as error:
            raise lora_input_error(request, error) from error
        if kind is not None:
            setattr(self, kind, time.monotonic() - started)


def _switch(dit, audio_layers: str, loras: list[tuple[Path, float]]) -> str | None:
    """Which `WeightSwitches` figure holding `audio_layers` and `loras` costs the DiT now; None: nothing changes."""
    if dit.active_audio_layers not in (None, audio_layers):
        return "audio_layers_seconds"
    if tuple((str(path), float(scale)) for path, scale in loras) != dit.active_loras:
        return "loras_seconds"
    return None


def lora_input_error(request: TalkingVideoRequest, error: LoRAError) -> ValueError:
    """A LoRA that does not fit, named by the input it came from."""
    return ValueError(f"{'lora_url' if request.lora_url else 'fast'}: {error}")


def decode_media(request: TalkingVideoRequest, spoken: tuple[list[np.ndarray], np.ndarray] | None = None) -> Media:
    """The picture, a video's first frame and the speech tracks: `spoken` (synthesised tracks and their mix), else the
    audio files (a video without separate audio speaks for itself)."""
    picture = read_picture(request.image) if request.image is not None else None
    source = read_frames(request.video, [0]) if request.video is not None else None
    if spoken is not None:
        return Media(picture, source, *spoken)
    speech = request.audio if request.audio is not None else request.video
    if request.second_audio is None:
        track = audio_prepare_single(speech, TARGET_SAMPLE_RATE, name="audio" if request.audio is not None else "video")
        return Media(picture, source, [track], track)
    *tracks, mix = audio_prepare_multi(speech, request.second_audio, request.audio_type, TARGET_SAMPLE_RATE)
    return Media(picture, source, tracks, mix)


class SpeakerOnDevice:
    """Kokoro-82M kept in page-locked host memory and brought to the GPU for each script (0.3 GB: milliseconds), so
    that it costs no memory plan any GPU memory; on a CPU it simply stays."""

    def __init__(self, speech: Speech, device: torch.device):
        self.speech = speech
        self.parked = ParkedWeights(speech.model, device) if device.type == "cuda" else None

    def say(self, script: Script, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
        with self.parked.on_device() if self.parked is not None else contextlib.nullcontext():
            tracks, mix = self.speech.say(script, seed)
        if len(mix) > DEFAULT_MAX_SECONDS * TARGET_SAMPLE_RATE:
            raise ValueError(
                f"text: speaks {len(mix) / TARGET_SAMPLE_RATE:.0f} s; at most {DEFAULT_MAX_SECONDS:.0f} s of speech "
                "are served: shorten it"
            )
        return tracks, mix


def load_speech_weights(paths) -> Speech:
    """Kokoro-82M and its English tagger from the weights (fetched when missing), on the CPU until a script comes."""
    speech_paths = resolve_speech(paths)
    return load_speech(speech_paths.kokoro, speech_paths.tagger, device="cpu")


def check_speaker_regions(media: Media, plan: GenerationPlan, boxes: Boxes, face_scale: float) -> None:
    """Every speaker's region (their box, or the default half) holds something of the video, checked before the
    embeddings and the weights: a failure names the box, or the source where no boxes were given."""
    try:
        video_masks(media.source_hw, len(media.tracks), boxes, plan.height, plan.width, face_scale)
    except SpeakerRegionError as error:
        name = f"person{error.speaker}_bbox" if boxes else "image" if media.picture is not None else "video"
        raise ValueError(f"{name}: {error}") from error


def parse_bbox(text: str | None, name: str) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        box = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{name}: expected 'x1,y1,x2,y2' in image pixels with x2 > x1 and y2 > y1, got {text!r}")
    return tuple(box)
