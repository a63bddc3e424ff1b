"""Reading the reference's golden cases (`case.json` + safetensors): shared by the tests and the GPU checks."""

from __future__ import annotations

from ..configs import DiTConfig

# Sizes the reference fixes in code, as case.json's `config_fixed_in_code` names them -> DiTConfig field.
FIXED_IN_CODE = {
    "clip_dim": "clip_dim",
    "audio_blocks": "audio_layers",
    "audio_channels": "audio_channels",
    "class_range": "class_range",
    "class_interval": "class_interval",
}


def dit_config_values(meta: dict) -> dict:
    """DiTConfig fields of a DiT case: its `config` plus the sizes the reference fixes in code."""
    values = dict(meta["config"])
    fixed = meta.get("config_fixed_in_code", {})
    values.update({field: fixed[key] for key, field in FIXED_IN_CODE.items() if key in fixed})
    return values


def dit_config(meta: dict) -> DiTConfig:
    return DiTConfig.from_dict(dit_config_values(meta))
