"""Loading the encoders' published `.pth` files: the full key tables, knowingly ignored keys, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.golden import load_case
from wan.encoders.image import ImageEncoder, load_clip_vision
from wan.encoders.text import TextEncoder, clean_prompt, load_umt5
from wan.encoders.vae import VideoVAE, load_wan_vae

KEYS_DIR = Path(__file__).resolve().parent / "data" / "keys"


def read_key_table(name: str) -> tuple[dict[str, torch.Tensor], int]:
    """A published key table (`key<TAB>[shape]<TAB>dtype` rows, `#TOTAL_PARAMS n` trailer) as meta tensors."""
    tensors, total_params = {}, None
    for line in (KEYS_DIR / name).read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == "#TOTAL_PARAMS":
            total_params = int(fields[1])
        elif line.strip():
            tensors[fields[0]] = torch.empty(json.loads(fields[1]), device="meta")
    return tensors, total_params


def golden_state_dict(case_name: str) -> dict[str, torch.Tensor]:
    case = load_case(case_name)
    return load_file(case.folder / case.meta["files"]["weights"].split()[0])


def clip_head_dim() -> int:
    config = load_case("clip_visual").config
    return config["vision_dim"] // config["vision_heads"]


def save(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state_dict, path)
    return path


# The published key tables: every key is used or knowingly ignored, and the config read off them is the real one.


def test_published_umt5_xxl_keys_load():
    state_dict, total_params = read_key_table("t5_umt5xxl_enc.tsv")
    model = load_umt5(state_dict, Path("t5.pth"), dtype=torch.bfloat16, device="meta")
    config = model.config
    assert (config.vocab_size, config.d_model, config.d_kv, config.d_ff) == (256384, 4096, 64, 10240)
    assert (config.num_layers, config.num_heads, config.relative_attention_num_buckets) == (24, 64, 32)
    assert config.relative_attention_max_distance == 128 and config.dense_act_fn == "gelu_new"
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == total_params


def test_published_clip_keys_load_visual_tower_only():
    state_dict, _ = read_key_table("clip_xlmr_vith14.tsv")
    assert any(k.startswith("textual.") for k in state_dict) and "log_scale" in state_dict
    model = load_clip_vision(state_dict, Path("clip.pth"), dtype=torch.float16, device="meta")
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (1280, 16, 32)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (5120, 224, 14)
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-5


def test_published_vae_keys_load():
    state_dict, total_params = read_key_table("vae_wan21.tsv")
    model = load_wan_vae(state_dict, Path("vae.pth"), dtype=torch.float32, device="meta")
    config = model.config
    assert (config.base_dim, config.z_dim, config.num_res_blocks) == (96, 16, 2)
    assert list(config.dim_mult) == [1, 2, 4, 4] and list(config.temperal_downsample) == [False, True, True]
    assert sum(p.numel() for p in model.parameters()) == total_params


def test_clip_accepts_text_tower_and_ignores_it(tmp_path: Path):
    state_dict = golden_state_dict("clip_visual")
    state_dict |= {"textual.token_embedding.weight": torch.ones(4, 2), "log_scale": torch.tensor(4.6)}
    encoder = ImageEncoder.from_checkpoint(save(state_dict, tmp_path / "clip.pth"), head_dim=clip_head_dim())
    assert encoder.model.config.num_hidden_layers == 3


# Clear errors.


@pytest.mark.parametrize(
    "load",
    [
        lambda path, folder: TextEncoder.from_checkpoint(path, folder),
        lambda path, folder: ImageEncoder.from_checkpoint(path),
        lambda path, folder: VideoVAE.from_checkpoint(path),
    ],
    ids=["t5", "clip", "vae"],
)
def test_missing_file_is_named(load, tmp_path: Path):
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load(path, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_named(damage: str, tmp_path: Path):
    path = save(golden_state_dict("vae"), tmp_path / "vae.pth")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match="vae.pth.*truncated or corrupt"):
        VideoVAE.from_checkpoint(path)


def test_t5_wrong_shape_names_key_and_shapes(tmp_path: Path):
    state_dict = golden_state_dict("t5")
    state_dict["blocks.1.attn.q.weight"] = torch.ones(32, 31)
    with pytest.raises(ValueError, match=r"t5.pth: blocks\.1\.attn\.q\.weight has shape \[32, 31\].*\[32, 32\]"):
        TextEncoder.from_checkpoint(save(state_dict, tmp_path / "t5.pth"), tmp_path)


def test_clip_wrong_qkv_shape_names_key_and_shapes(tmp_path: Path):
    state_dict = golden_state_dict("clip_visual")
    state_dict["visual.transformer.1.attn.to_qkv.weight"] = torch.ones(95, 32)
    path = save(state_dict, tmp_path / "clip.pth")
    message = r"clip.pth: visual\.transformer\.1\.attn\.to_qkv\.weight has shape \[95, 32\], expected \[96, 32\]"
    with pytest.raises(ValueError, match=message):
        ImageEncoder.from_checkpoint(path, head_dim=clip_head_dim())


def test_vae_wrong_shape_names_key_and_shapes(tmp_path: Path):
    state_dict = golden_state_dict("vae")
    state_dict["decoder.head.2.weight"] = torch.ones(3, 5, 3, 3, 3)
    message = r"vae.pth: decoder\.head\.2\.weight has shape \[3, 5, 3, 3, 3\].* expects \[3, 4, 3, 3, 3\]"
    with pytest.raises(ValueError, match=message):
        VideoVAE.from_checkpoint(save(state_dict, tmp_path / "vae.pth"))


def test_clip_unexpected_visual_key_fails(tmp_path: Path):
    state_dict = golden_state_dict("clip_visual") | {"visual.proj_extra.weight": torch.ones(2)}
    with pytest.raises(ValueError, match=r"clip.pth: .*unexpected keys \['visual\.proj_extra\.weight'\]"):
        ImageEncoder.from_checkpoint(save(state_dict, tmp_path / "clip.pth"), head_dim=clip_head_dim())


def test_clip_missing_visual_key_fails(tmp_path: Path):
    state_dict = golden_state_dict("clip_visual")
    del state_dict["visual.post_norm.bias"]
    with pytest.raises(ValueError, match=r"clip.pth: 1 missing keys \['visual\.post_norm\.bias'\]"):
        ImageEncoder.from_checkpoint(save(state_dict, tmp_path / "clip.pth"), head_dim=clip_head_dim())


def test_t5_unexpected_key_fails(tmp_path: Path):
    state_dict = golden_state_dict("t5") | {"blocks.0.attn.q.bias": torch.ones(32)}
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.0\.attn\.q\.bias'\]"):
        TextEncoder.from_checkpoint(save(state_dict, tmp_path / "t5.pth"), tmp_path)


def test_missing_key_read_for_the_config_is_named(tmp_path: Path):
    state_dict = golden_state_dict("t5")
    del state_dict["token_embedding.weight"]
    with pytest.raises(ValueError, match=r"t5.pth: missing key 'token_embedding\.weight'"):
        TextEncoder.from_checkpoint(save(state_dict, tmp_path / "t5.pth"), tmp_path)


def test_clip_head_dim_must_divide_width(tmp_path: Path):
    with pytest.raises(ValueError, match=r"clip.pth: CLIP width 32 is not a multiple of head_dim 80"):
        ImageEncoder.from_checkpoint(save(golden_state_dict("clip_visual"), tmp_path / "clip.pth"))


# Prompt cleaning, hand-worked.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  a  man\tsings \n\n loudly  ", "a man sings loudly"),
        ("Tom &amp;amp; Jerry", "Tom & Jerry"),  # escaped twice, unescaped twice
        ("caf\u00c3\u00a9 au lait", "caf\u00e9 au lait"),  # UTF-8 read as Latin-1, repaired by ftfy
    ],
)
def test_clean_prompt(text: str, expected: str):
    assert clean_prompt(text) == expected
