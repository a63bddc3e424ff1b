"""Finding and streaming the DiT checkpoint: both published layouts, strict loading, clear errors, low memory."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wan.loading.checkpoints as checkpoints
from wan.loading.checkpoints import WanFiles, check_files, find_dit_files, is_multitalk_key, load_dit
from wan.configs import DiTConfig
from wan.testing.tiny import write_dit

CONFIG = DiTConfig(
    dim=32,
    ffn_dim=64,
    num_heads=2,
    num_layers=2,
    text_len=8,
    text_dim=16,
    intermediate_dim=4,
    output_dim=16,
    context_tokens=4,
    clip_dim=24,
    audio_layers=2,
    audio_channels=8,
)
INDEX = "diffusion_pytorch_model.safetensors.index.json"
SHARD_1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD_2 = "diffusion_pytorch_model-00002-of-00002.safetensors"


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """Layout (b): the two downloads side by side; returns the Wan dir."""
    wan_dir = tmp_path / "Wan2.1-I2V-14B-480P"
    wan_dir.mkdir()
    write_dit(wan_dir, tmp_path / "MeiGen-MultiTalk", CONFIG, torch.Generator().manual_seed(3))
    return wan_dir


def merge_as_readme(wan_dir: Path, multitalk_dir: Path) -> None:
    """The README's merge: keep Wan's index as `_old`, link MultiTalk's index and weights into the Wan dir."""
    (wan_dir / INDEX).rename(wan_dir / (INDEX + "_old"))
    (wan_dir / INDEX).symlink_to(multitalk_dir / INDEX)
    (wan_dir / "multitalk.safetensors").symlink_to(multitalk_dir / "multitalk.safetensors")


def file_tensors(*paths: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in paths:
        tensors.update(load_file(path))
    return tensors


def write_index(path: Path, weight_map: dict[str, str]) -> None:
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def test_published_file_names(tmp_path: Path):
    wan = WanFiles(tmp_path)
    assert wan.config.name == "config.json"
    assert wan.dit_index.name == "diffusion_pytorch_model.safetensors.index.json"
    assert wan.t5.name == "models_t5_umt5-xxl-enc-bf16.pth"
    assert wan.clip.name == "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    assert wan.vae.name == "Wan2.1_VAE.pth"
    assert wan.t5_tokenizer == tmp_path / "google" / "umt5-xxl"


def test_audio_keys_are_the_multitalk_additions():
    assert is_multitalk_key("audio_proj.proj1_vf.weight")
    assert is_multitalk_key("blocks.39.audio_cross_attn.kv_linear.bias")
    assert is_multitalk_key("blocks.0.norm_x.weight")
    base = ("blocks.0.norm3.weight", "blocks.0.cross_attn.norm_k_img.weight", "head.head.weight", "img_emb.proj.0.bias")
    assert not any(is_multitalk_key(key) for key in base)


def test_both_layouts_give_the_files_weights(plain: Path):
    multitalk_dir = plain.parent / "MeiGen-MultiTalk"
    truth = file_tensors(plain / SHARD_1, plain / SHARD_2, multitalk_dir / "multitalk.safetensors")
    assert len(truth) == 23 + 10 + 2 * (32 + 8) and any(is_multitalk_key(k) for k in truth)

    files_b = find_dit_files(plain)
    assert {k for k, p in files_b.items() if p.parent == multitalk_dir} == {k for k in truth if is_multitalk_key(k)}
    model_b = load_dit(plain, dtype=torch.float32)

    merged = plain.parent / "merged"
    shutil.copytree(plain, merged)
    merge_as_readme(merged, multitalk_dir)
    # No MeiGen-MultiTalk dir next to the merged one: everything must come from the merged dir itself.
    files_a = find_dit_files(merged)
    assert set(files_a.values()) == {merged / SHARD_1, merged / SHARD_2, merged / "multitalk.safetensors"}
    model_a = load_dit(merged, dtype=torch.float32)

    for model in (model_a, model_b):
        state = model.state_dict()
        assert state.keys() == truth.keys()
        assert all(torch.equal(state[k], truth[k]) for k in truth)
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_explicit_multitalk_dir_and_missing_index(plain: Path, tmp_path: Path):
    elsewhere = tmp_path / "downloads" / "mt"
    shutil.move(plain.parent / "MeiGen-MultiTalk", elsewhere)
    with pytest.raises(FileNotFoundError, match="multitalk.safetensors"):
        find_dit_files(plain)
    # Without its index json the audio keys are read from the header of multitalk.safetensors.
    (elsewhere / INDEX).unlink()
    files = find_dit_files(plain, elsewhere)
    assert {k for k, p in files.items() if p == elsewhere / "multitalk.safetensors"} == {
        k for k in load_file(elsewhere / "multitalk.safetensors")
    }
    load_dit(plain, elsewhere, dtype=torch.float32)


def test_casts_to_dtype_and_device(plain: Path):
    truth = file_tensors(plain / SHARD_1, plain / SHARD_2, plain.parent / "MeiGen-MultiTalk" / "multitalk.safetensors")
    model = load_dit(plain, dtype=torch.bfloat16, device="cpu")
    state = model.state_dict()
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert all(torch.equal(state[k], truth[k].to(torch.bfloat16)) for k in truth)


def test_reads_one_float32_tensor_at_a_time(plain: Path, monkeypatch):
    """Every fp32 tensor read from a file is freed before the next one is read."""
    reads: list[weakref.ref] = []

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, key):
            return self.handle.get_slice(key)

        def get_tensor(self, key):
            alive = [ref for ref in reads if ref() is not None]
            assert not alive, f"{len(alive)} fp32 tensors still alive when reading {key}"
            tensor = self.handle.get_tensor(key)
            assert tensor.dtype == torch.float32
            reads.append(weakref.ref(tensor))
            return tensor

    real_safe_open = checkpoints.safe_open
    monkeypatch.setattr(checkpoints, "safe_open", lambda *a, **k: Recording(real_safe_open(*a, **k)))
    model = load_dit(plain, dtype=torch.bfloat16)
    assert len(reads) == len(model.state_dict())
    assert all(ref() is None for ref in reads)


def test_missing_shard_names_the_file(plain: Path):
    (plain / SHARD_2).unlink()
    with pytest.raises(FileNotFoundError, match=SHARD_2):
        load_dit(plain)


@pytest.mark.parametrize("keep_bytes", [4, 100, -1000])
def test_truncated_shard_names_the_file(plain: Path, keep_bytes: int):
    data = (plain / SHARD_1).read_bytes()
    (plain / SHARD_1).write_bytes(data[:keep_bytes])
    with pytest.raises(ValueError, match=SHARD_1) as info:
        load_dit(plain)
    assert "truncated" in str(info.value)


def test_wrong_shape_names_file_key_and_shapes(plain: Path):
    path = plain / SHARD_1
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2)
    rows, cols = tensors[key].shape
    tensors[key] = torch.zeros(rows, cols + 1)
    save_file(tensors, path)
    with pytest.raises(ValueError) as info:
        load_dit(plain)
    message = str(info.value)
    assert str(path) in message and key in message
    assert f"[{rows}, {cols + 1}]" in message and f"[{rows}, {cols}]" in message


def test_missing_and_unexpected_keys(plain: Path):
    multitalk_dir = plain.parent / "MeiGen-MultiTalk"
    audio = load_file(multitalk_dir / "multitalk.safetensors")
    index = json.loads((multitalk_dir / INDEX).read_text())["weight_map"]

    dropped = "blocks.1.norm_x.bias"
    del audio[dropped], index[dropped]
    save_file(audio, multitalk_dir / "multitalk.safetensors")
    write_index(multitalk_dir / INDEX, index)
    with pytest.raises(ValueError, match=dropped):
        load_dit(plain)

    audio[dropped] = torch.zeros(CONFIG.dim)
    audio["blocks.1.audio_cross_attn.extra.weight"] = torch.zeros(2)
    index[dropped] = index["blocks.1.audio_cross_attn.extra.weight"] = "multitalk.safetensors"
    save_file(audio, multitalk_dir / "multitalk.safetensors")
    write_index(multitalk_dir / INDEX, index)
    with pytest.raises(ValueError, match=r"blocks\.1\.audio_cross_attn\.extra\.weight \(multitalk\.safetensors\)"):
        load_dit(plain)


def test_index_entry_absent_from_its_shard(plain: Path):
    index = json.loads((plain / INDEX).read_text())["weight_map"]
    key = next(k for k, name in index.items() if name == SHARD_1)
    index[key] = SHARD_2
    write_index(plain / INDEX, index)
    with pytest.raises(ValueError, match=f"{SHARD_2}.*{key}"):
        load_dit(plain)


def test_check_files_lists_everything_missing(tmp_path: Path):
    wan_dir, wav2vec_dir = tmp_path / "Wan2.1-I2V-14B-480P", tmp_path / "chinese-wav2vec2-base"
    with pytest.raises(FileNotFoundError) as info:
        check_files(wan_dir, wav2vec_dir=wav2vec_dir)
    message = str(info.value)
    for name in (
        "config.json",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        "Wan2.1_VAE.pth",
        "umt5-xxl/spiece.model",
        "umt5-xxl/tokenizer.json",
        "umt5-xxl/tokenizer_config.json",
        "umt5-xxl/special_tokens_map.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "chinese-wav2vec2-base/preprocessor_config.json",
        "chinese-wav2vec2-base/model.safetensors",
    ):
        assert name in message, name


def test_check_files_reports_missing_shards_with_the_rest(plain: Path):
    (plain / SHARD_2).unlink()
    (plain.parent / "MeiGen-MultiTalk" / "multitalk.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as info:
        check_files(plain)
    message = str(info.value)
    assert SHARD_2 in message and "multitalk.safetensors" in message and "Wan2.1_VAE.pth" in message
