"""Wall time per stage of a request, for the log, the time estimate's costs and the benchmark."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The generation's stages, as `Pipeline.stream` names them and `Pipeline.warm_up` reads them.
TEXT_ENCODER = "text_encoder"
VAE_ENCODE = "vae_encode"
IMAGE_ENCODER = "image_encoder"
DIT = "dit"
VAE_DECODE = "vae_decode"
COLOR_CORRECTION = "color_correction"
CLIP_STAGES = (VAE_ENCODE, IMAGE_ENCODER, VAE_DECODE, COLOR_CORRECTION)  # a clip's work besides the DiT


class StageClock:
    """Seconds spent per named stage; a stage may run many times (once per clip). On a GPU the device is synchronised
    at each stage boundary, so queued kernels count in the stage that launched them (a few syncs per clip)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - started

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.seconds.items())
