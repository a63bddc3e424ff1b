"""What the container's environment sets, read once when the runner starts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .time_limit import MAX_REQUEST_SECONDS
from .weights import HF_ENDPOINT

WEIGHTS_ENV = "COG_WEIGHTS"  # a folder or a tar URL of the weights (cog's own name)
GPUS_ENV = "MULTITALK_GPUS"
MEMORY_PLAN_ENV = "MULTITALK_MEMORY_PLAN"
COMPILE_CACHE_ENV = "MULTITALK_COMPILE_CACHE"
MAX_REQUEST_SECONDS_ENV = "MULTITALK_MAX_REQUEST_SECONDS"
HF_ENDPOINT_ENV = "HF_ENDPOINT"  # the Hugging Face Hub's own variable: where `owner/repo/file` LoRAs come from
DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "multitalk" / "compile"


@dataclass(frozen=True)
class Settings:
    weights: str | None = None  # COG_WEIGHTS
    gpus: str | None = None  # MULTITALK_GPUS: how many of the visible GPUs (default all)
    memory_plan: str | None = None  # MULTITALK_MEMORY_PLAN: resident, fp8 or streamed (default: by free memory)
    compile_cache: Path | None = DEFAULT_COMPILE_CACHE  # MULTITALK_COMPILE_CACHE; empty turns it off
    max_request_seconds: float = MAX_REQUEST_SECONDS  # MULTITALK_MAX_REQUEST_SECONDS
    hf_endpoint: str = HF_ENDPOINT  # HF_ENDPOINT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        def text(name: str) -> str | None:
            return environ.get(name, "").strip() or None

        cache = environ.get(COMPILE_CACHE_ENV, str(DEFAULT_COMPILE_CACHE)).strip()
        seconds = text(MAX_REQUEST_SECONDS_ENV)
        try:
            limit = float(seconds) if seconds else MAX_REQUEST_SECONDS
        except ValueError:
            raise ValueError(f"{MAX_REQUEST_SECONDS_ENV}={seconds!r}: give a number of seconds") from None
        return cls(
            text(WEIGHTS_ENV),
            text(GPUS_ENV),
            text(MEMORY_PLAN_ENV),
            Path(cache) if cache else None,
            limit,
            text(HF_ENDPOINT_ENV) or HF_ENDPOINT,
        )

    def gpus_to_use(self, visible: int) -> int:
        """Every visible GPU, or the first `MULTITALK_GPUS` of them (e.g. 1: the single-process path on a bigger
        host)."""
        if self.gpus is None:
            return max(1, visible)
        if not self.gpus.isdigit() or not 1 <= int(self.gpus) <= max(1, visible):
            raise ValueError(
                f"{GPUS_ENV}={self.gpus!r}: give a whole number from 1 to {max(1, visible)} (the visible GPUs)"
            )
        return int(self.gpus)
