"""Source-video decoding for dubbing: synthetic videos whose frames show their own index (tests/support/synthetic_media.py),
so each test reads back which source frame landed on which output frame and compares with the hand-computed rule.

The rules (src/video/source.py): "reference" (InfiniteTalk's decord `vr[k]`): output frame k = source frame k.
"timestamps": output frame k = the source frame on screen at k / 25 s = frame floor(k * fps / 25) of a constant-rate
source, for every k with k / 25 < N / fps (the end of the last frame).
"""

from __future__ import annotations

import math
import shutil
from fractions import Fraction
from pathlib import Path

import librosa
import numpy as np
import pytest
import scipy.signal

from src.video import SourceVideo, VideoInputError, read_frames, read_video, video_audio
from support.synthetic_media import frame_number, numbered_frames, write_media

HEIGHT, WIDTH = 64, 96
CODECS = {  # name -> (file name, write_media arguments)
    "h264_mp4": ("v.mp4", {}),
    "vp9_webm": ("v.webm", {"video_codec": "libvpx-vp9"}),
    "mpeg4_avi": ("v.avi", {"video_codec": "mpeg4", "video_options": {"qscale": "2"}}),
    "mpeg4_mkv": ("v.mkv", {"video_codec": "mpeg4", "video_options": {"qscale": "2"}}),
    "av1_mp4": ("v.mp4", {"video_codec": "libsvtav1"}),  # decoded by libdav1d
}


def numbers(video: SourceVideo) -> list[int]:
    return [frame_number(frame) for frame in video.frames]


def timestamp_rule(source_frames: int, fps: int) -> list[int]:
    """Hand-computed: the source frame on screen at k / 25 s, for every output instant before the source ends."""
    count = math.ceil(Fraction(source_frames, fps) * 25)
    return [math.floor(Fraction(k * fps, 25)) for k in range(count)]


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_codec_decodes_frame_for_frame(tmp_path: Path, codec: str) -> None:
    file_name, arguments = CODECS[codec]
    source = numbered_frames(30, HEIGHT, WIDTH)
    video = read_video(write_media(tmp_path / file_name, frames=source, fps=25, **arguments))
    assert video.frames.dtype == np.uint8 and video.frames.shape == (30, HEIGHT, WIDTH, 3)
    assert numbers(video) == list(range(30))
    assert np.abs(video.frames.astype(int) - source).mean() < 2.0  # flat greys survive every codec
    assert video.source_fps == 25 and not video.has_audio


@pytest.mark.parametrize("fps", [30, 24])
def test_reference_timing_takes_source_frame_k_for_output_frame_k(tmp_path: Path, fps: int) -> None:
    path = write_media(tmp_path / "v.mp4", frames=numbered_frames(36, HEIGHT, WIDTH), fps=fps)
    video = read_video(path, timing="reference")
    assert numbers(video) == list(range(36))  # the source's rate is ignored, as decord's vr[k] ignores it
    assert video.source_fps == fps


@pytest.mark.parametrize("fps", [30, 24])
def test_timestamp_timing_resamples_to_25_fps(tmp_path: Path, fps: int) -> None:
    path = write_media(tmp_path / "v.mp4", frames=numbered_frames(36, HEIGHT, WIDTH), fps=fps)
    chosen = numbers(read_video(path, timing="timestamps"))
    assert chosen == timestamp_rule(36, fps)
    if fps == 30:  # 30 output frames for 1.2 s; every sixth source frame is dropped
        assert len(chosen) == 30 and chosen[:7] == [0, 1, 2, 3, 4, 6, 7] and 5 not in chosen
    else:  # 38 output frames for 1.5 s; frames 0 and 24 are shown twice
        assert len(chosen) == 38 and chosen[:3] == [0, 0, 1] and chosen.count(24) == 2


def test_both_timings_agree_on_a_25_fps_source(tmp_path: Path) -> None:
    path = write_media(tmp_path / "v.webm", frames=numbered_frames(20, HEIGHT, WIDTH), fps=25, video_codec="libvpx")
    assert numbers(read_video(path, timing="timestamps")) == numbers(read_video(path, timing="reference"))


@pytest.mark.parametrize("timing", ["reference", "timestamps"])
def test_max_frames_stops_decoding_early(tmp_path: Path, timing: str) -> None:
    source = write_media(tmp_path / "v.mkv", frames=numbered_frames(60, HEIGHT, WIDTH), fps=30)
    expected = list(range(10)) if timing == "reference" else timestamp_rule(60, 30)[:10]
    assert numbers(read_video(source, max_frames=10, timing=timing)) == expected
    # Only what is needed is decoded: the lost end of a cut file (its data stops at 0.33 s) is never reached.
    data = source.read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    assert numbers(read_video(tmp_path / "cut.mkv", max_frames=5, timing=timing)) == expected[:5]
    with pytest.raises(VideoInputError, match="^video: .*truncated or corrupt"):
        read_video(tmp_path / "cut.mkv", timing=timing)


@pytest.mark.parametrize("timing", ["reference", "timestamps"])
def test_read_frames_keeps_only_the_frames_asked_for(tmp_path: Path, timing: str) -> None:
    """The anchors of clips starting at 0, 72 and 144 in a 30 fps source of 100 frames: the frames `read_video`
    would give at those indices, the last frame past the end, and nothing else."""
    source = write_media(tmp_path / "v.mp4", frames=numbered_frames(100, HEIGHT, WIDTH), fps=30)
    every = numbers(read_video(source, timing=timing))
    frames = read_frames(source, [144, 0, 72], timing=timing)
    assert list(frames) == [0, 72, 144]
    assert {k: frame_number(v) for k, v in frames.items()} == {0: every[0], 72: every[72], 144: every[-1]}
    with pytest.raises(ValueError, match="indices must be frame numbers"):
        read_frames(source, [])


def test_odd_frame_size(tmp_path: Path) -> None:
    source = numbered_frames(8, 63, 95)
    video = read_video(write_media(tmp_path / "odd.webm", frames=source, fps=25, video_codec="libvpx-vp9"))
    assert video.frames.shape == (8, 63, 95, 3) and numbers(video) == list(range(8))


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_honoured(tmp_path: Path, rotation: int) -> None:
    source = numbered_frames(4, HEIGHT, WIDTH)
    source[:, :16, :16] = [255, 0, 0]  # a red corner, top-left as stored
    video = read_video(write_media(tmp_path / "r.mp4", frames=source, fps=25, rotation=rotation))
    # Counter-clockwise display rotation: the stored top-left corner is shown bottom-left (90), top-right (-90) or
    # bottom-right (180).
    height, width = (WIDTH, HEIGHT) if rotation % 180 else (HEIGHT, WIDTH)
    assert video.frames.shape == (4, height, width, 3)
    rows, cols = {90: (height - 8, 8), -90: (8, width - 8), 180: (height - 8, width - 8)}[rotation]
    red = video.frames[0, rows, cols]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    assert video.frames[0, height - 1 - rows, width - 1 - cols, 0] < 200  # the opposite corner is grey


def test_audio_stream_and_its_soundtrack(tmp_path: Path) -> None:
    rate = 44100
    t = np.arange(int(1.2 * rate)) / rate
    speech = (0.3 * np.sin(2 * np.pi * (200 * t + 600 * t**2))).astype(np.float32)
    frames = numbered_frames(30, HEIGHT, WIDTH)
    with_audio = write_media(tmp_path / "a.mp4", frames=frames, fps=25, audio=np.stack([speech, speech]))
    silent = write_media(tmp_path / "s.mp4", frames=frames, fps=25)
    assert read_video(with_audio).has_audio and not read_video(silent).has_audio

    track = video_audio(with_audio)
    truth = librosa.resample(speech, orig_sr=rate, target_sr=16000)  # the chirp, independent of the decoder
    assert track.dtype == np.float32 and track.ndim == 1 and abs(len(track) - len(truth)) < 0.05 * 16000
    lag = int(np.argmax(scipy.signal.correlate(track, truth, mode="full"))) - (len(truth) - 1)
    aligned, reference = (track[lag:], truth) if lag >= 0 else (track, truth[-lag:])
    n = min(len(aligned), len(reference))
    assert abs(lag) < 0.05 * 16000 and np.corrcoef(aligned[:n], reference[:n])[0, 1] > 0.95
    with pytest.raises(VideoInputError, match="^video: .*no sound to dub from"):
        video_audio(silent)


@pytest.mark.parametrize("file_name", ["clip", "clip.wav"])
def test_format_is_found_by_content(tmp_path: Path, file_name: str) -> None:
    source = write_media(tmp_path / "v.webm", frames=numbered_frames(12, HEIGHT, WIDTH), fps=25, video_codec="libvpx")
    shutil.copy(source, tmp_path / file_name)
    np.testing.assert_array_equal(read_video(tmp_path / file_name).frames, read_video(source).frames)


def _bad_input(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.mp4"
    if kind == "text":
        path.write_text("not a video\n" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "audio_only":
        write_media(path, audio=np.zeros((1, 8000), np.float32), sample_rate=16000)
    elif kind == "corrupt_h264":
        rng = np.random.default_rng(0)
        noisy = numbered_frames(40, HEIGHT, WIDTH) + rng.integers(0, 30, (40, HEIGHT, WIDTH, 3)).astype(np.uint8)
        data = bytearray(write_media(folder / "good.mp4", frames=noisy, fps=25).read_bytes())
        middle = data.find(b"mdat") + (len(data) - data.find(b"mdat")) // 2
        data[middle : middle + 500] = rng.bytes(500)
        path.write_bytes(bytes(data))
    return path


BAD_INPUTS = {
    "missing": "does not exist",
    "empty": "is empty",
    "text": "could not be read as audio or video",
    "audio_only": "has no video stream",
    "corrupt_h264": "truncated or corrupt",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error_naming_the_input(tmp_path: Path, kind: str) -> None:
    with pytest.raises(VideoInputError, match=BAD_INPUTS[kind]) as error:
        read_video(_bad_input(kind, tmp_path))
    assert isinstance(error.value, ValueError)
    assert str(error.value).startswith("video: ") and "upload" in str(error.value)


def test_decoded_size_cap(tmp_path: Path) -> None:
    path = write_media(tmp_path / "v.mp4", frames=numbered_frames(20, HEIGHT, WIDTH), fps=25)
    frame_bytes = HEIGHT * WIDTH * 3
    assert len(read_video(path, max_bytes=20 * frame_bytes).frames) == 20
    with pytest.raises(VideoInputError, match=f"^video: at most 7 frames .* of {WIDTH}x{HEIGHT} fit"):
        read_video(path, max_bytes=7 * frame_bytes + 1)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'nearest'"):
        read_video("x.mp4", timing="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_frames"):
        read_video("x.mp4", max_frames=0)
