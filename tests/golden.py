"""Access to the golden reference cases (`../shared/golden` or $MULTITALK_GOLDEN_DIR).

Everything a golden test needs (configs, shapes, tolerances, file paths) is read from each case's `case.json`,
so a further case set in the same format runs unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("MULTITALK_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


@dataclass
class GoldenCase:
    name: str
    folder: Path
    meta: dict

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    def inputs(self) -> dict[str, torch.Tensor]:
        return load_file(self.folder / self.meta.get("files", {}).get("inputs", "inputs.safetensors"))

    def outputs(self) -> dict[str, torch.Tensor]:
        return load_file(self.folder / self.meta.get("files", {}).get("outputs", "outputs.safetensors"))

    def file(self, key: str) -> Path:
        """A file named in case.json's `files` (e.g. `weights`), resolved against the case folder."""
        return (self.folder / self.meta["files"][key]).resolve()

    def tolerances(self) -> dict[str, dict]:
        return self.meta["tolerance"]["per_tensor"]

    def assert_close(self, name: str, actual: torch.Tensor, expected: torch.Tensor | None = None) -> None:
        """Max-abs error within the case's strict tolerance; integer tensors must match exactly."""
        if expected is None:
            expected = self.outputs()[name]
        actual = actual.detach().cpu()
        assert tuple(actual.shape) == tuple(expected.shape), f"{self.name}/{name}: shape {actual.shape} != {expected.shape}"
        if not expected.is_floating_point():
            assert torch.equal(actual.to(expected.dtype), expected), f"{self.name}/{name}: integer tensor differs"
            return
        assert torch.isfinite(actual).all(), f"{self.name}/{name}: non-finite values"
        err = (actual.double() - expected.double()).abs().max().item()
        tol = self.tolerances()[name]["strict_max_abs_err"]
        assert err <= tol, f"{self.name}/{name}: max abs err {err:.3g} > strict {tol:.3g}"


def load_case(name: str) -> GoldenCase:
    folder = GOLDEN_DIR / name
    if not (folder / "case.json").exists():
        pytest.fail(f"golden case {name} not found under {GOLDEN_DIR} (set MULTITALK_GOLDEN_DIR)")
    return GoldenCase(name, folder, json.loads((folder / "case.json").read_text()))


def cases_with_prefix(prefix: str) -> list[str]:
    """All case folders whose name starts with `prefix` (held-out sets may add e.g. dit_2p_seed3)."""
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(p.name for p in GOLDEN_DIR.iterdir() if p.name.startswith(prefix) and (p / "case.json").exists())
