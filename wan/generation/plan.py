"""A request planned before any model work: how the video is cut into clips, the audio each clip reads, its size and
its DiT passes.

Clip mode and streaming are one schedule: the first clip is conditioned on the image, every later one on the last
`motion_frame` frames of the one before, until the video is as long as it must be (the reference's rules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..configs import FPS, VAE_STRIDE
from . import sampling
from .conditioning import audio_window, choose_bucket
from .request import SamplingOptions


@dataclass(frozen=True)
class ClipPlan:
    """`frames` pixel frames per clip, clip k starting at audio frame `starts[k]`, `total` frames kept in the end.
    `pad_last`: the last clip reads past the audio and gets the reference's mirrored padding."""

    frames: int
    starts: tuple[int, ...]
    total: int
    pad_last: bool

    @property
    def clips(self) -> int:
        return len(self.starts)

    def frames_needed(self, index: int) -> int:
        """How many of clip `index`'s frames, from its first, the video needs: all of them for a clip before the last
        (the next clip is conditioned on its tail), those up to `total` for the last."""
        return self.frames if index < self.clips - 1 else self.total - self.starts[index]


@dataclass(frozen=True)
class GenerationPlan:
    """One request as it will run (`Pipeline.plan`): what reads its inputs, the estimate and the clip loop share."""

    clips: ClipPlan
    height: int  # the size bucket's pixels
    width: int
    speech_frames: int  # person 1's audio, in frames at 25 fps
    embedded_frames: int  # the frames of it the clips read (the rest needs no wav2vec2)
    source_frames: tuple[int, ...]  # the frames of a source video the clips are anchored on
    steps: int
    computed_steps: int  # steps of a clip whose DiT passes run: TeaCache's skips taken off
    passes_per_step: int

    @property
    def frames(self) -> int:
        """Frames of the video, at 25 fps."""
        return self.clips.total

    @property
    def passes_per_clip(self) -> int:
        return self.computed_steps * self.passes_per_step

    def audio_samples(self, sample_rate: int) -> int:
        """Samples of audio that give the frames the clips read (`int(seconds * 25)`, as the embedding counts them)."""
        return math.ceil(self.embedded_frames * sample_rate / FPS)


def plan_generation(
    speech_frames: int, source_hw: tuple[int, int], options: SamplingOptions, computed_steps: int
) -> GenerationPlan:
    """The plan for `speech_frames` frames of person 1's audio and a source (image or video frame) of `source_hw`
    pixels; `computed_steps`: the steps of a clip whose passes run (`Pipeline.computed_steps`)."""
    clips = plan_clips(speech_frames, options.frame_num, options.motion_frame, options.max_frames)
    height, width = choose_bucket(*source_hw, options.size_bucket)
    return GenerationPlan(
        clips=clips,
        height=height,
        width=width,
        speech_frames=speech_frames,
        embedded_frames=min(speech_frames, frames_read(clips)),
        # MultiTalk takes a video's first frame for the image; InfiniteTalk anchors every clip on the frame at its
        # start.
        source_frames=(0,) if options.model == "multitalk" else clips.starts,
        steps=options.steps,
        computed_steps=computed_steps,
        passes_per_step=sampling.passes_per_step(options.text_scale, options.audio_scale),
    )


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


def latent_frames(frames: int) -> int:
    """The latent frames that decode to (at least) `frames` pixel frames: the first alone, then `VAE_STRIDE[0]` each."""
    return 1 + math.ceil((frames - 1) / VAE_STRIDE[0])


def frames_read(plan: ClipPlan, window: int = 5) -> int:
    """How many audio frames the plan's windows can read: up to half a window past the last clip's end."""
    return plan.starts[-1] + plan.frames + window // 2


def pad_audio(embedding: torch.Tensor, clip_end: int) -> torch.Tensor:
    """The reference's padding for the last clip: audio that ends at or before `clip_end` gets its last
    `clip_end - L + 3` frames appended in reverse (so frame L + j repeats frame L - 1 - j), which the audio windows
    of the last frames (up to `clip_end + 1`) read. Audio shorter than that appends all of itself, reversed."""
    if clip_end < embedding.shape[0]:
        return embedding
    missing = clip_end - embedding.shape[0] + 3
    return torch.cat([embedding, embedding[-missing:].flip(0)])


def clip_audio(speakers: Sequence[torch.Tensor], plan: ClipPlan, index: int, window: int = 5) -> torch.Tensor:
    """Audio windows of clip `index`, `[speakers, frames, window, layers, channels]`; each speaker's windows clamp to
    its own length, and the last clip reads the reference's padding."""
    start = plan.starts[index]
    if plan.pad_last and index == plan.clips - 1:
        speakers = [pad_audio(s, start + plan.frames) for s in speakers]
    return torch.stack([audio_window(s, start, plan.frames, window) for s in speakers])
