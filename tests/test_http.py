"""The real Cog HTTP server (coglet) around predict.py on tiny weights, driven the way a Replicate client drives it.

One server for the module: `python -m cog.server.http` with the committed `.cog/openapi_schema.json`, tiny random
weights from `python -m wan.testing.tiny` via COG_WEIGHTS, and a private TMPDIR so leftover files can be counted. Inputs
travel as data URIs (no file extension) and as loopback http URLs; a local server also collects webhooks.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import soundfile

from support.ffmpeg_tools import ffmpeg_tool
from support.mp4_boxes import mp4_tracks
from support.synthetic_media import write_media
from src.audio import DEFAULT_VOICES, load_speech, read_script
from src.audio.kokoro_layout import KOKORO_DIR_NAME, TAGGER_DIR_NAME
from src.video.mp4 import probe_video
from wan.runtime.workers import free_port

pytestmark = [pytest.mark.http, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
FPS = 25
SAMPLE_RATE = 16000
CLIP_SECONDS = 0.2  # 5 video frames: the VAE still works at 640x640, so short clips keep CPU runs to seconds
STEP_LINE = re.compile(r"^step \d+/\d+ clip", re.MULTILINE)
STEP_ELAPSED = re.compile(r"^step \d+/\d+ clip \d+/\d+ elapsed ([\d.]+)s", re.MULTILINE)
TINY = {"sampling_steps": 2, "seed": 7, "prompt": "a person talking"}


def _speech(seconds: float, pitch: float) -> bytes:
    """A voiced, vowel-like tone with a syllable envelope, as 16-bit wav bytes."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * k * pitch * t) / k for k in range(1, 12))
    wave = 0.3 * voice / np.abs(voice).max() * np.sin(np.pi * 4 * t) ** 2
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class CogServer:
    def __init__(self, process: subprocess.Popen, url: str, tmpdir: Path, log: Path, weights: Path):
        self.process, self.url, self.tmpdir, self.log, self.weights = process, url, tmpdir, log, weights

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def predict(self, inputs: dict, **body) -> requests.Response:
        # coglet 0.23.1 may answer a synchronous prediction a moment before it frees its one slot, and a request in
        # that moment gets 409 "At capacity" (seen once in 10 back-to-back predictions): wait for READY first.
        _wait_ready(self)
        return requests.post(f"{self.url}/predictions", json={"input": inputs, **body}, timeout=600)

    def worker(self) -> psutil.Process:
        children = psutil.Process(self.process.pid).children(recursive=True)
        workers = [c for c in children if "python" in c.name().lower()]
        assert len(workers) == 1, f"expected one python worker, found {children}"
        return workers[0]

    def files(self) -> set[str]:
        return {str(p.relative_to(self.tmpdir)) for p in self.tmpdir.rglob("*") if p.is_file()}

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory, loopback):
    work = tmp_path_factory.mktemp("cog-http")
    weights = work / "tiny-weights"
    for writer in ("wan.testing.tiny", "src.audio.tiny"):
        subprocess.run([sys.executable, "-m", writer, str(weights)], cwd=REPO, check=True, capture_output=True)
    tmpdir = work / "tmp"
    tmpdir.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "COG_PREDICT_TYPE_STUB": "predict.py:Runner",
        "COG_WEIGHTS": str(weights),
        "HF_ENDPOINT": loopback.base,  # `owner/repo/file` LoRAs come from the loopback server
        # coglet starts its worker with the `python` found on PATH: it must be this venv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TMPDIR": str(tmpdir),
        "LOG_FORMAT": "console",
        # glibc keeps freed memory in per-thread arenas and raises its mmap threshold as it goes, which makes RSS
        # swing by hundreds of MB with allocator caching; these settings make RSS follow live memory (leak check).
        "MALLOC_ARENA_MAX": "2",
        "MALLOC_MMAP_THRESHOLD_": str(2**20),
        "MALLOC_TRIM_THRESHOLD_": str(2**20),
    }
    log = work / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cog = CogServer(process, f"http://127.0.0.1:{port}", tmpdir, log, weights)
    try:
        deadline = time.monotonic() + 600
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = cog.health()["status"]
            except requests.ConnectionError:
                status = None
            if status in ("READY", "SETUP_FAILED", "DEFUNCT"):
                break
            time.sleep(0.5)
        assert status == "READY", f"server not ready ({status}); log:\n{cog.log_tail()}"
        yield cog
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    signal_group(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(15)
    signal_group(signal.SIGKILL)  # also the worker, should it outlive the server
    process.wait(15)


@pytest.fixture(scope="module")
def media(loopback):
    image = (REPO / "examples" / "two_people.png").read_bytes()
    speech1, speech2 = _speech(CLIP_SECONDS, 130), _speech(CLIP_SECONDS, 220)
    loopback.files.update({"portrait": image, "speech1.wav": speech1, "speech2": speech2})
    return {
        "image_uri": _data_uri(image, "image/png"),
        "audio_uri": _data_uri(speech1, "audio/wav"),
        "image_url": f"{loopback.base}/files/portrait",
        "audio_url": f"{loopback.base}/files/speech1.wav",
        "second_audio_url": f"{loopback.base}/files/speech2",
    }


def _check_video(body: dict, tmp_path: Path, seconds: float) -> dict:
    """The returned mp4, read twice: decoded by PyAV, and its boxes by a parser that shares no code with libav."""
    assert body["status"] == "succeeded", body.get("error")
    prefix = "data:video/mp4;base64,"
    assert body["output"].startswith(prefix), body["output"][:80]
    mp4 = tmp_path / "output.mp4"
    mp4.write_bytes(base64.b64decode(body["output"][len(prefix) :]))
    frames = round(seconds * FPS)
    facts, tracks = probe_video(mp4), mp4_tracks(mp4)
    assert facts["video_codec"] == "h264" and facts["audio_codec"] == "aac"
    assert facts["fps"] == FPS and facts["frames"] == frames
    assert tracks["vide"]["codec"] == "avc1" and tracks["vide"]["samples"] == frames
    assert tracks["soun"]["codec"] == "mp4a" and tracks["vide"]["deltas"] == {1 / FPS}
    assert abs(tracks["vide"]["edit_seconds"] - seconds) < 0.01
    assert abs(tracks["soun"]["edit_seconds"] - seconds) < 0.01  # the soundtrack cut to the video
    assert body["metrics"]["video_output_count"] == 1
    assert body["metrics"]["video_output_duration_seconds"] == pytest.approx(frames / FPS)
    return facts


def _wait_ready(server: CogServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (status := server.health()["status"]) != "READY":
        assert time.monotonic() < deadline, f"server {status}, not READY; log:\n{server.log_tail()}"
        time.sleep(0.2)


def test_server_serves_the_committed_schema(server):
    assert server.health()["status"] == "READY"
    served = requests.get(f"{server.url}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == json.loads((REPO / ".cog" / "openapi_schema.json").read_text())


def test_data_uri_inputs_without_extensions_give_a_playable_mp4(server, media, tmp_path):
    response = server.predict({"image": media["image_uri"], "audio": media["audio_uri"], **TINY})
    assert response.status_code == 200, response.text
    _check_video(response.json(), tmp_path, CLIP_SECONDS)


def test_http_url_inputs_with_two_speakers(server, media, tmp_path):
    inputs = {
        "image": media["image_url"],
        "audio": media["audio_url"],
        "second_audio": media["second_audio_url"],
        "audio_type": "para",
        **TINY,
    }
    response = server.predict(inputs)
    assert response.status_code == 200, response.text
    _check_video(response.json(), tmp_path, CLIP_SECONDS)


MISSING = object()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sampling_steps": "lots"}, "sampling_steps"),  # wrong type
        ({"sampling_steps": 500}, "sampling_steps"),  # out of range
        ({"num_frames": 2}, "num_frames"),  # below the minimum
        ({"resolution": "1080p"}, "resolution"),  # not a choice
        ({"model": "sonic"}, "model"),  # not a choice
        # cog's schema marks Optional inputs `nullable`, but coglet checks an explicit null against the type:
        # clients must omit an input to get its default.
        ({"num_frames": None}, "num_frames"),
    ],
)
def test_invalid_inputs_get_422(server, media, change, field):
    inputs = {"image": media["image_uri"], "audio": media["audio_uri"], **TINY, **change}
    inputs = {k: v for k, v in inputs.items() if v is not MISSING}
    response = server.predict(inputs)
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["detail"]] == [["body", "input", field]]


@pytest.mark.parametrize("name", ["image", "audio", "video"])
def test_corrupt_file_fails_naming_the_input_and_server_stays_ready(server, media, name):
    inputs = {"image": media["image_uri"], "audio": media["audio_uri"], **TINY}
    inputs[name] = _data_uri(b"\x00garbage, not a real file\xff" * 40, "application/octet-stream")
    response = server.predict(inputs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed"
    assert re.search(rf"\b{name}\b", body["error"]), body["error"]
    # One message naming the input (coglet 0.23.1 itself puts "Prediction failed: " in front of it twice), and no
    # path of the server's: the client never chose one.
    assert body["error"].count(f"{name}:") == 1 and body["error"].count("Error:") == 1, body["error"]
    assert str(server.tmpdir) not in body["error"] and "/tmp" not in body["error"], body["error"]
    _wait_ready(server)


@pytest.mark.parametrize(
    "name, value",
    [
        ("image", "examples/two_people.png"),  # a file of the repository, relative to the server's working directory
        ("audio", str(REPO / "examples" / "person1.wav")),
        ("image", "file:///etc/hostname"),
        ("first_audio", "/etc/hostname"),
    ],
)
def test_a_path_on_the_server_is_refused(server, media, name, value):
    """A string that is no upload, data URI or http(s) URL reaches the runner as the client typed it: it names a file
    on the server, and the runner reads none of those."""
    inputs = {"image": media["image_uri"], "audio": media["audio_uri"], **TINY}
    inputs.pop("audio" if name == "first_audio" else name)
    response = server.predict({**inputs, name: value})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "failed", response.text
    assert f"{name}: {value!r} is not a file this model was sent" in body["error"], body["error"]
    assert "send the file itself" in body["error"] and body.get("output") is None
    _wait_ready(server)


def test_lora_url_takes_a_hugging_face_file_and_refuses_what_is_no_safetensors(server, media, loopback, tmp_path):
    lora = next((server.tmpdir.parent / "tiny-weights" / "loras").iterdir()).read_bytes()  # fits the tiny DiT
    loopback.files["me/loras/resolve/main/style.safetensors"] = lora
    inputs = {"image": media["image_uri"], "audio": media["audio_uri"], **TINY}
    response = server.predict({**inputs, "lora_url": "me/loras/style.safetensors", "lora_scale": 0.5})
    _check_video(response.json(), tmp_path, CLIP_SECONDS)
    page = loopback.url("page.safetensors", b"<html>Not the file</html>" * 10)
    body = server.predict({**inputs, "lora_url": page}).json()
    assert body["status"] == "failed", body
    assert "lora_url: cannot use" in body["error"] and "not a safetensors file" in body["error"], body["error"]
    assert body["error"].count("lora_url:") == 1 and str(server.tmpdir) not in body["error"]
    _wait_ready(server)


def test_a_cog_multitalk_request_body_runs_unchanged(server, media, tmp_path):
    """The body a client of zsxkib/cog-MultiTalk sends (predict.py@2a22352: its input names and defaults): its
    `first_audio` is our `audio`, its other inputs are ours by the same names."""
    body = {
        "image": media["image_uri"],
        "first_audio": media["audio_uri"],
        "prompt": "A smiling man and woman wearing headphones sit in front of microphones, appearing to host a podcast.",
        "num_frames": 81,
        "sampling_steps": 40,
        "turbo": True,
        "seed": 42,
    }
    response = server.predict(body)
    assert response.status_code == 200, response.text
    _check_video(response.json(), tmp_path, CLIP_SECONDS)  # as long as the speech (81 frames at most)
    both = server.predict({**body, "audio": media["audio_uri"]}).json()
    assert both["status"] == "failed" and "audio, first_audio: give the speech of person 1 once" in both["error"]
    _wait_ready(server)


@pytest.mark.parametrize("missing, named", [(("audio",), "audio"), (("image", "audio"), "image")])
def test_missing_inputs_fail_naming_them(server, media, missing, named):
    inputs = {"image": media["image_uri"], "audio": media["audio_uri"], **TINY}
    response = server.predict({k: v for k, v in inputs.items() if k not in missing})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "failed", response.text
    assert re.search(rf"\b{named}\b", body["error"]), body["error"]
    _wait_ready(server)


def test_video_with_sound_is_dubbed_to_its_own_length(server, media, tmp_path):
    """A video with sound, as a data URI without extension: InfiniteTalk dubs it, as long as its audio."""
    seconds = 0.44  # 11 frames
    t = np.arange(int(seconds * 44100)) / 44100
    sound = (0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(np.pi * 5 * t) ** 2)[None]
    frames = np.zeros((20, 48, 64, 3), np.uint8)  # a longer video: the sound decides the length
    frames[..., 0] = np.arange(20)[:, None, None] * 12
    clip = write_media(tmp_path / "source.mp4", frames=frames, audio=sound)
    response = server.predict(
        {"video": _data_uri(clip.read_bytes(), "application/octet-stream"), "model": "infinitetalk", **TINY}
    )
    _check_video(response.json(), tmp_path, 11 / FPS)


@pytest.fixture(scope="module")
def speech(server):
    """The server's Kokoro, loaded here from the same files."""
    return load_speech(server.weights / KOKORO_DIR_NAME, server.weights / TAGGER_DIR_NAME)


@pytest.mark.parametrize(
    "text, voices",
    [
        ("Welcome to multi-talk.", {"voice": "bf_emma"}),
        ("(s1) Do you know it? (s2) Yes, I do!", {"voice": "af_heart", "second_voice": "am_adam"}),
    ],
    ids=["one speaker", "dialogue"],
)
def test_text_is_spoken_and_is_the_soundtrack(server, speech, tmp_path, text, voices):
    """The mp4 of a `text` request is as long as the speech the tiny Kokoro makes of it (synthesised again here, with
    the request's seed) and its soundtrack, decoded by the ffmpeg program, is that speech."""
    script = read_script(text, voices["voice"], voices.get("second_voice", DEFAULT_VOICES[1]))
    tracks, mix = speech.say(script, seed=TINY["seed"])
    assert len(tracks) == (2 if "(s1)" in text else 1)
    image = _data_uri((REPO / "examples" / "two_people.png").read_bytes(), "image/png")
    response = server.predict({"image": image, "text": text, **voices, **TINY})
    assert response.status_code == 200, response.text
    frames = int(len(mix) / SAMPLE_RATE * FPS)  # the reference's count: whole frames of the speech
    _check_video(response.json(), tmp_path, frames / FPS)
    decode = [ffmpeg_tool("ffmpeg"), "-v", "error", "-i", str(tmp_path / "output.mp4"), "-f", "f32le", "-ac", "1"]
    decoded = subprocess.run([*decode, "-ar", str(SAMPLE_RATE), "-"], capture_output=True, check=True).stdout
    soundtrack = np.frombuffer(decoded, np.float32)
    spoken = mix[: frames * SAMPLE_RATE // FPS]
    assert abs(len(soundtrack) - len(spoken)) <= 1024  # the decoder's output ends on a whole AAC frame
    # Loudness over time (20 ms windows): what AAC keeps of any signal, and where the turns and pauses are.
    window = SAMPLE_RATE // 50
    n = min(len(soundtrack), len(spoken)) // window * window
    envelopes = [np.sqrt((a[:n].reshape(-1, window) ** 2).mean(1)) for a in (soundtrack, spoken)]
    assert np.corrcoef(*envelopes)[0, 1] > 0.9


def test_text_beside_audio_fails_naming_both_and_the_server_stays_ready(server, media):
    body = server.predict({"image": media["image_uri"], "audio": media["audio_uri"], "text": "Hello", **TINY}).json()
    assert body["status"] == "failed" and "text, audio: give the speech as text or as recordings" in body["error"]
    _wait_ready(server)


def _post_async(server: CogServer, loopback, key: str, inputs: dict) -> None:
    response = requests.post(
        f"{server.url}/predictions",
        json={"id": key, "input": inputs, "webhook": f"{loopback.base}/webhook/{key}"},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 202, response.text


def _wait_event(loopback, key: str, ready, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with loopback.lock:
            events = list(loopback.events.get(key, []))
        if events and ready(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"webhook {key}: condition not met in {timeout}s; events: {[e['status'] for e in events]}")


def _terminal(events: list[dict]) -> bool:
    return any(e["status"] in ("succeeded", "failed", "canceled") for e in events)


def test_async_prediction_sends_webhook_events(server, media, loopback, tmp_path):
    _post_async(server, loopback, "async1", {"image": media["image_uri"], "audio": media["audio_uri"], **TINY})
    events = _wait_event(loopback, "async1", _terminal)
    time.sleep(1.0)  # deliveries are not ordered: let any late "logs"/"output" event land
    with loopback.lock:
        statuses = [e["status"] for e in loopback.events["async1"]]
    assert statuses[0] == "processing", statuses  # coglet's "start" event
    assert statuses.count("succeeded") == 1 and set(statuses) == {"processing", "succeeded"}, statuses
    final = next(e for e in events if e["status"] == "succeeded")
    assert STEP_LINE.search(final["logs"]), final["logs"][-2000:]
    _check_video(final, tmp_path, CLIP_SECONDS)
    _wait_ready(server)


def test_cancel_during_sampling_stops_within_one_step(server, media, loopback):
    inputs = {"image": media["image_uri"], "audio": media["audio_uri"], **TINY, "sampling_steps": 100, "turbo": False}
    _post_async(server, loopback, "cancel1", inputs)
    events = _wait_event(loopback, "cancel1", lambda ev: len(STEP_LINE.findall(ev[-1].get("logs") or "")) >= 2)
    assert not _terminal(events)
    sent = time.monotonic()
    response = requests.post(f"{server.url}/predictions/cancel1/cancel", timeout=30)
    assert response.status_code == 200, response.text
    events = _wait_event(loopback, "cancel1", _terminal, timeout=120)
    latency = time.monotonic() - sent
    final = next(e for e in events if _terminal([e]))
    assert final["status"] == "canceled", final
    elapsed = [float(e) for e in STEP_ELAPSED.findall(final["logs"])]
    step_seconds = max(b - a for a, b in zip(elapsed, elapsed[1:]))
    # Cancellation lands between two steps: the canceled event comes about one step after the request at most
    # (plus webhook delivery), not after the 100 steps asked for.
    assert len(elapsed) < 50, final["logs"][-3000:]
    assert latency < step_seconds + 2.0, (latency, step_seconds)
    _wait_ready(server)


def test_ten_predictions_leave_one_output_and_do_not_grow_memory(server, media, tmp_path):
    inputs = {"image": media["image_uri"], "audio": media["audio_uri"], **TINY}
    before, rss, fds = None, {}, {}
    for n in range(1, 11):
        response = server.predict({**inputs, "seed": n})
        assert response.status_code == 200 and response.json()["status"] == "succeeded", (
            f"prediction {n}: {response.status_code} {response.text[:2000]}\nserver log:\n{server.log_tail()}"
        )
        if n == 1:
            before = server.files()
        worker = server.worker()
        rss[n], fds[n] = worker.memory_info().rss, worker.num_fds()
    after = server.files()
    mp4s = sorted(f for f in after if f.endswith(".mp4"))
    assert len(mp4s) == 1 and "multitalk-10-" in mp4s[0], mp4s
    assert after - before == set(mp4s) and len(before - after) == 1, (sorted(before), sorted(after))
    assert fds[10] <= fds[3], f"worker file descriptors grew: {fds}"
    # Retaining one tiny output video per prediction (5 x 640 x 640 x 3 float32 = 25 MB) would add 170 MB here.
    growth = rss[10] - rss[3]
    assert growth < 100 * 2**20, f"worker RSS grew {growth / 2**20:.0f} MiB: {[round(v / 2**20) for v in rss.values()]}"


def test_the_readme_curl_snippet_writes_the_video_only_when_the_prediction_succeeds(server, tmp_path):
    (block,) = re.findall(r"```bash\n(curl .*?)```", (REPO / "README.md").read_text(), re.S)
    block = block.replace("http://127.0.0.1:5000", server.url)
    examples = tmp_path / "examples"
    examples.mkdir()
    shutil.copy(REPO / "examples" / "person1.wav", examples)
    shutil.copy(REPO / "examples" / "two_people.png", examples)
    _wait_ready(server)
    ok = subprocess.run(["bash", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0 and ok.stdout.startswith("succeeded"), ok.stdout + ok.stderr
    video = (tmp_path / "talking.mp4").read_bytes()
    assert mp4_tracks(tmp_path / "talking.mp4")["vide"]["codec"] == "avc1"
    (examples / "two_people.png").write_bytes(b"not a picture" * 50)
    _wait_ready(server)
    failed = subprocess.run(["bash", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1 and failed.stdout.startswith("failed") and "image:" in failed.stdout, failed.stdout
    assert (tmp_path / "talking.mp4").read_bytes() == video  # the earlier video is not overwritten
    _wait_ready(server)
