"""Decode any audio or video file, recognised by its content, to mono float32 at 16 kHz.

ffprobe finds the audio stream, ffmpeg decodes it to float32 PCM at its native rate and channel count through a
pipe (no temporary files), and librosa mixes to mono and resamples, exactly as `librosa.load(path, sr=16000)` does.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import librosa
import numpy as np

TARGET_SAMPLE_RATE = 16000
DEFAULT_MAX_SECONDS = 600.0


class AudioInputError(ValueError):
    """An audio input that cannot be used; the message names the input and says what to do."""


@dataclass(frozen=True)
class AudioStream:
    index: int
    codec: str
    sample_rate: int
    channels: int
    duration: float | None


def _ffmpeg_tool(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise RuntimeError(f"{tool} is not installed or not on PATH; it is needed to decode audio")
    return found


def _duration(value: object) -> float | None:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def probe_audio_stream(path: str | os.PathLike, name: str = "audio") -> AudioStream:
    """The first audio stream of `path`, found from the file's content (its extension is ignored)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioInputError(f"{name}: file {path!r} does not exist; upload an audio or video file")
    if os.path.getsize(path) == 0:
        raise AudioInputError(f"{name}: file {path!r} is empty (0 bytes); upload a non-empty audio or video file")
    command = [
        _ffmpeg_tool("ffprobe"), "-v", "error", "-of", "json",
        "-show_entries", "format=format_name,duration:stream=index,codec_type,codec_name,sample_rate,channels,duration",
        path,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL)
    report = json.loads(result.stdout or b"{}") if result.returncode == 0 else {}
    if "format" not in report:
        raise AudioInputError(
            f"{name}: {path!r} could not be read as audio or video ({_first_line(result.stderr)}): it is not a media "
            "file, or it is damaged; upload e.g. wav, flac, mp3, ogg/opus, m4a/aac, or a video with sound (mp4, mov, "
            "mkv, webm)"
        )
    audio = [s for s in report.get("streams", []) if s.get("codec_type") == "audio"]
    if not audio:
        kind = report["format"].get("format_name", "unknown format")
        raise AudioInputError(f"{name}: {path!r} ({kind}) has no audio stream; upload a file that contains sound")
    stream = audio[0]
    sample_rate, channels = int(stream.get("sample_rate") or 0), int(stream.get("channels") or 0)
    if sample_rate <= 0 or channels <= 0:
        raise AudioInputError(
            f"{name}: the audio stream of {path!r} has no valid sample rate or channel count; "
            "the file is corrupt, re-export it"
        )
    duration = _duration(stream.get("duration")) or _duration(report["format"].get("duration"))
    return AudioStream(int(stream["index"]), stream.get("codec_name", "?"), sample_rate, channels, duration)


def _first_line(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[0] if lines else "no details"


def decode_native(
    path: str | os.PathLike, name: str = "audio", max_seconds: float | None = DEFAULT_MAX_SECONDS
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of `path` to float32 samples [channels, frames] at its native sample rate.

    Decoder errors (truncated or damaged data) are reported, not skipped over. At most `max_seconds` (+1 s, to detect
    the excess) are decoded, so an over-long input costs no more memory than an allowed one.
    """
    path = os.fspath(path)
    stream = probe_audio_stream(path, name)
    if max_seconds is not None and stream.duration is not None and stream.duration > max_seconds:
        raise _too_long(name, stream.duration, max_seconds)
    if _wav_is_cut_short(path):
        raise AudioInputError(
            f"{name}: the wav file {path!r} is truncated (its header declares more audio than the file holds); "
            "re-export or re-upload it"
        )
    command = [_ffmpeg_tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "level+warning", "-i", path]
    command += ["-map", f"0:{stream.index}"]
    if max_seconds is not None:
        command += ["-t", f"{max_seconds + 1.0:.3f}"]
    # Asking for the probed rate and channel count keeps the decoder's own output: no resampling or remixing here.
    command += ["-ac", str(stream.channels), "-ar", str(stream.sample_rate), "-f", "f32le", "-acodec", "pcm_f32le", "-"]
    result = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL)
    problems = _decode_problems(result.stderr.decode(errors="replace"))
    if result.returncode != 0 or problems:
        raise AudioInputError(
            f"{name}: the {stream.codec} audio in {path!r} could not be decoded cleanly "
            f"({problems[0] if problems else 'ffmpeg exit code ' + str(result.returncode)}); "
            "the file is truncated or corrupt, re-export or re-upload it"
        )
    samples = np.frombuffer(result.stdout, dtype="<f4")
    usable = samples.size - samples.size % stream.channels
    samples = samples[:usable].reshape(-1, stream.channels).T
    if samples.shape[1] == 0:
        raise AudioInputError(f"{name}: {path!r} contains no audio samples; upload a file with sound in it")
    seconds = samples.shape[1] / stream.sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise _too_long(name, seconds, max_seconds)
    if not np.isfinite(samples).all():
        raise AudioInputError(f"{name}: {path!r} contains NaN or infinite samples; re-export it as ordinary audio")
    return samples, stream.sample_rate


# ffmpeg logs missing data (a file cut short) only as warnings; these are the ones that mean samples were lost.
# ("Packet corrupt" is not one: ffmpeg also says it for the short last packet of a streamed wav; see _wav_is_cut_short.)
_DATA_LOSS_WARNINGS = ("do not match", "prematurely", "truncat")
_LOG_PREFIX = re.compile(r"^\s*(\[[^\]]*\]\s*)+")


def _decode_problems(log: str) -> list[str]:
    """Log lines of an ffmpeg run (`-loglevel level+warning`) that mean the decoded audio is incomplete or wrong."""
    problems = []
    for line in log.splitlines():
        if any(f"[{level}]" in line for level in ("error", "fatal", "panic")):
            problems.append(_LOG_PREFIX.sub("", line))
        elif "[warning]" in line and any(word in line.lower() for word in _DATA_LOSS_WARNINGS):
            problems.append(_LOG_PREFIX.sub("", line))
    return problems


def _wav_is_cut_short(path: str) -> bool:
    """A RIFF/WAVE file whose `data` chunk declares more bytes than the file holds (ffmpeg decodes such a file
    without an error). Streamed wavs declare 0 or 0xFFFFFFFF and are not cut short."""
    with open(path, "rb") as file:
        header = file.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return False
        while chunk := file.read(8):
            if len(chunk) < 8:
                return False
            chunk_id, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if chunk_id == b"data":
                return size not in (0, 0xFFFFFFFF) and file.tell() + size > os.path.getsize(path)
            file.seek(size + size % 2, os.SEEK_CUR)
    return False


def _too_long(name: str, seconds: float, max_seconds: float) -> AudioInputError:
    return AudioInputError(
        f"{name}: audio is {seconds:.1f} s long, more than the maximum of {max_seconds:g} s; trim it and upload again"
    )


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = TARGET_SAMPLE_RATE,
    name: str = "audio",
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Mono float32 audio at `sample_rate`, as `librosa.load(path, sr=sample_rate)` gives it.

    Mono is the mean of the channels (`librosa.to_mono`); resampling is `librosa.resample` with librosa's default
    resampler, which is what `librosa.load` uses too.
    """
    samples, native_rate = decode_native(path, name, max_seconds)
    mono = librosa.to_mono(samples)
    return librosa.resample(mono, orig_sr=native_rate, target_sr=sample_rate).astype(np.float32, copy=False)
