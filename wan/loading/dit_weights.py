"""The DiT's switchable weights, as one state: its audio-layer set and its merged LoRAs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..model.dit import TIME_EMBEDDING_PREFIXES
from .audio_layers import AudioLayers
from .lora import LoraSet


class DiTWeights:
    """Which audio layers the DiT holds and which LoRAs are merged into it. Every change is exact: LoRAs come off
    (restoring the base) before the audio layers are swapped, as they may touch them, and go back on after."""

    def __init__(self, loras: LoraSet, audio_layers: AudioLayers | None = None):
        self.loras, self.audio_layers = loras, audio_layers

    @property
    def active_audio_layers(self) -> str | None:
        """The audio-layer set in the DiT; None where the sets are not known (a DiT built from parts)."""
        return None if self.audio_layers is None else self.audio_layers.active

    def set_weights(self, audio_layers: str | None, loras: Sequence[tuple[str | Path, float]]) -> None:
        """`audio_layers`: `multitalk`, `infinitetalk-single`, `infinitetalk-multi` (None: unchanged); `loras`:
        (file, scale) pairs. Only what changes is touched."""
        if self.audio_layers is None:
            # A DiT built from parts keeps the audio layers it was built with, taken to be MultiTalk's.
            if audio_layers not in (None, "multitalk"):
                raise ValueError(f"model: this DiT has no other audio-layer sets to switch to {audio_layers}")
        elif audio_layers is not None and audio_layers != self.audio_layers.active:
            self.loras.set([])
            self.audio_layers.use(audio_layers)
        self.loras.set(loras)

    def time_embedding_with(self, loras: Sequence[tuple[str | Path, float]]) -> dict[str, torch.Tensor] | None:
        """The time embedding's parameters as `set_weights(_, loras)` would leave them, the DiT untouched; None when
        they would stay as they are. (The audio layers play no part in it.)"""
        if [(str(path), float(scale)) for path, scale in loras] == self.loras.active:
            return None
        names = [name for name, _ in self.loras.model.named_parameters() if name.startswith(TIME_EMBEDDING_PREFIXES)]
        return self.loras.values_with(loras, names)
