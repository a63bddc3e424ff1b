"""MP4 writing and probing with PyAV (libav in this process; no ffmpeg binary, subprocess or temporary file).

The video is H.264 yuv420p tagged BT.709 limited range; the soundtrack is AAC, padded with silence or cut so that it
lasts exactly as long as the video.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from src.audio.decode import decode_native

from ..configs import FPS

AAC_FRAME_SIZE = 1024  # samples per AAC-LC frame: the encoder takes exactly this many per call
AAC_BIT_RATE = 192_000
# RGB -> BT.709 limited-range YUV 4:2:0, converted by swscale with the flags ffmpeg's scale filter uses (bicubic),
# so the encoder sees the same planes as from `ffmpeg -vf scale=out_color_matrix=bt709:out_range=tv`.
YUV = {"format": "yuv420p", "dst_colorspace": "ITU709", "dst_color_range": "MPEG", "interpolation": "BICUBIC"}
CONVERT_FRAMES = 16  # frames converted to uint8 RGB at once (bounded memory, fewer tensor ops than one by one)
BT709 = 1  # AVCOL_PRI_BT709 = AVCOL_TRC_BT709 = AVCOL_SPC_BT709


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """`[3, F, H, W]` in [-1, 1] → `[F, H, W, 3]` uint8, rounding (v + 1) / 2 * 255 to the nearest level.

    (v + 1) * 127.5 is that value rounded once, as (v + 1) / 2 * 255 is (halving is exact), in half the passes.
    """
    levels = (video.float() + 1).mul_(127.5).round_().clamp_(0, 255)
    return levels.to(torch.uint8).permute(1, 2, 3, 0)


def write_mp4(
    video: torch.Tensor,
    path: str | Path,
    audio_path: str | Path | None = None,
    fps: int = FPS,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Encode `video` `[3, F, H, W]` in [-1, 1] to an H.264 yuv420p MP4 at `path` (moov first, for streaming).

    The soundtrack (any audio or video file, read by content) is encoded as AAC at its own sample rate, padded with
    silence or cut to exactly F / fps seconds; more than two channels are mixed to mono. Audio and video packets
    are interleaved frame by frame. On any failure no file is left at `path`.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, F, H, W], got {tuple(video.shape)}")
    num_frames, height, width = video.shape[1:]
    if num_frames == 0:
        raise ValueError("video has no frames")
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    if audio_path is not None and not Path(audio_path).is_file():
        raise FileNotFoundError(f"soundtrack {audio_path} not found")
    # Decoded before the output is opened, so an unreadable soundtrack fails with nothing written.
    soundtrack = None if audio_path is None else _soundtrack(audio_path, num_frames / fps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            video_stream = _add_h264(container, width, height, fps, crf, preset)
            audio_stream = None if soundtrack is None else _add_aac(container, soundtrack)
            audio_written, rgb = 0, None
            for index in range(num_frames):
                if index % CONVERT_FRAMES == 0:
                    rgb = frames_to_uint8(video[:, index : index + CONVERT_FRAMES]).cpu().contiguous().numpy()
                frame = av.VideoFrame.from_ndarray(rgb[index % CONVERT_FRAMES], "rgb24").reformat(**YUV)
                frame.pts = index
                container.mux(video_stream.encode(frame))
                if audio_stream is not None:
                    until = round((index + 1) / fps * soundtrack[1])  # the audio that plays during this frame
                    audio_written = _mux_audio(container, audio_stream, soundtrack, audio_written, until)
            container.mux(video_stream.encode(None))
            if audio_stream is not None:
                container.mux(audio_stream.encode(None))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _add_h264(container: av.container.OutputContainer, width: int, height: int, fps: int, crf: int, preset: str):
    stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": preset})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    codec = stream.codec_context
    codec.time_base = Fraction(1, fps)
    # Threads as the ffmpeg command line sets them: x264 picks the count and uses frame threads, which encode while
    # the next frame is converted here, and give the command line's bitstream (PyAV's default is slice threads).
    codec.thread_count, codec.thread_type = 0, "FRAME"
    # Tagged so that players convert back to RGB with the matrix used above.
    codec.color_primaries, codec.color_trc, codec.colorspace, codec.color_range = BT709, BT709, BT709, 1
    return stream


def _add_aac(container: av.container.OutputContainer, soundtrack: tuple[np.ndarray, int]):
    samples, sample_rate = soundtrack
    stream = container.add_stream("aac", rate=sample_rate, layout="mono" if len(samples) == 1 else "stereo")
    stream.bit_rate = AAC_BIT_RATE
    stream.codec_context.time_base = Fraction(1, sample_rate)
    return stream


def _mux_audio(container, stream, soundtrack: tuple[np.ndarray, int], start: int, until: int) -> int:
    """Encode whole AAC frames of the soundtrack from sample `start` on, while they start before sample `until`
    (the last, short frame only when `until` is the end); returns where the next frame starts."""
    samples, sample_rate = soundtrack
    total = samples.shape[1]
    while start < until and (start + AAC_FRAME_SIZE <= until or until == total):
        chunk = np.ascontiguousarray(samples[:, start : start + AAC_FRAME_SIZE])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
        container.mux(stream.encode(frame))
        start += chunk.shape[1]
    return start


def _soundtrack(audio_path: str | Path, seconds: float) -> tuple[np.ndarray, int]:
    """The soundtrack as float32 [channels (1 or 2), samples], padded with silence or cut to `seconds`."""
    samples, sample_rate = decode_native(audio_path, name="soundtrack", max_seconds=None)
    if len(samples) > 2:
        samples = samples.mean(axis=0, keepdims=True)
    length = round(seconds * sample_rate)
    fitted = np.zeros((len(samples), length), np.float32)
    fitted[:, : min(length, samples.shape[1])] = samples[:, :length]
    return fitted, sample_rate


def probe_video(path: str | Path) -> dict:
    """Stream facts of a written file, read back with PyAV (decodes to count frames): frames, fps, size, codecs,
    durations in seconds (the longest stream for `duration`)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise RuntimeError(f"{path} has no video stream")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        facts = {
            "frames": sum(1 for _ in container.decode(video)),
            "fps": float(video.base_rate),
            "width": video.codec_context.width,
            "height": video.codec_context.height,
            "pix_fmt": video.codec_context.pix_fmt,
            "video_codec": video.codec_context.codec.canonical_name,
            "video_duration": float(video.duration * video.time_base),
            "audio_codec": None,
            "audio_duration": None,
            "audio_sample_rate": None,
            "duration": container.duration / av.time_base,
        }
        if audio is not None:
            facts["audio_codec"] = audio.codec_context.codec.canonical_name
            facts["audio_duration"] = float(audio.duration * audio.time_base)
            facts["audio_sample_rate"] = audio.rate
    return facts
