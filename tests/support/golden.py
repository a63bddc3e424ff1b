"""Access to the golden reference cases (`tests/data/golden`, or $MULTITALK_GOLDEN_DIR for another set).

Everything a golden test needs (configs, shapes, tolerances, file paths) is read from each case's `case.json`,
so a further case set in the same format runs unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan.configs import DiTConfig
from wan.encoders.text import TextEncoder, load_umt5
from wan.encoders.vae import VideoVAE
from wan.model.dit import MultiTalkDiT
from wan.testing.golden import dit_config_values

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(os.environ.get("MULTITALK_GOLDEN_DIR", REPO_ROOT / "tests" / "data" / "golden"))


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

    def file(self, key: str, part: str | None = None) -> Path:
        """A file named in case.json's `files` (e.g. `weights`, or `weights`/`dit` where it is a mapping), resolved
        against the case folder. Entries may have a note after the path ("x.safetensors (only the ... keys)")."""
        entry = self.meta["files"][key]
        entry = entry[part] if part is not None else entry
        return (self.folder / entry.split()[0]).resolve()

    def dit_config_values(self) -> dict:
        """DiTConfig fields of the case: its `config` plus the sizes the reference fixes in code."""
        return dit_config_values(self.meta)

    def dit(self) -> MultiTalkDiT:
        """The case's tiny DiT with its stored weights (strict), in eval mode without gradients."""
        model = MultiTalkDiT(DiTConfig.from_dict(self.dit_config_values())).eval().requires_grad_(False)
        model.load_state_dict(load_file(self.file("weights")), strict=True)
        return model

    def tolerances(self) -> dict[str, dict]:
        return self.meta["tolerance"]["per_tensor"]

    def strict_tolerance(self, name: str) -> float:
        """The case's strict tolerance for `name`. Older cases list tolerances for their main outputs only; an
        intermediate they do not list is held to the loosest strict tolerance the case lists."""
        tolerances = self.tolerances()
        if name in tolerances:
            return tolerances[name]["strict_max_abs_err"]
        return max(entry["strict_max_abs_err"] for entry in tolerances.values())

    def assert_close(
        self, name: str, actual: torch.Tensor, expected: torch.Tensor | None = None, tolerance: float | None = None
    ) -> None:
        """Max-abs error within the case's strict tolerance (or `tolerance`); integer tensors must match exactly."""
        if expected is None:
            expected = self.outputs()[name]
        actual = actual.detach().cpu()
        assert tuple(actual.shape) == tuple(expected.shape), (
            f"{self.name}/{name}: shape {actual.shape} != {expected.shape}"
        )
        if not expected.is_floating_point():
            assert torch.equal(actual.to(expected.dtype), expected), f"{self.name}/{name}: integer tensor differs"
            return
        # NaN marks values the reference never evaluated (TeaCache tables): they must be NaN here too.
        missing = torch.isnan(expected)
        assert torch.equal(torch.isnan(actual), missing), f"{self.name}/{name}: NaN where the golden has values"
        assert torch.isfinite(actual[~missing]).all(), f"{self.name}/{name}: non-finite values"
        tol = tolerance if tolerance is not None else self.strict_tolerance(name)
        err = (actual[~missing].double() - expected[~missing].double()).abs().max().item() if (~missing).any() else 0.0
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


@dataclass
class GoldenParts:
    """The tiny components a `pipeline_*` case names: its DiT, T5 (fed the stub tokenizer's stored ids), VAE, and
    the fixed CLIP features the reference's stub returned."""

    dit: MultiTalkDiT
    encode_text: Callable[[list[str]], list[torch.Tensor]]
    vae: VideoVAE
    clip_features: torch.Tensor


def golden_parts(case: GoldenCase, scratch: Path) -> GoldenParts:
    inputs = case.inputs()
    dit_weights = case.file("weights", "dit")
    dit = MultiTalkDiT(DiTConfig.from_dict(load_case(dit_weights.parent.name).dit_config_values()))
    dit.load_state_dict(load_file(dit_weights), strict=True)
    t5_weights = case.file("weights", "t5")
    # The reference run used a stub tokenizer whose ids are stored: only the encoder is real here.
    text_len = case.config.get("text_len", dit.config.text_len)
    t5 = TextEncoder(load_umt5(load_file(t5_weights), t5_weights, dtype=torch.float32, device="cpu"), None, text_len)
    vae_path = scratch / "vae.pth"  # VideoVAE reads the published .pth format
    torch.save(load_file(case.file("weights", "vae")), vae_path)
    if "clip_stub_output" in inputs:
        clip = inputs["clip_stub_output"]
    else:  # newer cases reference the tensor of pipeline_e2e instead of copying it
        clip = load_file(case.file("clip_stub_output"))["clip_stub_output"]
    return GoldenParts(
        dit=dit.eval(),
        encode_text=lambda prompts: t5.encode_ids(inputs["t5_ids"], inputs["t5_mask"]),
        vae=VideoVAE.from_checkpoint(vae_path, dtype=torch.float32),
        clip_features=clip,
    )
