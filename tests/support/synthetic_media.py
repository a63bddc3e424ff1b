"""Test media written with PyAV's encoders (no ffmpeg binary needed): any container, video and/or audio."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVEL_STEP = 12  # grey levels between consecutive digits of a frame number


def write_media(
    path: Path,
    *,
    container_format: str | None = None,
    frames: np.ndarray | None = None,
    fps: Fraction | int = 25,
    video_codec: str = "libx264",
    video_options: dict[str, str] | None = None,
    audio: np.ndarray | None = None,
    sample_rate: int = 44100,
    audio_codec: str = "aac",
    rotation: int | None = None,
) -> Path:
    """Write `frames` (uint8 [T, H, W, 3] RGB, frame i at time i / fps) and/or `audio` (float [channels, samples]).

    The audio is converted to what the encoder takes (sample format, frame size, and the rate for encoders with fixed
    rates, e.g. 48 kHz for opus) by libswresample. `rotation`: display rotation, counter-clockwise degrees.
    """
    with av.open(str(path), "w", format=container_format) as container:
        video_stream = audio_stream = None
        if frames is not None:
            video_stream = container.add_stream(video_codec, rate=fps, options=video_options or {})
            video_stream.height, video_stream.width = frames.shape[1:3]
            video_stream.pix_fmt = "yuv420p"
            video_stream.codec_context.time_base = 1 / Fraction(fps)
            if rotation is not None:
                video_stream.set_display_rotation(rotation)
        if audio is not None:
            rate = sample_rate if audio_codec != "libopus" else 48000
            layout = "mono" if len(audio) == 1 else "stereo"
            audio_stream = container.add_stream(audio_codec, rate=rate, layout=layout)
            audio_stream.codec_context.open()  # now the encoder's frame size is known
            resampler = av.AudioResampler(audio_stream.codec_context.format, layout, rate,
                                          audio_stream.codec_context.frame_size or None)  # fmt: skip
        for index, image in enumerate(frames if frames is not None else []):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), "rgb24")
            frame.pts = index
            container.mux(video_stream.encode(frame))
        if audio is not None:
            source = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, np.float32), "fltp", layout)
            source.sample_rate, source.pts = sample_rate, 0
            for frame in resampler.resample(source) + resampler.resample(None):
                container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode(None))
        if video_stream is not None:
            container.mux(video_stream.encode(None))
    return path


def numbered_frames(count: int, height: int, width: int) -> np.ndarray:
    """uint8 [count, height, width, 3] grey frames that show their index (< 256): the left half's level is
    `16 + LEVEL_STEP * (index // 16)`, the right half's `16 + LEVEL_STEP * (index % 16)`. Flat areas come back from
    any lossy codec within a few levels, far less than LEVEL_STEP / 2."""
    frames = np.empty((count, height, width, 3), np.uint8)
    for index in range(count):
        frames[index, :, : width // 2] = 16 + LEVEL_STEP * (index // 16)
        frames[index, :, width // 2 :] = 16 + LEVEL_STEP * (index % 16)
    return frames


def frame_number(image: np.ndarray) -> int:
    """The index that `numbered_frames` drew into `image` (read from the middle of each half, away from the seam)."""
    height, width = image.shape[:2]
    rows, quarter = slice(height // 4, 3 * height // 4), width // 4
    left = image[rows, quarter // 2 : quarter + quarter // 2].mean()
    right = image[rows, 2 * quarter + quarter // 2 : 3 * quarter + quarter // 2].mean()
    return 16 * round((left - 16) / LEVEL_STEP) + round((right - 16) / LEVEL_STEP)
