"""The DiT's audio layers as swappable sets over one set of base weights.

MultiTalk and InfiniteTalk share the Wan2.1-I2V-14B base and the key layout of the audio additions (the audio
projector, and per block the audio cross-attention and its norm); InfiniteTalk publishes its own weights for them,
one set for one speaker and one for two. Switching reads the other set's tensors from its file into the same
parameters (nothing is kept in memory), so switching back is bit-exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..model.dit import MultiTalkDiT
from ..model.fp8 import assign_weight
from .checkpoints import INFINITETALK_FILES, MULTITALK_WEIGHTS_NAME, find_dit_files, is_multitalk_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioLayerSet:
    name: str  # "multitalk", "infinitetalk-single" or "infinitetalk-multi"
    path: Path  # the safetensors file holding every audio key
    float32_norm: bool  # InfiniteTalk normalises the audio tokens in float32 (its `AudioProjModel` under autocast)


def audio_layer_sets(
    checkpoint_dir: Path, multitalk_dir: Path | None = None, infinitetalk_dir: Path | None = None
) -> dict[str, AudioLayerSet]:
    """The sets on disk: MultiTalk's (where the DiT index puts the audio keys) and InfiniteTalk's, if present."""
    multitalk = find_dit_files(Path(checkpoint_dir), multitalk_dir)["audio_proj.norm.weight"]
    if multitalk.name != MULTITALK_WEIGHTS_NAME:
        log.warning("the DiT index takes the audio layers from %s, not %s", multitalk, MULTITALK_WEIGHTS_NAME)
    sets = {"multitalk": AudioLayerSet("multitalk", multitalk, float32_norm=False)}
    if infinitetalk_dir is not None:
        for name, relative in INFINITETALK_FILES.items():
            if (Path(infinitetalk_dir) / relative).is_file():
                sets[name] = AudioLayerSet(name, Path(infinitetalk_dir) / relative, float32_norm=True)
    return sets


def infinitetalk_set(speakers: int) -> str:
    """InfiniteTalk's weights for one speaker, or for two."""
    return "infinitetalk-single" if speakers == 1 else "infinitetalk-multi"


class AudioLayers:
    """Which audio-layer set the DiT holds (the one `load_dit` loaded: MultiTalk's), and the switch to another."""

    def __init__(self, dit: MultiTalkDiT, sets: dict[str, AudioLayerSet], active: str = "multitalk"):
        self.dit, self.sets, self.active = dit, sets, active
        # Taken before any fp8 quantisation, which stores some of these weights in another form.
        self.shapes = {key: value.shape for key, value in dit.state_dict().items() if is_multitalk_key(key)}

    @torch.no_grad()
    def use(self, name: str) -> None:
        if name == self.active:
            return
        if name not in self.sets:
            raise ValueError(f"model: the {name} audio weights are not installed (have: {', '.join(self.sets)})")
        layer_set = self.sets[name]
        with safe_open(str(layer_set.path), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            if stored != set(self.shapes):
                missing, extra = sorted(set(self.shapes) - stored)[:5], sorted(stored - set(self.shapes))[:5]
                raise ValueError(
                    f"{layer_set.path}: not an audio-layer set of this DiT (missing {missing}, extra {extra})"
                )
            for key, shape in self.shapes.items():
                tensor = f.get_tensor(key)
                if tensor.shape != shape:
                    raise ValueError(f"{layer_set.path}: {key} has shape {list(tensor.shape)}, not {list(shape)}")
                assign_weight(self.dit, key, tensor)
        self.dit.audio_proj.float32_norm = layer_set.float32_norm
        self.active = name
        log.info("audio layers: %s (%s)", name, layer_set.path)
