"""The DiT in this process: the module, its switchable weights (audio layers, LoRAs) and a clip's TeaCache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..configs import DiTConfig
from ..generation import sampling
from ..generation.backend import ClipInputs, TeaCacheSettings, branch_velocity
from ..loading.dit_weights import DiTWeights
from ..loading.lora import LoraSet
from ..model.dit import MultiTalkDiT
from .compile_cache import save_compile_cache, traced_cache_file


class LocalDiT:
    """A `wan.generation.backend.DiTBackend` over a DiT module of this process, passes one after the other.
    `weights` default: LoRAs undone from copies of the weights they touched (a DiT built without its files).
    `compile_cache`: the file the compiled blocks' kernels and graphs are saved next to (`wan.runtime.compile_cache`)."""

    def __init__(self, module: MultiTalkDiT, weights: DiTWeights | None = None, compile_cache: Path | None = None):
        self.module = module
        self.weights = weights if weights is not None else DiTWeights(LoraSet(module))
        self.compile_cache = compile_cache
        self._inputs: ClipInputs | None = None
        self._teacache: sampling.TeaCache | None = None

    @property
    def config(self) -> DiTConfig:
        return self.module.config

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def active_audio_layers(self) -> str | None:
        return self.weights.active_audio_layers

    @property
    def active_loras(self) -> tuple[tuple[str, float], ...]:
        return tuple(self.weights.loras.active)

    def set_weights(self, audio_layers: str | None, loras: Sequence[tuple[str | Path, float]]) -> None:
        self.weights.set_weights(audio_layers, loras)

    @torch.inference_mode()
    def teacache_steps(
        self,
        timesteps: torch.Tensor,
        settings: TeaCacheSettings,
        loras: Sequence[tuple[str | Path, float]] | None = None,
    ) -> int:
        weights = None if loras is None else self.weights.time_embedding_with(loras)
        e0s = (self.module.time_embeddings(t, weights)[1] for t in timesteps)
        return sampling.teacache_computed_steps(e0s, settings.thresh, settings.size_bucket)

    def begin_clip(self, inputs: ClipInputs, passes: int, teacache: TeaCacheSettings | None) -> None:
        self._inputs = inputs
        self._teacache = None if teacache is None else sampling.TeaCache(teacache.thresh, teacache.size_bucket)

    def velocities(self, latent: torch.Tensor, t: torch.Tensor, branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if self._inputs is None:
            raise RuntimeError("velocities() before begin_clip()")
        cache = self._teacache.branch if self._teacache is not None else lambda branch: None
        return {b: branch_velocity(self.module, latent, t, self._inputs, b, cache(b)) for b in branches}

    def end_clip(self) -> float | None:
        skipped = self._teacache.skipped_fraction() if self._teacache is not None else None
        self._inputs = self._teacache = None
        return skipped

    def save_compile_cache(self) -> None:
        save_compile_cache(traced_cache_file(self.compile_cache, self.module))

    def close(self) -> None:
        pass
