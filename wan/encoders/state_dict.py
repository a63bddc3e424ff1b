"""The published encoder files are plain `torch.save`'d state dicts with Wan's own key names. These helpers read one
and assign it strictly into a library model built on the meta device, with errors that name the file and its keys.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

Config = TypeVar("Config")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`'d flat state dict, memory-mapped so tensors are paged in only when used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {e}") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"checkpoint {path} is not a flat dict of tensors")
    return state_dict


def check_keys(
    present: set[str], required: set[str], path: Path, *, ignored: Callable[[str], bool] | None = None
) -> None:
    """Every required key present and nothing else, except keys the caller knowingly ignores."""
    missing = sorted(required - present)
    unexpected = sorted(k for k in present - required if ignored is None or not ignored(k))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path}: {len(missing)} missing keys {missing[:20]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:20]}"
        )


def assign_checked(model: nn.Module, tensors: dict[str, torch.Tensor], sources: dict[str, str], path: Path) -> None:
    """Strict load by assignment into a meta-built `model`; `sources` names each model key's key in the file."""
    expected = model.state_dict()
    check_keys(set(tensors), set(expected), path)
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"checkpoint {path}: {sources.get(key, key)} has shape {list(tensor.shape)}, "
                f"but the model derived from this file expects {list(expected[key].shape)} (as {key})"
            )
    model.load_state_dict(tensors, strict=True, assign=True)


def derive_config(derive: Callable[[dict[str, torch.Tensor]], Config], state_dict: dict, path: Path) -> Config:
    """`derive(state_dict)` (a config read off tensor shapes), with its failures reported against the file."""
    try:
        return derive(state_dict)
    except KeyError as e:
        raise ValueError(f"checkpoint {path}: missing key {e}") from e
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from e
