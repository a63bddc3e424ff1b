"""MP4 writing, checked three ways: PyAV reads the file back; a small MP4 box parser (no libav) reads the structure
the file declares; and ffprobe / ffmpeg read it independently (`support.ffmpeg_tools`)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from support.ffmpeg_tools import ffmpeg_tool
from support.mp4_boxes import avc_format, colour, mp4_tracks
from support.synthetic_media import write_media
from src.video.mp4 import Mp4Writer, frames_to_uint8, probe_video, write_mp4

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
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames))


# --- tests ----------------------------------------------------------------------------------------------------------


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
    assert facts["audio_codec"] == "aac" and facts["audio_sample_rate"] == 16000
    assert abs(facts["video_duration"] - FRAMES / FPS) < 1 / FPS
    assert abs(facts["audio_duration"] - facts["video_duration"]) < 1 / FPS

    tracks = mp4_tracks(out)
    video, sound = tracks["vide"], tracks["soun"]
    assert video["codec"] == "avc1" and video["samples"] == FRAMES and video["deltas"] == {1 / FPS}
    assert video["media_seconds"] == video["edit_seconds"] == FRAMES / FPS
    assert avc_format(video["sample_entry"]) == {"profile": 100, "chroma_format_idc": 1, "bit_depth": 8}  # 4:2:0
    assert colour(video["sample_entry"]) == (1, 1, 1, 0)  # BT.709 primaries, transfer, matrix; limited range
    assert sound["codec"] == "mp4a" and max(sound["deltas"]) == 1024 / 16000  # AAC-LC frames (the last may be short)
    # The soundtrack is padded or cut to exactly the video's length (after the encoder delay the edit list skips).
    assert sound["media_seconds"] - sound["skip_seconds"] == pytest.approx(FRAMES / FPS, abs=1e-9)
    assert sound["edit_seconds"] == pytest.approx(FRAMES / FPS, abs=1e-3)  # the movie timescale is 1 ms


def test_write_mp4_soundtrack_content(tmp_path) -> None:
    """A stereo 44.1 kHz flac soundtrack keeps its rate and channels; the tone comes back where it was."""
    t = np.arange(int(0.5 * 44100)) / 44100
    tone = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 880 * t)]).astype(np.float32) * 0.5
    soundtrack = write_media(tmp_path / "tone.flac", audio=tone, audio_codec="flac")
    out = write_mp4(_video(), tmp_path / "out.mp4", soundtrack, fps=FPS)
    with av.open(str(out)) as container:
        stream = container.streams.audio[0]
        assert (stream.rate, stream.channels) == (44100, 2)
        decoded = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
    sound, length = mp4_tracks(out)["soun"], round(FRAMES / FPS * 44100)
    assert sound["media_seconds"] * 44100 - sound["skip_seconds"] * 44100 == length
    # libav drops the encoder delay the edit list skips, but decodes the last AAC frame whole (1024 samples).
    assert length <= decoded.shape[1] < length + 1024
    decoded = decoded[:, :length]
    for channel in range(2):
        spectrum = np.abs(np.fft.rfft(decoded[channel]))
        assert np.argmax(spectrum) * 44100 / length == pytest.approx(440 * (channel + 1), abs=2 * 44100 / length)
        assert np.corrcoef(decoded[channel, 2000:-2000], tone[channel, 2000 : length - 2000])[0, 1] > 0.99


def test_write_mp4_pixels_round_trip(tmp_path, clean_dirs) -> None:
    video = _video()
    out = write_mp4(video, tmp_path / "silent.mp4", None)
    assert probe_video(out)["audio_codec"] is None
    assert "soun" not in mp4_tracks(out)
    decoded = _decode(out)
    assert decoded.shape == (FRAMES, HEIGHT, WIDTH, 3)
    error = (decoded.int() - frames_to_uint8(video).int()).abs().float()
    assert error.mean() < 3.0  # 8-bit limited-range YUV 4:2:0 at crf 18
    assert error.max() < 20


def test_ffmpeg_binaries_read_the_file_alike(tmp_path) -> None:
    video = _video()
    out = write_mp4(video, tmp_path / "v.mp4", _wav(tmp_path / "voice.wav", 1.0), fps=FPS)
    command = [
        ffmpeg_tool("ffprobe"),
        "-v",
        "error",
        "-count_frames",
        "-show_streams",
        "-show_format",
        "-of",
        "json",
        str(out),
    ]
    streams = {
        s["codec_type"]: s
        for s in json.loads(subprocess.run(command, capture_output=True, check=True).stdout)["streams"]
    }
    assert streams["video"]["codec_name"] == "h264" and streams["video"]["pix_fmt"] == "yuv420p"
    assert int(streams["video"]["nb_read_frames"]) == FRAMES and Fraction(streams["video"]["r_frame_rate"]) == FPS
    assert float(streams["video"]["duration"]) == pytest.approx(FRAMES / FPS)
    assert streams["audio"]["codec_name"] == "aac"
    assert float(streams["audio"]["duration"]) == pytest.approx(FRAMES / FPS, abs=1 / FPS)
    command = [ffmpeg_tool("ffmpeg"), "-v", "error", "-i", str(out), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    decoded = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(FRAMES, HEIGHT, WIDTH, 3).copy())
    assert (decoded.int() - frames_to_uint8(video).int()).abs().float().mean() < 3.0


def test_frames_to_uint8_rounds() -> None:
    levels = torch.tensor([-1.0, 1.0, 127.6 * 2 / 255 - 1, 127.4 * 2 / 255 - 1, 1.5, -3.0])
    out = frames_to_uint8(levels.view(1, 1, 1, -1).expand(3, 1, 1, -1))
    assert out.shape == (1, 1, 6, 3)
    assert out[0, 0, :, 0].tolist() == [0, 255, 128, 127, 255, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frames_to_uint8_equals_the_plain_formula(dtype: torch.dtype) -> None:
    video = (torch.rand(3, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1).to(dtype)
    before = video.clone()
    plain = ((video.float() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
    assert torch.equal(frames_to_uint8(video), plain)
    assert torch.equal(video, before)  # the input is not modified


def test_write_mp4_errors(tmp_path, clean_dirs) -> None:
    with pytest.raises(ValueError, match="even"):
        write_mp4(torch.zeros(3, 2, 15, 16), tmp_path / "odd.mp4")
    with pytest.raises(FileNotFoundError):
        write_mp4(torch.zeros(3, 2, 16, 16), tmp_path / "x.mp4", tmp_path / "missing.wav")
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    with pytest.raises(ValueError, match="^soundtrack: .*could not be read as audio or video"):
        write_mp4(torch.zeros(3, 2, 16, 16), tmp_path / "bad.mp4", not_audio)
    assert not (tmp_path / "bad.mp4").exists()
    # A failure once the file is open (x264 refuses the preset) leaves no partial file either.
    with pytest.raises(av.FFmpegError):
        write_mp4(torch.zeros(3, 2, 16, 16), tmp_path / "partial.mp4", preset="no-such-preset")
    assert not (tmp_path / "partial.mp4").exists()


def test_frames_written_as_they_come_make_the_same_file(tmp_path, clean_dirs) -> None:
    """Clips handed over one by one (as the runner does while the next clip is generated) give the file that the
    whole video at once gives, byte for byte, with its audio interleaved to the last frame."""
    video, soundtrack = _video(), _wav(tmp_path / "voice.wav", 1.3)
    whole = write_mp4(video, tmp_path / "whole.mp4", soundtrack, fps=FPS)
    with Mp4Writer(tmp_path / "parts.mp4", FRAMES, soundtrack, fps=FPS) as writer:
        for start, stop in ((0, 5), (5, 7), (7, FRAMES)):
            writer.write(video[:, start:stop])
        parts = writer.close()
    assert parts.read_bytes() == whole.read_bytes()
    facts = probe_video(parts)
    assert facts["frames"] == FRAMES and facts["audio_duration"] == pytest.approx(FRAMES / FPS, abs=1024 / 16000)
    assert (_decode(parts).int() - frames_to_uint8(video).int()).abs().float().mean() < 3.0


def test_a_stream_that_fails_or_miscounts_leaves_no_file(tmp_path, clean_dirs) -> None:
    video = _video()
    with pytest.raises(RuntimeError, match="the DiT worker died"):
        with Mp4Writer(tmp_path / "failed.mp4", FRAMES) as writer:
            writer.write(video[:, :4])
            raise RuntimeError("the DiT worker died")  # the generation failing between clips
    with pytest.raises(ValueError, match="10 frames given for a video of 9"):
        with Mp4Writer(tmp_path / "long.mp4", FRAMES) as writer:
            writer.write(video[:, :4])
            writer.write(torch.cat([video, video[:, :1]], dim=1)[:, 4:])
    with pytest.raises(ValueError, match="4 frames given for a video of 9"):
        with Mp4Writer(tmp_path / "short.mp4", FRAMES) as writer:
            writer.write(video[:, :4])
    with pytest.raises(ValueError, match="frames of 32x48 in a 64x48 video"):
        with Mp4Writer(tmp_path / "resized.mp4", FRAMES) as writer:
            writer.write(video[:, :4])
            writer.write(video[:, 4:, :, :32])
    assert list(tmp_path.glob("*.mp4")) == []
