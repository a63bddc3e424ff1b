"""The DiT as the sampling loop sees it: one interface whether it runs in this process
(`wan.runtime.local.LocalDiT`) or in one worker process per GPU (`wan.runtime.workers.WorkerGroup`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..configs import DiTConfig
from . import sampling


@dataclass(frozen=True)
class ClipInputs:
    """Everything the DiT sees for a clip besides the latent and t."""

    context: torch.Tensor  # [L, text_dim], the prompt
    context_null: torch.Tensor  # the negative prompt
    clip_fea: torch.Tensor  # [1, 257, clip_dim]
    y: torch.Tensor  # [1, 20, T, h, w]
    audio: torch.Tensor  # [speakers, frames, window, layers, channels]
    masks: torch.Tensor  # [3, h, w]

    def to(self, device: torch.device | str) -> "ClipInputs":
        return ClipInputs(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def branch_inputs(self, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, audio) of a guidance pass; a dropped audio is ONE silent speaker, as the reference."""
        if branch not in sampling.GUIDANCE_BRANCHES:
            raise ValueError(f"unknown guidance branch {branch!r}; expected one of {sampling.GUIDANCE_BRANCHES}")
        text = self.context_null if branch in ("drop_text", "uncond") else self.context
        audio = torch.zeros_like(self.audio[-1:]) if branch in ("drop_audio", "uncond") else self.audio
        return text, audio


@dataclass(frozen=True)
class TeaCacheSettings:
    thresh: float
    size_bucket: str  # a published bucket table: it picks TeaCache's rescale polynomial


def branch_velocity(
    dit: Callable[..., torch.Tensor],
    latent: torch.Tensor,
    t: torch.Tensor,
    inputs: ClipInputs,
    branch: str,
    cache: sampling.TeaCacheBranch | None = None,
    **dit_options,
) -> torch.Tensor:
    """One guidance pass of the DiT (`dit_options`, e.g. `parallel`, go to its forward)."""
    text, audio = inputs.branch_inputs(branch)
    return dit(latent, t, text, inputs.clip_fea, inputs.y, audio, inputs.masks, cache=cache, **dit_options)


class DiTBackend(Protocol):
    """Where a pipeline's DiT runs. A clip is `begin_clip`, one `velocities` per step, `end_clip`; TeaCache's state
    lives in the backend, per clip and per branch."""

    @property
    def config(self) -> DiTConfig: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def active_audio_layers(self) -> str | None:
        """The audio-layer set the DiT holds (`multitalk`, `infinitetalk-single`, `infinitetalk-multi`)."""
        ...

    @property
    def active_loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs merged into the DiT, as (file, scale)."""
        ...

    def set_weights(self, audio_layers: str | None, loras: Sequence[tuple[str | Path, float]]) -> None:
        """The audio-layer set (None: unchanged) and the merged LoRAs ((file, scale) pairs); only what changes is
        touched, exactly."""
        ...

    def teacache_steps(
        self, timesteps: torch.Tensor, settings: TeaCacheSettings, loras: Sequence[tuple[str | Path, float]] | None
    ) -> int:
        """How many of `timesteps` (`[steps, 1]`) run the blocks under TeaCache (`sampling.teacache_computed_steps`
        over the DiT's time embedding; with `loras`, over the time embedding those LoRAs would give it, the DiT
        left as it is)."""
        ...

    def begin_clip(self, inputs: ClipInputs, passes: int, teacache: TeaCacheSettings | None) -> None:
        """A clip's conditioning, `passes` passes a step, and a fresh TeaCache (None: off)."""
        ...

    def velocities(self, latent: torch.Tensor, t: torch.Tensor, branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The velocity of each guidance branch at (latent, t), on latent's device."""
        ...

    def end_clip(self) -> float | None:
        """Drop the clip's state; the share of DiT passes TeaCache skipped (None without TeaCache)."""
        ...

    def save_compile_cache(self) -> None:
        """Write what was compiled to the backend's compile cache, if it has one (`wan.runtime.compile_cache`)."""
        ...

    def close(self) -> None: ...
