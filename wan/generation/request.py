"""What a generation is asked for: the content (`GenerationRequest`) and how to sample it (`SamplingOptions`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in source-image pixels, x = column
# MultiTalk continues each clip from the last frames of the one before; InfiniteTalk also re-anchors every clip on
# the source (image, or the video being dubbed) at the clip's start.
Model = Literal["multitalk", "infinitetalk"]


@dataclass(frozen=True)
class GuidanceOptions:
    """TeaCache and APG: the switches the reference reads from `extra_args`, with its CLI defaults."""

    use_teacache: bool = False
    teacache_thresh: float = 0.2
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0


@dataclass(frozen=True)
class SamplingOptions:
    """How to turn a request into frames. Defaults are the reference's `generate()` defaults, except `max_frames`
    (None: as long as person 1's audio)."""

    model: Model = "multitalk"
    size_bucket: str | Mapping[str, Sequence[int]] = "multitalk-480"  # a table name, or `{"h/w": [h, w]}`
    frame_num: int = 81  # pixel frames per clip, 4n+1
    motion_frame: int = 25  # frames a clip takes over from the previous one
    max_frames: int | None = None
    steps: int = 40
    shift: float = 5.0
    text_scale: float = 5.0
    audio_scale: float = 4.0
    seed: int | None = None  # None: a random seed, logged
    face_scale: float = 0.05
    color_correction: float = 0.0  # strength in [0, 1]
    guidance: GuidanceOptions = field(default_factory=GuidanceOptions)
    vae_dtype: torch.dtype | None = None  # None: the VAE as loaded (float32, as the reference)

    def __post_init__(self) -> None:
        if self.frame_num % 4 != 1:
            raise ValueError(
                f"frame_num must be 4n+1 (the VAE groups frames in 4s after the first), got {self.frame_num}"
            )
        if self.motion_frame < 1:
            raise ValueError(f"motion_frame must be >= 1, got {self.motion_frame}")
        if self.steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.color_correction <= 1.0:
            raise ValueError(f"color_correction_strength must be in [0, 1], got {self.color_correction}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames_num must be >= 1, got {self.max_frames}")
        if self.model not in ("multitalk", "infinitetalk"):
            raise ValueError(f"model must be 'multitalk' or 'infinitetalk', got {self.model!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One video's content. `image`: the picture to animate; or `video`, the video to dub (its frame 0 stands in for
    the image): uint8 `[frames, H, W, 3]` RGB at 25 fps, or only the frames the clips are anchored on (those at the
    clips' starts, `GenerationPlan.clips.starts`) as {frame index: `[H, W, 3]`}, so that a long video costs no more
    memory than a short one. `audio`: one wav2vec2 embedding `[frames, layers, channels]` per speaker (1 or 2,
    person 1 first, 25 frames a second); `boxes`: one box per speaker, or None for the left/right halves."""

    prompt: str
    image: Image.Image | None
    audio: tuple[torch.Tensor, ...]
    boxes: tuple[Box, ...] | None = None
    negative_prompt: str = ""  # empty: the model's default
    video: torch.Tensor | Mapping[int, torch.Tensor] | None = None

    def source_frame(self, index: int) -> Image.Image:
        """The source at frame `index`: the image, or the video's frame (its last frame past the end, as the
        reference's `extract_specific_frames`)."""
        if self.video is None:
            return self.image.convert("RGB")
        if isinstance(self.video, Mapping):
            if index not in self.video:
                raise ValueError(f"video: no source frame for frame {index}; give the frames at the clips' starts")
            return Image.fromarray(self.video[index].numpy())
        return Image.fromarray(self.video[min(index, self.video.shape[0] - 1)].numpy())

    def __post_init__(self) -> None:
        if self.image is None and self.video is None:
            raise ValueError("image: give an image to animate, or a video to dub")
        frames = list(self.video.values()) if isinstance(self.video, Mapping) else self.video
        if isinstance(self.video, Mapping) and 0 not in self.video:
            raise ValueError("video: the frames of a video to dub start with frame 0")
        if frames is not None and (not len(frames) or any(f.ndim != 3 or f.shape[-1] != 3 for f in frames)):
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else [tuple(f.shape) for f in frames[:3]]
            raise ValueError(f"video: expected uint8 [frames, H, W, 3] frames, got {shape}")
        if not 1 <= len(self.audio) <= 2:
            raise ValueError(f"cond_audio: MultiTalk drives 1 or 2 speakers, got {len(self.audio)}")
        for k, embedding in enumerate(self.audio):
            if embedding.ndim != 3 or embedding.shape[0] == 0:
                shape = tuple(embedding.shape)
                raise ValueError(
                    f"cond_audio.person{k + 1}: expected a [frames, layers, channels] embedding, got {shape}"
                )
            if not torch.isfinite(embedding).all():
                raise ValueError(f"cond_audio.person{k + 1}: the embedding contains NaN or inf")
        if self.boxes is not None and len(self.boxes) != len(self.audio):
            raise ValueError(f"bbox: {len(self.boxes)} boxes for {len(self.audio)} speakers; give one box per speaker")
