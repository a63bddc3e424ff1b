"""The generation loop: a typed request in, a talking video out, clip by clip.

Randomness comes from one `torch.Generator` seeded per call, drawn in the reference's order and shapes: each clip's
initial noise, then (later clips) one draw per re-noising of the motion latent.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..configs import ASPECT_RATIO_BUCKETS, DEFAULT_NEGATIVE_PROMPT, VAE_STRIDE
from . import sampling
from .backend import ClipInputs, DiTBackend, TeaCacheSettings
from .clip_condition import infinitetalk_condition, multitalk_condition
from .conditioning import image_to_tensor, match_colors, video_masks
from .denoise import GuidedVelocity, denoise
from .estimate import Costs, tokens_of
from .plan import GenerationPlan, clip_audio, latent_frames, plan_generation
from .request import GenerationRequest, SamplingOptions
from .timing import (
    CLIP_STAGES,
    COLOR_CORRECTION,
    DIT,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    VAE_DECODE,
    VAE_ENCODE,
    StageClock,
)

log = logging.getLogger(__name__)

WARM_UP_SMALL_FRAMES = 9  # the warm-up's small clips: 3 latent frames


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based within the clip
    steps: int
    clip: int  # 1-based
    clips: int
    elapsed: float  # seconds since generate() started


StepCallback = Callable[[StepInfo], None]
FramesCallback = Callable[[torch.Tensor], None]


def _discard(frames: torch.Tensor) -> None:
    """A warm-up's frames: its compiled graphs and measured costs are what it is for (no mp4 is written)."""


class Pipeline:
    """MultiTalk generation from ready components: the DiT, the text encoder (prompts -> embeddings), the image
    encoder (frames -> CLIP features) and the VAE. Build one from the published files with `wan.load_pipeline`."""

    def __init__(
        self,
        dit: DiTBackend,
        text_encoder: Callable[[list[str]], list[torch.Tensor]],
        image_encoder: Callable[[torch.Tensor], torch.Tensor],
        vae,
        *,
        device: str | torch.device = "cpu",
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    ):
        self.dit = dit
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.vae = vae
        self.device = torch.device(device)
        self.negative_prompt = negative_prompt

    def set_weights(self, audio_layers: str | None = None, loras: Sequence[tuple[str | Path, float]] = ()) -> None:
        """The DiT's audio-layer set (`multitalk`, `infinitetalk-single`, `infinitetalk-multi`; None: unchanged) and
        merged LoRAs ((file, scale) pairs) for the next requests; only what changes is touched, exactly."""
        self.dit.set_weights(audio_layers, loras)

    def close(self) -> None:
        """Stop the DiT's worker processes, if it has any."""
        self.dit.close()

    def warm_up(
        self,
        size_bucket: str | Mapping[str, Sequence[int]] = "multitalk-480",
        frame_num: int = 81,
        vae_dtype: torch.dtype | None = None,
    ) -> Costs:
        """One-step generations that build every compiled graph a request takes, then one that measures what
        `estimate_seconds` needs, with the VAE in `vae_dtype` (None: as loaded).

        The first is a two-speaker clip of the most common shape (its graph is specialised to that shape); then two
        and one speakers at a small shape: torch.compile makes the sizes that differed dynamic, so no later request
        (one speaker, a short clip, another bucket, 720p) compiles.
        """
        config = self.dit.config
        table = ASPECT_RATIO_BUCKETS[size_bucket] if isinstance(size_bucket, str) else size_bucket
        height, width = table["0.50"] if "0.50" in table else next(iter(table.values()))
        audio = torch.zeros(frame_num, config.audio_layers, config.audio_channels)
        request = GenerationRequest("", Image.new("RGB", (width, height)), (audio, audio))
        options = SamplingOptions(
            size_bucket={"0.50": [height, width]},
            frame_num=frame_num,
            steps=1,
            seed=0,
            color_correction=1.0,
            text_scale=1.0,
            vae_dtype=vae_dtype,
        )
        self.stream(request, options, _discard, progress=False)
        small_height = 16 * max(2, round(height / 64))  # a quarter of the sides, the same aspect
        # Three passes a step: with DiT workers the three-pass schedule's rounds run every sequence degree it uses.
        small = dataclasses.replace(
            options,
            frame_num=WARM_UP_SMALL_FRAMES,
            text_scale=5.0,
            size_bucket={"0.50": [small_height, 16 * round(small_height * width / height / 16)]},
        )
        small_audio = torch.zeros(WARM_UP_SMALL_FRAMES, config.audio_layers, config.audio_channels)
        for speakers in (2, 1):  # dynamo never generalises a size of 1: one speaker is a graph of its own
            self.stream(dataclasses.replace(request, audio=(small_audio,) * speakers), small, _discard, progress=False)
        clock = StageClock(self.device)
        self.stream(request, options, _discard, progress=False, clock=clock)
        seconds = clock.seconds
        costs = Costs(
            pass_seconds=seconds[DIT] / sampling.passes_per_step(options.text_scale, options.audio_scale),
            tokens=tokens_of(frame_num, height, width),
            clip_seconds=sum(seconds[stage] for stage in CLIP_STAGES),
            pixels=height * width,
            frames=frame_num,
            text_seconds=seconds[TEXT_ENCODER],
        )
        log.info("warm-up: %s", costs.describe())
        return costs

    def plan(
        self,
        speech_frames: int,
        source_hw: tuple[int, int],
        options: SamplingOptions,
        loras: Sequence[tuple[str | Path, float]] | None = None,
    ) -> GenerationPlan:
        """The request's plan before any model work, for `speech_frames` frames of person 1's audio and a source
        (image or video frame) of `source_hw` pixels: clips, size, the audio and source frames read, the passes.
        `loras`: the LoRAs the request will run with (None: those merged now)."""
        return plan_generation(speech_frames, source_hw, options, self.computed_steps(options, loras))

    def computed_steps(self, options: SamplingOptions, loras: Sequence[tuple[str | Path, float]] | None = None) -> int:
        """The steps of each clip whose DiT passes run: all of them, less those TeaCache will skip. TeaCache decides
        from the time embedding alone, so this is exact before any clip runs, for the weights the DiT will hold:
        with `loras` merged (None: as it is now), which need not be merged for it."""
        if not options.guidance.use_teacache:
            return options.steps
        steps = sampling.timesteps(options.steps, options.shift)[:-1].view(-1, 1)
        return self.dit.teacache_steps(steps, _teacache_settings(options), loras)

    @torch.inference_mode()
    def generate(
        self,
        request: GenerationRequest,
        options: SamplingOptions,
        *,
        plan: GenerationPlan | None = None,
        on_step: StepCallback | None = None,
        clock: StageClock | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Video `[3, frames, H, W]` in [-1, 1] at 25 fps on the CPU, as long as person 1's audio (at most
        `max_frames`): `stream`'s clips put together."""
        clips: list[torch.Tensor] = []
        self.stream(request, options, clips.append, plan=plan, on_step=on_step, clock=clock, progress=progress)
        return torch.cat(clips, dim=1).float().cpu()

    @torch.inference_mode()
    def stream(
        self,
        request: GenerationRequest,
        options: SamplingOptions,
        on_frames: FramesCallback,
        *,
        plan: GenerationPlan | None = None,
        on_step: StepCallback | None = None,
        clock: StageClock | None = None,
        progress: bool = True,
    ) -> torch.Size:
        """The video clip by clip: `on_frames` gets each clip's new frames `[3, n, H, W]` (on the device) as soon as
        they are decoded, e.g. an `Mp4Writer` that encodes them while the next clip is generated; nothing else keeps
        them. `plan`: the request's `Pipeline.plan` (default: made here). Returns the whole video's shape
        `[3, frames, H, W]`."""
        started = time.monotonic()
        clock = clock or StageClock()
        seed = (
            options.seed
            if options.seed is not None and options.seed >= 0
            else random.SystemRandom().randint(0, 99_999_999)
        )
        if progress:  # a warm-up is silent
            log.info("seed %d", seed)

        # Inputs, checked before any model work.
        config = self.dit.config
        wanted = (config.audio_layers, config.audio_channels)
        if any(tuple(a.shape[1:]) != wanted for a in request.audio):
            shapes = [tuple(a.shape) for a in request.audio]
            raise ValueError(
                f"cond_audio: embeddings {shapes} do not match the model's [frames, {wanted[0]}, {wanted[1]}]"
            )
        active = self.dit.active_audio_layers
        if active is not None and not active.startswith(options.model):
            raise ValueError(
                f"model: the DiT holds the {active} audio layers, not {options.model}'s; call set_weights first"
            )
        speakers = [a.float() for a in request.audio]
        image = request.source_frame(0)
        if plan is None:
            plan = self.plan(speakers[0].shape[0], (image.height, image.width), options)
        height, width = plan.height, plan.width
        lat_h, lat_w = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
        boxes = None if request.boxes is None else [list(box) for box in request.boxes]
        masks = video_masks((image.height, image.width), len(speakers), boxes, height, width, options.face_scale)
        masks = masks.to(self.device)
        clips = plan.clips

        cond_image = image_to_tensor(image, height, width).to(self.device)
        with clock.stage(TEXT_ENCODER):
            context, context_null = self._encode_text(request.prompt, request.negative_prompt)
        timesteps = sampling.timesteps(options.steps, options.shift).to(self.device)
        generator = torch.Generator(self.device).manual_seed(seed)
        teacache = _teacache_settings(options) if options.guidance.use_teacache else None

        vae = self.vae if options.vae_dtype is None else self.vae.cast(options.vae_dtype)
        emitted = 0  # frames handed to on_frames
        previous: torch.Tensor | None = None  # the last clip's video, colour-corrected
        condition = None
        for index, start in enumerate(clips.starts):
            motion_frames = None if previous is None else previous[None, :, -options.motion_frame :]
            with clock.stage(VAE_ENCODE):
                if options.model == "infinitetalk":
                    source = cond_image if index == 0 else image_to_tensor(request.source_frame(start), height, width)
                    condition = infinitetalk_condition(
                        vae, source.to(self.device), motion_frames, clips.frames, previous=condition
                    )
                else:
                    cond_frames = cond_image if motion_frames is None else motion_frames
                    condition = multitalk_condition(vae, cond_frames, clips.frames, index == 0, self.dit.dtype)
            with clock.stage(IMAGE_ENCODER):
                clip_fea = self.image_encoder(condition.clip_frame)
            audio = clip_audio(speakers, clips, index).to(self.device)
            inputs = ClipInputs(context, context_null, clip_fea, condition.y, audio, masks)
            velocity = GuidedVelocity(self.dit, options.text_scale, options.audio_scale, options.guidance)
            latent = torch.randn(16, condition.y.shape[2], lat_h, lat_w, generator=generator, device=self.device)
            self.dit.begin_clip(inputs, len(velocity.branches), teacache)

            def report(step: int, clip: int = index + 1) -> None:
                info = StepInfo(step, options.steps, clip, clips.clips, time.monotonic() - started)
                if progress:
                    log.info(
                        "step %d/%d clip %d/%d elapsed %.1fs",
                        info.step,
                        info.steps,
                        info.clip,
                        info.clips,
                        info.elapsed,
                    )
                if on_step is not None:
                    on_step(info)

            with clock.stage(DIT):
                latent = denoise(velocity, latent, timesteps, condition.motion, generator, report)
            skipped = self.dit.end_clip()
            if skipped is not None and progress:
                log.info("TeaCache skipped %.0f%% of clip %d's DiT passes", 100 * skipped, index + 1)
            with clock.stage(VAE_DECODE):
                # The decoder is causal in time (a frame depends on the latent frames up to its own), so the latent
                # frames after those the video needs are left out: the last clip decodes only what it keeps.
                video = vae.decode(latent[:, : latent_frames(clips.frames_needed(index))])
            if options.color_correction > 0:
                with clock.stage(COLOR_CORRECTION):
                    video = match_colors(video, cond_image[0, :, 0], options.color_correction)
            frames = (video if index == 0 else video[:, options.motion_frame :])[:, : clips.total - emitted]
            emitted += frames.shape[1]
            on_frames(frames)
            previous = video
        return torch.Size((video.shape[0], emitted, *video.shape[2:]))

    def _encode_text(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Where the encoder runs is the memory plan's business (`wan.runtime.placement.place_text_encoder`).
        context, context_null = self.text_encoder([prompt, negative_prompt or self.negative_prompt])
        return context.to(self.device), context_null.to(self.device)


def _teacache_settings(options: SamplingOptions) -> TeaCacheSettings:
    # TeaCache's rescale polynomial is fitted per published bucket table; a custom table takes the 480p one.
    bucket = options.size_bucket if isinstance(options.size_bucket, str) else "multitalk-480"
    return TeaCacheSettings(options.guidance.teacache_thresh, bucket)
