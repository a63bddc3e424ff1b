"""Shared fixtures: one tiny checkpoint set and one set-up predictor per session, a loopback HTTP server, and
predictor inputs with cog's own defaults. Markers (pyproject.toml): golden, http, gpu, slow."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from wan.testing.tiny import write_tiny_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """The tiny checkpoint set in the published layout (`python -m wan.testing.tiny`), written once per session."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="session")
def _session_runner(tiny_weights):
    from predict import Runner

    runner = Runner()
    runner.setup(weights=str(tiny_weights))
    return runner


@pytest.fixture
def runner(_session_runner):
    """One runner (predict.py) set up on the tiny set, shared by the in-process prediction tests; after each test its
    DiT holds MultiTalk's audio layers and no LoRA again, whatever the test did."""
    yield _session_runner
    _session_runner.service.pipeline.set_weights("multitalk", [])


def run_inputs(**inputs) -> dict:
    """`inputs` completed with the runner's own defaults, as cog fills them (file paths stay strings)."""
    from cog import _inspector

    return _inspector.check_input(_inspector.create_predictor("predict", "Runner").inputs, inputs)


class Loopback(http.server.ThreadingHTTPServer):
    """A local HTTP server: GET /files/<name> serves `files[name]` (bytes), POST /webhook/<key> records the JSON
    body under `events[key]`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LoopbackHandler)
        self.files: dict[str, bytes] = {}
        self.events: dict[str, list[dict]] = {}
        self.lock = threading.Lock()
        self.base = f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.base}/files/{name}"


class _LoopbackHandler(http.server.BaseHTTPRequestHandler):
    server: Loopback

    def do_GET(self):
        data = self.server.files.get(self.path.removeprefix("/files/"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.events.setdefault(self.path.removeprefix("/webhook/"), []).append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def loopback() -> Iterator[Loopback]:
    server = Loopback()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
