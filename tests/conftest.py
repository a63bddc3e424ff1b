"""Shared fixtures: one tiny checkpoint set and one set-up runner per session (reset after each test), a loopback
HTTP server. Markers (pyproject.toml): golden, http, gpu, slow. Helpers live in tests/support/."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from support.loopback import Loopback
from wan.testing.tiny import write_tiny_checkpoints


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """The model library's tiny checkpoint set in the published layout (`python -m wan.testing.tiny`), written once
    per session."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny-checkpoints"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """The service's tiny set, written once per session: the checkpoints and, beside them, Kokoro-82M and its tagger
    for text to speech (`python -m src.audio.tiny`)."""
    from src.audio.tiny import write_tiny_speech  # here: the media libraries are not on every GPU machine

    root = write_tiny_checkpoints(tmp_path_factory.mktemp("tiny-weights"))
    write_tiny_speech(root)
    return root


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


@pytest.fixture(scope="session")
def loopback() -> Iterator[Loopback]:
    server = Loopback()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
