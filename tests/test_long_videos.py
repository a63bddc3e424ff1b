"""A video as long as its audio, past the reference's 40 s cap: the clips stream to the mp4 and nothing grows
with the length but the audio's embeddings (computed before the first clip)."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import psutil
import pytest
import soundfile
import torch

from src.video import Mp4Writer
from support.cog_inputs import run_inputs
from support.mp4_boxes import mp4_tracks

pytestmark = pytest.mark.slow  # 44 s of video on the tiny set

SECONDS = 44.0  # 1100 frames, past the reference's 1000: 20 clips of 81 frames


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # looking at every object touches deprecated module attributes
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and not obj.is_meta:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except (ReferenceError, RuntimeError):  # a dead weak proxy; a compile's fake tensor without storage
                continue
    return sum(storages.values())


def test_a_long_video_streams_in_flat_memory(runner, tmp_path, monkeypatch):
    t = np.arange(int(SECONDS * 16000)) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 200 * t) * np.sin(np.pi * 3 * t) ** 2).astype(np.float32)
    soundfile.write(tmp_path / "speech.wav", speech, 16000)
    samples = []  # (live tensor bytes at clips 3, 10 and 19, resident set size) as each clip reaches the mp4
    write = Mp4Writer.write

    def measured(self, video):
        write(self, video)
        clip = len(samples) + 1
        samples.append((live_tensor_bytes() if clip in (3, 10, 19) else None, psutil.Process().memory_info().rss))

    monkeypatch.setattr(Mp4Writer, "write", measured)
    inputs = run_inputs(image="examples/two_people.png", audio=str(tmp_path / "speech.wav"), fast=True, seed=3)
    output = runner.run(**inputs)

    assert mp4_tracks(output)["vide"]["samples"] == round(SECONDS * 25)  # no 1000-frame cap
    assert len(samples) == 20
    # From the third clip to the one before the last (which decodes only the frames it keeps) every buffer has its size.
    tensors, rss = zip(*samples[2:])
    tensors = [b for b in tensors if b is not None]
    assert max(tensors) - min(tensors) < 2**20, [round(b / 2**20, 1) for b in tensors]  # nothing held per clip
    assert max(rss) - rss[0] < 64 * 2**20, [round(b / 2**20) for b in rss]
