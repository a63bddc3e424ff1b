"""Source video for InfiniteTalk dubbing: any video file, found by its content, decoded to RGB frames on the 25 fps
timeline of the generated video; and its soundtrack as 16 kHz mono.

Two rules pick the source frame of output frame k: `timing="reference"` takes source frame k whatever the source's
frame rate (the reference's rule); `timing="timestamps"` takes the frame on screen at k / 25 s, so the source keeps
its real speed, as its own soundtrack needs. Both agree on a 25 fps source. Rotation metadata is honoured and AV1 is
decoded directly. docs/design.md says how the reference picks its frames and why ours differ.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from collections.abc import Collection, Iterator
from typing import Literal

import av
import numpy as np

from wan.configs import FPS

from ..audio.decode import DEFAULT_MAX_SECONDS, TARGET_SAMPLE_RATE, cut_short, load_audio, open_media, packet_end

MAX_DECODED_BYTES = 8 << 30  # 1000 frames of 1080p (6.2 GB) fit; 40 s of 4K (24.9 GB) does not
VIDEO_HINT = "upload a video file (e.g. mp4, mov, mkv, webm, avi)"
FrameTiming = Literal["reference", "timestamps"]


class VideoInputError(ValueError):
    """A video input that cannot be used; the message names the input and says what to do."""


@dataclass(frozen=True)
class SourceVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB; frames[k] conditions output frame k (at k / 25 s)
    has_audio: bool  # whether the file has an audio stream (see `video_audio`)
    source_fps: Fraction | None  # the stream's average frame rate, where the container knows it


def read_video(
    path: str | os.PathLike,
    max_frames: int | None = None,
    timing: FrameTiming = "reference",
    name: str = "video",
    max_bytes: int = MAX_DECODED_BYTES,
) -> SourceVideo:
    """The first video stream of `path` as at most `max_frames` frames (None: all) on the 25 fps output timeline
    (see the module docstring for the two timing rules). Decoding stops once `max_frames` frames are chosen, so a
    long source costs only what is used. Corrupt, cut-short or non-video files raise `VideoInputError` naming
    `name`."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    with _output_frames(path, timing, name, max_frames or math.inf) as (chosen, container, stream):
        frames = _stack(chosen, name, os.fspath(path), max_bytes)
        has_audio, fps = bool(container.streams.audio), stream.average_rate
    return SourceVideo(frames=frames, has_audio=has_audio, source_fps=Fraction(fps) if fps else None)


def read_frames(
    path: str | os.PathLike, indices: Collection[int], timing: FrameTiming = "timestamps", name: str = "video"
) -> dict[int, np.ndarray]:
    """The frames of `path` at these output-frame indices (on the 25 fps timeline, as `read_video`), each index past
    the video's end getting its last frame (the reference's `extract_specific_frames`). Every frame up to the last
    index is decoded, but only these are kept: memory stays flat however long the video."""
    wanted = sorted(set(indices))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"indices must be frame numbers >= 0, got {list(indices)[:5]}")
    kept: dict[int, np.ndarray] = {}
    last: np.ndarray | None = None
    keep = set(wanted)
    with _output_frames(path, timing, name, wanted[-1] + 1) as (chosen, _, _):
        for index, image in enumerate(chosen):
            if last is not None and image.shape != last.shape:
                raise VideoInputError(f"{name}: the frame size of the video changes at frame {index}; re-export it")
            last = image
            if index in keep:
                kept[index] = image
    if last is None:
        raise VideoInputError(f"{name}: the file contains no video frames; {VIDEO_HINT}")
    return {index: kept.get(index, last) for index in wanted}


@contextlib.contextmanager
def _output_frames(
    path: str | os.PathLike, timing: FrameTiming, name: str, limit: float
) -> Iterator[tuple[Iterator[np.ndarray], av.container.InputContainer, av.VideoStream]]:
    """The first video stream of `path` as frames on the 25 fps output timeline, at most `limit` of them, decoded as
    they are taken; with the open container and stream."""
    if timing not in ("reference", "timestamps"):
        raise ValueError(f"timing {timing!r} is not supported; use 'reference' or 'timestamps'")
    path = os.fspath(path)
    with open_media(path, name, VIDEO_HINT, VideoInputError) as container:
        if not container.streams.video:
            raise VideoInputError(f"{name}: the file ({container.format.name}) has no video stream; {VIDEO_HINT}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: decoding order and output are unchanged
        source = _decoded_frames(container, stream, name, path)
        yield (_by_index(source, limit) if timing == "reference" else _by_time(source, limit)), container, stream


def video_audio(
    path: str | os.PathLike, name: str = "video", max_seconds: float | None = DEFAULT_MAX_SECONDS
) -> np.ndarray:
    """The soundtrack of a video as mono float32 at 16 kHz, decoded as every audio input is (`src.audio.load_audio`:
    libav decoding, librosa mono mix and resampling); loudness normalisation is left to the caller, as for any audio
    (`src.audio.normalize_loudness`). The reference instead has the ffmpeg binary resample to 16 kHz stereo 16-bit
    (`extract_audio_from_video` in generate_infinitetalk.py) before librosa's mono mix: measured on a 3 s chirp, the
    two agree in length, with correlation 0.99999 and a difference 46 dB below the signal."""
    with open_media(path, name, VIDEO_HINT, VideoInputError) as container:
        if not container.streams.audio:
            raise VideoInputError(
                f"{name}: the video has no sound to dub from; upload a video with an audio track, or give "
                "the audio as a separate file"
            )
    return load_audio(path, TARGET_SAMPLE_RATE, name=name, max_seconds=max_seconds)


def _decoded_frames(
    container: av.container.InputContainer, stream: av.VideoStream, name: str, path: str
) -> Iterator[tuple[Fraction, Fraction, np.ndarray]]:
    """(start, end, RGB image) of each frame in presentation order, in seconds from the first frame's start. Once
    the whole file is read, checks that it was not cut short (packets of every stream are read for that)."""
    first, data_end, index = None, None, 0
    fallback_duration = 1 / Fraction(stream.average_rate) if stream.average_rate else Fraction(1, FPS)
    try:
        for packet in container.demux():
            data_end = packet_end(packet, data_end)
            if packet.stream.index != stream.index:
                continue
            for frame in packet.decode():
                start = Fraction(frame.pts) * frame.time_base if frame.pts is not None else index * fallback_duration
                first = start if first is None else first
                duration = Fraction(frame.duration) * frame.time_base if frame.duration else fallback_duration
                yield start - first, start - first + duration, _upright(frame)
                index += 1
    except av.FFmpegError as error:
        raise _corrupt(name, path, error.strerror) from error
    if problem := cut_short(container, data_end):
        raise _corrupt(name, path, problem)


def _upright(frame: av.VideoFrame) -> np.ndarray:
    """RGB as displayed: the colour matrix and range the frame is tagged with (BT.601 limited when untagged), then
    its display rotation (counter-clockwise degrees; multiples of 90 only, others are left as stored)."""
    image = frame.to_ndarray(format="rgb24", interpolation="BICUBIC")  # the ffmpeg command line's scaler flags
    turns, rest = divmod(round(frame.rotation), 90)
    return np.ascontiguousarray(np.rot90(image, turns)) if turns % 4 and not rest else image


def _by_index(source: Iterator[tuple[Fraction, Fraction, np.ndarray]], max_frames: float) -> Iterator[np.ndarray]:
    """The reference: output frame k is source frame k."""
    for index, (_, _, image) in enumerate(source):
        yield image
        if index + 1 == max_frames:
            return


def _by_time(source: Iterator[tuple[Fraction, Fraction, np.ndarray]], max_frames: float) -> Iterator[np.ndarray]:
    """Output frame k is the source frame on screen at k / FPS: the last one starting at or before it."""
    chosen, previous, previous_end = 0, None, Fraction(0)
    for start, end, image in source:
        while previous is not None and Fraction(chosen, FPS) < start and chosen < max_frames:
            yield previous
            chosen += 1
        if chosen == max_frames:
            return
        previous, previous_end = image, end
    while previous is not None and Fraction(chosen, FPS) < previous_end and chosen < max_frames:
        yield previous
        chosen += 1


def _stack(chosen: Iterator[np.ndarray], name: str, path: str, max_bytes: int) -> np.ndarray:
    images = []
    for image in chosen:
        if (len(images) + 1) * image.nbytes > max_bytes:
            height, width = image.shape[:2]
            fit = max_bytes // image.nbytes
            raise VideoInputError(
                f"{name}: at most {fit} frames ({fit / FPS:.1f} s at 25 fps) of {width}x{height} fit in the "
                f"{max_bytes / 2**30:g} GiB allowed for decoded frames; upload a shorter or lower-resolution video"
            )
        if images and image.shape != images[0].shape:
            raise VideoInputError(
                f"{name}: the frame size of the video changes from {images[0].shape[1]}x{images[0].shape[0]} to "
                f"{image.shape[1]}x{image.shape[0]} at frame {len(images)}; re-export the video at one size"
            )
        images.append(image)
    if not images:
        raise VideoInputError(f"{name}: the file contains no video frames; {VIDEO_HINT}")
    frames = np.empty((len(images), *images[0].shape), np.uint8)
    for index in range(len(images)):
        frames[index], images[index] = images[index], None  # each decoded frame freed as it is copied: no 2x peak
    return frames


def _corrupt(name: str, path: str, detail: str) -> VideoInputError:
    return VideoInputError(
        f"{name}: the video could not be decoded cleanly ({detail}); the file is truncated or corrupt, "
        "re-export or re-upload it"
    )
