"""MP4 writing (also while the frames are still being made) and probing with PyAV (libav in this process; no ffmpeg
binary, subprocess or temporary file).

The video is H.264 yuv420p tagged BT.709 limited range; the soundtrack is AAC, padded with silence or cut so that it
lasts exactly as long as the video.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from wan.configs import FPS

from ..audio.decode import decode_native

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


class Mp4Writer:
    """An H.264 yuv420p MP4 (moov first, for streaming) written while its frames still arrive.

    `write()` takes frames `[3, n, H, W]` in [-1, 1] (any device) as they are made, converts them to uint8 RGB on
    the caller's thread and encodes them on a background one (libav releases the GIL), so a video is encoded while
    its next clip is generated; `close()` waits for that and finishes the file. The frame size is the first
    frames'. The soundtrack (any audio or video file, read by content) is encoded as AAC at its own sample rate,
    padded with silence or cut to exactly `num_frames / fps` seconds; more than two channels are mixed to mono.
    Audio and video packets are interleaved frame by frame. Use it as a context manager: on any failure, here or in
    the code that feeds it, no file is left at `path`.
    """

    def __init__(
        self,
        path: str | Path,
        num_frames: int,
        audio_path: str | Path | None = None,
        fps: int = FPS,
        crf: int = 18,
        preset: str = "medium",
    ):
        if num_frames < 1:
            raise ValueError("video has no frames")
        if audio_path is not None and not Path(audio_path).is_file():
            raise FileNotFoundError(f"soundtrack {audio_path} not found")
        self.path, self.num_frames, self.fps, self.crf, self.preset = Path(path), num_frames, fps, crf, preset
        # Decoded before the output is opened, so an unreadable soundtrack fails with nothing written.
        self.soundtrack = None if audio_path is None else _soundtrack(audio_path, num_frames / fps)
        self.frames_given = 0
        self._container = self._video_stream = self._audio_stream = None
        self._audio_written = 0
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp4")  # one thread: frames in order
        self._pending: list[Future] = []
        self._closed = False

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self._abort()
        elif not self._closed:
            self.close()

    def write(self, video: torch.Tensor) -> None:
        """Queue frames `[3, n, H, W]` in [-1, 1] for encoding; an error of earlier frames' encoding is raised here."""
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"video must be [3, F, H, W], got {tuple(video.shape)}")
        count, height, width = video.shape[1:]
        if self.frames_given + count > self.num_frames:
            raise ValueError(f"{self.frames_given + count} frames given for a video of {self.num_frames}")
        if self._container is None:
            self._open(width, height)
        elif (height, width) != (self._video_stream.height, self._video_stream.width):
            raise ValueError(
                f"frames of {width}x{height} in a {self._video_stream.width}x{self._video_stream.height} video"
            )
        for done in [f for f in self._pending if f.done()]:
            done.result()
            self._pending.remove(done)
        for offset in range(0, count, CONVERT_FRAMES):
            rgb = frames_to_uint8(video[:, offset : offset + CONVERT_FRAMES]).cpu().contiguous().numpy()
            self._pending.append(self._encoder.submit(self._encode, rgb, self.frames_given + offset))
        self.frames_given += count

    def close(self) -> Path:
        """Wait for the queued frames, flush the encoders and finish the file; the path written."""
        if self._closed:
            return self.path
        try:
            for future in self._pending:
                future.result()
            if self.frames_given != self.num_frames:
                raise ValueError(f"{self.frames_given} frames given for a video of {self.num_frames}")
            self._container.mux(self._video_stream.encode(None))
            if self._audio_stream is not None:
                self._container.mux(self._audio_stream.encode(None))
            self._container.close()
        except BaseException:
            self._abort()
            raise
        self._encoder.shutdown()
        self._closed = True
        return self.path

    def _open(self, width: int, height: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w", format="mp4", options={"movflags": "+faststart"})
        try:
            self._video_stream = _add_h264(self._container, width, height, self.fps, self.crf, self.preset)
            self._audio_stream = None if self.soundtrack is None else _add_aac(self._container, self.soundtrack)
        except BaseException:
            self._abort()
            raise

    def _encode(self, rgb: np.ndarray, first: int) -> None:
        for offset, pixels in enumerate(rgb):
            index = first + offset
            frame = av.VideoFrame.from_ndarray(pixels, "rgb24").reformat(**YUV)
            frame.pts = index
            self._container.mux(self._video_stream.encode(frame))
            if self._audio_stream is not None:
                until = round((index + 1) / self.fps * self.soundtrack[1])  # the audio that plays during this frame
                self._audio_written = _mux_audio(
                    self._container, self._audio_stream, self.soundtrack, self._audio_written, until
                )

    def _abort(self) -> None:
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._encoder.shutdown(wait=True)
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # a half-written file: it goes anyway
                pass
        self.path.unlink(missing_ok=True)


def write_mp4(
    video: torch.Tensor,
    path: str | Path,
    audio_path: str | Path | None = None,
    fps: int = FPS,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Encode `video` `[3, F, H, W]` in [-1, 1] to an MP4 at `path` with the soundtrack of `audio_path` (see
    `Mp4Writer`); on any failure no file is left at `path`."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, F, H, W], got {tuple(video.shape)}")
    with Mp4Writer(path, video.shape[1], audio_path, fps, crf, preset) as writer:
        writer.write(video)
    return writer.path


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
