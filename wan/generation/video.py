"""MP4 writing (one ffmpeg encode: H.264 video plus the AAC soundtrack cut to the video's length) and probing."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import torch

from ..configs import FPS

STDERR_TAIL = 4000


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """`[3, F, H, W]` in [-1, 1] → `[F, H, W, 3]` uint8, rounding to the nearest level."""
    levels = ((video.float() + 1) / 2 * 255).round().clamp(0, 255)
    return levels.to(torch.uint8).permute(1, 2, 3, 0)


def _fail(what: str, stderr_file: Path, returncode: int | None) -> RuntimeError:
    tail = stderr_file.read_text(errors="replace")[-STDERR_TAIL:] if stderr_file.exists() else ""
    return RuntimeError(f"{what} failed (exit code {returncode}):\n{tail.strip()}")


def write_mp4(
    video: torch.Tensor,
    path: str | Path,
    audio_path: str | Path | None = None,
    fps: int = FPS,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Encode `video` `[3, F, H, W]` in [-1, 1] to an H.264 yuv420p MP4 at `path`, in one ffmpeg pass.

    The soundtrack (any file ffmpeg reads) is encoded as AAC, padded with silence or cut so that it lasts exactly
    F / fps seconds like the video. Intermediate files live in a private temporary directory.
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
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg not found on PATH (install it, e.g. `make ffmpeg`)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = num_frames / fps

    with tempfile.TemporaryDirectory(prefix="write_mp4-") as tmp:
        encoded = Path(tmp) / "video.mp4"
        stderr_file = Path(tmp) / "ffmpeg.log"
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps)]
        cmd += ["-i", "pipe:0"]
        if audio_path is not None:
            cmd += ["-i", str(audio_path), "-map", "0:v:0", "-map", "1:a:0"]
        # Tag BT.709 so players convert back to RGB with the matrix the encoder used.
        cmd += ["-vf", "scale=out_color_matrix=bt709:out_range=tv", "-colorspace", "bt709", "-color_primaries", "bt709"]
        cmd += ["-color_trc", "bt709", "-color_range", "tv"]
        cmd += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p"]
        if audio_path is not None:
            cmd += ["-c:a", "aac", "-b:a", "192k", "-af", "apad"]
        cmd += ["-t", f"{duration:.6f}", "-movflags", "+faststart", str(encoded)]

        with open(stderr_file, "wb") as stderr:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                for i in range(num_frames):
                    frame = frames_to_uint8(video[:, i : i + 1])[0].contiguous()
                    proc.stdin.write(frame.numpy().tobytes())
                proc.stdin.close()
            except BrokenPipeError:
                # ffmpeg exited early; its exit code and log say why.
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            returncode = proc.wait()
        if returncode != 0 or not encoded.is_file():
            raise _fail("ffmpeg encode", stderr_file, returncode)
        shutil.move(str(encoded), path)
    return path


def probe_video(path: str | Path) -> dict:
    """Stream facts via ffprobe (decodes to count frames): frames, fps, size, codecs, durations in seconds."""
    if shutil.which("ffprobe") is None:
        raise RuntimeError("ffprobe not found on PATH (install ffmpeg, e.g. `make ffmpeg`)")
    cmd = ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffprobe {path} failed (exit code {result.returncode}):\n{result.stderr[-STDERR_TAIL:]}")
    info = json.loads(result.stdout)
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None:
        raise RuntimeError(f"{path} has no video stream")
    facts = {
        "frames": int(video.get("nb_read_frames") or video.get("nb_frames") or 0),
        "fps": float(Fraction(video["r_frame_rate"])),
        "width": int(video["width"]),
        "height": int(video["height"]),
        "pix_fmt": video.get("pix_fmt"),
        "video_codec": video.get("codec_name"),
        "video_duration": float(video.get("duration", "nan")),
        "audio_codec": None,
        "audio_duration": None,
        "audio_sample_rate": None,
        "duration": float(info.get("format", {}).get("duration", "nan")),
    }
    if audio is not None:
        facts["audio_codec"] = audio.get("codec_name")
        facts["audio_duration"] = float(audio.get("duration", "nan"))
        facts["audio_sample_rate"] = int(audio.get("sample_rate", 0))
    return facts
