"""PyAV (in-process libav) against the ffmpeg/ffprobe binaries, on CPU: decoded samples and mp4 writing.

    python -m bench.pyav_media [--frames 250 --height 448 --width 896 --seconds 10 --repeat 3]

1. Decoding: every format the audio tests cover (written by the ffmpeg binary, as the tests used to) is decoded by
   `ffmpeg -f f32le` (the old path) and by `src.audio.decode.decode_native` (PyAV): shapes, bit equality, largest
   difference; then the 16 kHz mono result of each. Decode times on a 10 s file.
2. Writing: the old single ffmpeg command (rgb24 pipe -> libx264 crf 18 + AAC) against `src.video.mp4.write_mp4` on a
   2-speaker-sized job; ffprobe reads both outputs (frame count, fps, duration, codecs, colour tags), the decoded
   pixels are compared with the input, and the RGB -> YUV planes of both paths are compared directly.
Prints PASS/FAIL lines and one JSON line. Needs the ffmpeg and ffprobe binaries (they are the comparison).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import av
import librosa
import numpy as np
import soundfile as sf
import torch

from src.audio.decode import decode_native, load_audio
from src.video.mp4 import YUV, frames_to_uint8, write_mp4

VIDEO_SOURCE = ["-f", "lavfi", "-i", "color=c=blue:s=32x32:r=10:d={seconds}"]
FORMATS = {  # the formats of tests/test_audio.py: file name -> (ffmpeg arguments before / after the source wav)
    "a.flac": ([], []),
    "a.ogg": ([], ["-c:a", "libopus"]),
    "a.mp3": ([], ["-c:a", "libmp3lame"]),
    "a.m4a": ([], ["-c:a", "aac"]),
    "a.aac": ([], ["-c:a", "aac", "-f", "adts"]),
    "a.mp4": (VIDEO_SOURCE, ["-c:v", "libx264", "-c:a", "aac"]),
    "a.mov": (VIDEO_SOURCE, ["-c:v", "libx264", "-c:a", "aac"]),
    "a.mkv": (VIDEO_SOURCE, ["-c:v", "libx264", "-c:a", "libopus"]),
    "a.webm": (VIDEO_SOURCE, ["-c:v", "libvpx", "-c:a", "libopus"]),
}


def ffmpeg(*args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], input=stdin, capture_output=True,
                          check=True).stdout  # fmt: skip


def cli_decode(path: Path) -> tuple[np.ndarray, int]:
    """The old path: ffprobe for rate and channels, then ffmpeg decodes to float32 at those through a pipe."""
    command = ["ffprobe", "-v", "error", "-select_streams", "a:0", "-of", "json", "-show_entries"]
    probe = subprocess.run([*command, "stream=sample_rate,channels", str(path)], capture_output=True, check=True)
    stream = json.loads(probe.stdout)["streams"][0]
    rate, channels = int(stream["sample_rate"]), int(stream["channels"])
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", str(channels),
                          "-ar", str(rate), "-f", "f32le", "-acodec", "pcm_f32le", "-"], capture_output=True,
                         check=True).stdout  # fmt: skip
    return np.frombuffer(raw, "<f4").reshape(-1, channels).T, rate


def chirp(rate: int, seconds: float, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * (150 * t + 2850 / (2 * seconds) * t**2))
    mono += 0.02 * np.random.default_rng(0).standard_normal(t.size)
    return np.stack([mono, 0.5 * mono], axis=1)[:, :channels].astype(np.float32)


def write_fixtures(folder: Path, seconds: float) -> list[Path]:
    sf.write(folder / "source.wav", chirp(44100, seconds), 44100, subtype="PCM_16")
    files = [folder / "source.wav"]
    for name, (before, after) in FORMATS.items():
        before = [arg.format(seconds=seconds) for arg in before]
        ffmpeg(*before, "-i", str(folder / "source.wav"), *after, "-shortest", str(folder / name))
        files.append(folder / name)
    for rate in (8000, 16000, 22050, 44100, 48000, 96000):
        for channels in (1, 2):
            files.append(folder / f"r{rate}_{channels}ch.wav")
            sf.write(files[-1], chirp(rate, min(seconds, 0.5), channels), rate, subtype="PCM_16")
    for subtype in ("PCM_U8", "PCM_24", "FLOAT"):
        files.append(folder / f"{subtype}.wav")
        sf.write(files[-1], chirp(16000, 0.5, 1), 16000, subtype=subtype)
    files.append(folder / "streamed_no_extension")  # RIFF size unknown, as a pipe writes it; no extension
    files[-1].write_bytes(ffmpeg("-i", str(folder / "source.wav"), "-f", "wav", "-"))
    return files


def compare_decoding(files: list[Path]) -> dict:
    rows = {}
    for path in files:
        old, old_rate = cli_decode(path)
        new, new_rate = decode_native(path, max_seconds=None)
        same_shape = old.shape == new.shape and old_rate == new_rate
        row = {"shape": list(new.shape), "rate": new_rate, "same_shape": same_shape}
        if same_shape:
            diff = np.abs(old.astype(np.float64) - new)
            row |= {"bit_equal": bool((diff == 0).all()), "max_abs_diff": float(diff.max()),
                    "differing_fraction": float((diff > 0).mean())}  # fmt: skip
            old16 = librosa.resample(librosa.to_mono(old), orig_sr=old_rate, target_sr=16000)
            row["max_abs_diff_16k_mono"] = float(np.abs(old16 - load_audio(path, max_seconds=None)).max())
        rows[path.name] = row
    return rows


def time_call(function, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def test_video(frames: int, height: int, width: int) -> torch.Tensor:
    """Moving gradients, a moving square and mild noise in [-1, 1]: some motion and texture for the encoder."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    noise = torch.randn(3, height, width, generator=torch.Generator().manual_seed(0)) * 0.03
    video = torch.empty(3, frames, height, width)
    for t in range(frames):
        phase = 2 * np.pi * t / 50
        video[:, t] = torch.stack([torch.sin(3 * xx + phase), torch.cos(2 * yy - phase), xx * yy]) * 0.7 + noise
        top, left = int((height - 64) * (0.5 + 0.4 * np.sin(phase))), int((width - 64) * t / max(frames - 1, 1))
        video[:, t, top : top + 64, left : left + 64] = torch.tensor([0.9, -0.6, 0.2])[:, None, None]
    return video.clamp(-1, 1)


def cli_write_mp4(video: torch.Tensor, path: Path, audio_path: Path, fps: int = 25) -> None:
    """The old write_mp4: one ffmpeg command, rgb24 frames on stdin, libx264 crf 18 medium + AAC 192k, apad, -t."""
    frames, height, width = video.shape[1:]
    cmd = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:0",
           "-i", str(audio_path), "-map", "0:v:0", "-map", "1:a:0",
           "-vf", "scale=out_color_matrix=bt709:out_range=tv", "-colorspace", "bt709", "-color_primaries", "bt709",
           "-color_trc", "bt709", "-color_range", "tv", "-c:v", "libx264", "-preset", "medium", "-crf", "18",
           "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "192k", "-af", "apad", "-t", f"{frames / fps:.6f}",
           "-movflags", "+faststart", str(path)]  # fmt: skip
    ffmpeg(*cmd, stdin=frames_to_uint8(video).contiguous().numpy().tobytes())


def ffprobe_facts(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json",
                          str(path)], capture_output=True, check=True).stdout  # fmt: skip
    info = json.loads(out)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio = next((s for s in info["streams"] if s["codec_type"] == "audio"), {})
    return {
        "frames": int(video["nb_read_frames"]), "r_frame_rate": video["r_frame_rate"],
        "video": f"{video['codec_name']} {video.get('profile')} {video['pix_fmt']} {video['width']}x{video['height']}",
        "colour": [video.get(k) for k in ("color_range", "color_space", "color_primaries", "color_transfer")],
        "video_duration": float(video["duration"]), "audio": f"{audio.get('codec_name')} {audio.get('sample_rate')}",
        "audio_duration": float(audio.get("duration", "nan")), "format_duration": float(info["format"]["duration"]),
        "bytes": path.stat().st_size,
    }  # fmt: skip


def decoded_frames(path: Path, video: torch.Tensor) -> torch.Tensor:
    """RGB frames of `path` as the ffmpeg binary decodes them."""
    raw = ffmpeg("-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-")
    return torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(-1, *video.shape[2:], 3).copy())


def decoded_error(path: Path, video: torch.Tensor) -> dict:
    error = (decoded_frames(path, video).int() - frames_to_uint8(video).int()).abs().float()
    return {"mean_abs_error": float(error.mean()), "max_abs_error": float(error.max())}


def write_is_right(new: dict, old: dict, frames: int) -> bool:
    """H.264 yuv420p + AAC, every frame, 25 fps, both streams as long as the frames, BT.709 tags, and the pixels
    at least as close to the input as the old path's."""
    return (
        new["frames"] == frames
        and new["r_frame_rate"] == "25/1"
        and new["video"].startswith("h264") and "yuv420p" in new["video"] and new["audio"].startswith("aac")
        and abs(new["video_duration"] - frames / 25) < 1 / 25
        and abs(new["audio_duration"] - frames / 25) < 1 / 25
        and new["colour"] == ["tv", "bt709", "bt709", "bt709"]
        and new["mean_abs_error"] <= old["mean_abs_error"] * 1.1
    )  # fmt: skip


def yuv_planes_equal(video: torch.Tensor, frames: int = 5) -> dict:
    """RGB -> YUV 4:2:0 of the ffmpeg scale filter against PyAV's reformat with write_mp4's settings."""
    height, width = video.shape[2:]
    rgb = frames_to_uint8(video[:, :frames]).contiguous().numpy()
    scaled = ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-i", "-", "-vf",
                    "scale=out_color_matrix=bt709:out_range=tv", "-pix_fmt", "yuv420p", "-f", "rawvideo", "-",
                    stdin=rgb.tobytes())  # fmt: skip
    ours = b"".join(av.VideoFrame.from_ndarray(f, "rgb24").reformat(**YUV).to_ndarray().tobytes() for f in rgb)
    diff = np.abs(np.frombuffer(scaled, np.uint8).astype(int) - np.frombuffer(ours, np.uint8))
    return {"bit_equal": bool((diff == 0).all()), "max_abs_diff": int(diff.max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--height", type=int, default=448)
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3, help="timed writes per path")
    args = parser.parse_args()
    results, ok = {"versions": {"pyav": av.__version__, "libavcodec": av.library_versions["libavcodec"]}}, True
    results["versions"]["ffmpeg"] = subprocess.run(
        ["ffmpeg", "-version"], capture_output=True, text=True
    ).stdout.split()[2]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = write_fixtures(folder, 1.2)
        results["decode"] = compare_decoding(files)
        for name, row in results["decode"].items():
            good = row["same_shape"] and row["max_abs_diff"] <= 2.5e-7 and row["max_abs_diff_16k_mono"] <= 2.5e-7
            ok &= good
            print(f"{'PASS' if good else 'FAIL'} decode {name}: {json.dumps(row)}")
        (folder / "long").mkdir()
        long = write_fixtures(folder / "long", args.seconds)[: 1 + len(FORMATS)]  # source.wav and the formats
        results["decode_seconds"] = {
            p.name: {"ffmpeg": time_call(lambda: cli_decode(p)), "pyav": time_call(lambda: decode_native(p))}
            for p in long
        }  # fmt: skip
        print("decode times (s), ffmpeg vs pyav:", json.dumps(results["decode_seconds"]))

        video = test_video(args.frames, args.height, args.width)
        soundtrack = folder / "soundtrack.wav"
        sf.write(soundtrack, chirp(16000, args.seconds, 1)[:, 0], 16000)  # what predict.py writes: 16 kHz mono
        outputs = {"ffmpeg": folder / "cli.mp4", "pyav": folder / "pyav.mp4"}
        writers = {"ffmpeg": lambda: cli_write_mp4(video, outputs["ffmpeg"], soundtrack),
                   "pyav": lambda: write_mp4(video, outputs["pyav"], soundtrack)}  # fmt: skip
        timings = {k: [] for k in writers}
        for _ in range(args.repeat):  # alternated, so that load from other processes hits both alike
            for k, write in writers.items():
                timings[k].append(time_call(write, repeat=1))
        results["write"] = {k: {"seconds": timings[k], **ffprobe_facts(p), **decoded_error(p, video)}
                            for k, p in outputs.items()}  # fmt: skip
        results["write_yuv_planes"] = yuv_planes_equal(video)
        results["write_decoded_frames_equal"] = bool(
            torch.equal(decoded_frames(outputs["ffmpeg"], video), decoded_frames(outputs["pyav"], video))
        )
        good = write_is_right(results["write"]["pyav"], results["write"]["ffmpeg"], args.frames)
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} write: {json.dumps(results['write'])}")
        planes = results["write_yuv_planes"]
        print(f"{'PASS' if planes['bit_equal'] else 'FAIL'} yuv planes: {planes}")
        print(f"INFO decoded frames of both files equal: {results['write_decoded_frames_equal']}")
    print(f"{'PASS' if ok else 'FAIL'} overall")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
