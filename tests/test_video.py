"""MP4 writing checked by decoding the file with ffprobe / ffmpeg."""

from __future__ import annotations

import math
import struct
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from wan.generation.video import frames_to_uint8, probe_video, write_mp4

FRAMES, HEIGHT, WIDTH, FPS = 9, 48, 64, 25


def _video() -> torch.Tensor:
    """Smooth colour gradients (codec-friendly), slowly changing over time, in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-0.8, 0.8, HEIGHT), torch.linspace(-0.8, 0.8, WIDTH), indexing="ij")
    frames = [torch.stack([xx, yy, 0.5 * xx * yy + 0.05 * t]) for t in range(FRAMES)]
    return torch.stack(frames, dim=1)


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    samples = [int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(seconds * rate))]
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return path


def _decode(path: Path) -> torch.Tensor:
    cmd = ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(-1, HEIGHT, WIDTH, 3).copy())


@pytest.fixture
def clean_dirs(tmp_path, monkeypatch):
    """Run in an empty CWD with a private temp root, so leftovers in either are visible."""
    cwd, tmp_root = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp_root.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    yield cwd, tmp_root
    assert list(cwd.iterdir()) == []
    assert list(tmp_root.iterdir()) == []


@pytest.mark.parametrize("audio_seconds", [1.3, 0.2], ids=["audio_longer", "audio_shorter"])
def test_write_mp4_streams_and_durations(tmp_path, clean_dirs, audio_seconds: float) -> None:
    audio = _wav(tmp_path / "voice.wav", audio_seconds)
    out = write_mp4(_video(), tmp_path / "out" / "video.mp4", audio, fps=FPS)
    facts = probe_video(out)
    assert facts["frames"] == FRAMES
    assert facts["fps"] == FPS
    assert (facts["width"], facts["height"]) == (WIDTH, HEIGHT)
    assert facts["video_codec"] == "h264" and facts["pix_fmt"] == "yuv420p"
    assert facts["audio_codec"] == "aac"
    assert abs(facts["video_duration"] - FRAMES / FPS) < 1 / FPS
    assert abs(facts["audio_duration"] - facts["video_duration"]) < 1 / FPS


def test_write_mp4_pixels_round_trip(tmp_path, clean_dirs) -> None:
    video = _video()
    out = write_mp4(video, tmp_path / "silent.mp4", None)
    assert probe_video(out)["audio_codec"] is None
    decoded = _decode(out)
    assert decoded.shape == (FRAMES, HEIGHT, WIDTH, 3)
    error = (decoded.int() - frames_to_uint8(video).int()).abs().float()
    assert error.mean() < 3.0  # 8-bit limited-range YUV 4:2:0 at crf 18
    assert error.max() < 20


def test_frames_to_uint8_rounds() -> None:
    levels = torch.tensor([-1.0, 1.0, 127.6 * 2 / 255 - 1, 127.4 * 2 / 255 - 1, 1.5, -3.0])
    out = frames_to_uint8(levels.view(1, 1, 1, -1).expand(3, 1, 1, -1))
    assert out.shape == (1, 1, 6, 3)
    assert out[0, 0, :, 0].tolist() == [0, 255, 128, 127, 255, 0]


def test_write_mp4_errors(tmp_path, clean_dirs) -> None:
    with pytest.raises(ValueError, match="even"):
        write_mp4(torch.zeros(3, 2, 15, 16), tmp_path / "odd.mp4")
    with pytest.raises(FileNotFoundError):
        write_mp4(torch.zeros(3, 2, 16, 16), tmp_path / "x.mp4", tmp_path / "missing.wav")
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    with pytest.raises(RuntimeError, match="ffmpeg encode failed"):
        write_mp4(torch.zeros(3, 2, 16, 16), tmp_path / "bad.mp4", not_audio)
    assert not (tmp_path / "bad.mp4").exists()
