"""The DiT's state_dict matches the published 14B checkpoint (keys, shapes, parameter count), built on `meta`."""

from __future__ import annotations

from pathlib import Path

import torch

from wan.configs import MULTITALK_14B, DiTConfig
from wan.model.dit import MultiTalkDiT

KEYS_TSV = Path(__file__).resolve().parent / "data" / "keys" / "dit_multitalk_14b.tsv"


def read_key_table(path: Path) -> tuple[dict[str, tuple[int, ...]], int, int]:
    """tsv rows `key<TAB>[shape]<TAB>dtype` plus a `#TOTAL_PARAMS n #KEYS m` trailer."""
    shapes, total_params, total_keys = {}, None, None
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == "#TOTAL_PARAMS":
            total_params, total_keys = int(fields[1]), int(fields[3])
        elif line.strip():
            shapes[fields[0]] = tuple(int(n) for n in fields[1].strip("[]").split(",") if n.strip())
    return shapes, total_params, total_keys


def test_published_14b_keys_and_shapes():
    expected, total_params, total_keys = read_key_table(KEYS_TSV)
    assert len(expected) == total_keys == 1633
    with torch.device("meta"):
        model = MultiTalkDiT(MULTITALK_14B)
    actual = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == [], "missing keys"
    assert sorted(set(actual) - set(expected)) == [], "unexpected keys"
    wrong = {k: (actual[k], v) for k, v in expected.items() if actual[k] != v}
    assert wrong == {}, f"shape mismatches (ours, published): {wrong}"
    assert sum(p.numel() for p in model.parameters()) == total_params == 18_882_046_784


def test_optional_norms_drop_their_keys():
    config = DiTConfig(
        dim=32,
        ffn_dim=64,
        num_heads=2,
        num_layers=1,
        text_dim=16,
        text_len=8,
        intermediate_dim=4,
        output_dim=16,
        qk_norm=False,
        cross_attn_norm=False,
        norm_input_visual=False,
        norm_output_audio=False,
        clip_dim=24,
        audio_layers=3,
        audio_channels=5,
    )
    with torch.device("meta"):
        keys = MultiTalkDiT(config).state_dict()
    assert not [k for k in keys if "norm_q" in k or "norm_k" in k or "norm3" in k or "norm_x" in k]
    assert "audio_proj.norm.weight" not in keys
    # clip_dim / audio_layers / audio_channels drive the input widths.
    assert keys["img_emb.proj.1.weight"].shape == (24, 24)
    assert keys["audio_proj.proj1.weight"].shape == (4, 5 * 3 * 5)
    assert keys["audio_proj.proj1_vf.weight"].shape == (4, 8 * 3 * 5)
