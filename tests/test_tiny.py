"""The tiny checkpoint set: published file and key names, consistent dims, determinism, and loading by every loader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from src.audio.wav2vec import get_embedding, load_wav2vec
from wan.loading.checkpoints import WanFiles, check_files, load_dit
from wan.configs import DiTConfig
from wan.encoders.image import ImageEncoder
from wan.encoders.text import TextEncoder
from wan.testing.tiny import (
    TINY_CLIP,
    TINY_DIT,
    TINY_T5,
    ClipDims,
    T5Dims,
    VaeDims,
    clip_shapes,
    dit_shapes,
    main,
    t5_shapes,
    vae_shapes,
    write_tiny_checkpoints,
)
from wan.encoders.vae import VideoVAE

DATA = Path(__file__).resolve().parent / "data"
KEYS_DIR = DATA / "keys"
WAV2VEC_GOLDEN = DATA / "golden" / "wav2vec2_embed" / "case.json"

WAN = "Wan2.1-I2V-14B-480P"
SHARD_1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD_2 = "diffusion_pytorch_model-00002-of-00002.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
PUBLISHED_FILES = {
    f"{WAN}/config.json",
    f"{WAN}/{SHARD_1}",
    f"{WAN}/{SHARD_2}",
    f"{WAN}/{INDEX}",
    f"{WAN}/models_t5_umt5-xxl-enc-bf16.pth",
    f"{WAN}/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    f"{WAN}/Wan2.1_VAE.pth",
    f"{WAN}/google/umt5-xxl/spiece.model",
    f"{WAN}/google/umt5-xxl/tokenizer.json",
    f"{WAN}/google/umt5-xxl/tokenizer_config.json",
    f"{WAN}/google/umt5-xxl/special_tokens_map.json",
    "MeiGen-MultiTalk/multitalk.safetensors",
    f"MeiGen-MultiTalk/{INDEX}",
    "chinese-wav2vec2-base/config.json",
    "chinese-wav2vec2-base/preprocessor_config.json",
    "chinese-wav2vec2-base/pytorch_model.bin",
    "chinese-wav2vec2-base/model.safetensors",
    # lightx2v's step-distillation LoRA (Kijai/WanVideo_comfy), for the fast preset
    "loras/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",
    "InfiniteTalk/single/infinitetalk.safetensors",
    "InfiniteTalk/multi/infinitetalk.safetensors",
    # not published: the tiny set's thumbnail bucket tables (wan.testing.tiny.tiny_size_buckets)
    "size_buckets.json",
}


def read_key_table(name: str) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """Ordered (key, shape) rows of a `docs/keys` tsv, and its total parameter count."""
    rows, total = [], None
    for line in (KEYS_DIR / name).read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == "#TOTAL_PARAMS":
            total = int(fields[1])
        elif line.strip():
            rows.append((fields[0], tuple(int(n) for n in fields[1].strip("[]").split(",") if n.strip())))
    return rows, total


def keys_with_layers_below(name: str, layers: dict[str, int]) -> set[str]:
    """The tsv's key names with every `<prefix>.<i>.` layer index i below the given count for that prefix."""
    keys = set()
    for key, _ in read_key_table(name)[0]:
        matches = [(re.match(re.escape(prefix) + r"\.(\d+)\.", key), count) for prefix, count in layers.items()]
        if all(match is None or int(match.group(1)) < count for match, count in matches):
            keys.add(key)
    return keys


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def root(tiny_checkpoints) -> Path:
    return tiny_checkpoints  # written with seed 0


@pytest.mark.parametrize(
    "table, shapes",
    [
        ("dit_multitalk_14b.tsv", lambda: dit_shapes(DiTConfig())),
        ("t5_umt5xxl_enc.tsv", lambda: t5_shapes(T5Dims(256384, 4096, 10240, 64, 24))),
        ("clip_xlmr_vith14.tsv", lambda: clip_shapes(ClipDims(1280, 32, 1024, 250002, 1024, 24, 514))),
        ("vae_wan21.tsv", lambda: vae_shapes(VaeDims(96))),
    ],
)
def test_shape_tables_at_published_size_match_the_key_dumps(table, shapes):
    rows, total = read_key_table(table)
    assert list(shapes().items()) == rows
    assert sum(int(np.prod(shape)) for _, shape in rows) == total


def test_published_layout(root: Path):
    written = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert written == PUBLISHED_FILES
    assert sum((root / p).stat().st_size for p in written) < 30 * 2**20
    check_files(root / WAN, wav2vec_dir=root / "chinese-wav2vec2-base")


def test_dit_files(root: Path):
    wan_dir, multitalk_dir = root / WAN, root / "MeiGen-MultiTalk"
    shards = {name: load_file(wan_dir / name) for name in (SHARD_1, SHARD_2)}
    audio = load_file(multitalk_dir / "multitalk.safetensors")
    base_keys = set(shards[SHARD_1]) | set(shards[SHARD_2])
    assert shards[SHARD_1] and shards[SHARD_2] and not set(shards[SHARD_1]) & set(shards[SHARD_2])

    expected = keys_with_layers_below("dit_multitalk_14b.tsv", {"blocks": TINY_DIT.num_layers})
    assert base_keys | set(audio) == expected and not base_keys & set(audio)
    # multitalk.safetensors: the 10 audio_proj tensors and the 8 audio tensors of every block (reference §1.3).
    audio_block = re.compile(r"blocks\.\d+\.(audio_cross_attn|norm_x)\.")
    audio_expected = {k for k in expected if k.startswith("audio_proj.") or audio_block.match(k)}
    assert set(audio) == audio_expected and len(audio) == 10 + 8 * TINY_DIT.num_layers

    wan_index = json.loads((wan_dir / INDEX).read_text())
    assert wan_index["weight_map"] == {k: name for name, shard in shards.items() for k in shard}
    assert wan_index["metadata"]["total_size"] == sum(t.nbytes for s in shards.values() for t in s.values())
    multitalk_index = json.loads((multitalk_dir / INDEX).read_text())["weight_map"]
    assert multitalk_index == {**wan_index["weight_map"], **{k: "multitalk.safetensors" for k in audio}}

    tensors = {**shards[SHARD_1], **shards[SHARD_2], **audio}
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert {k: tuple(t.shape) for k, t in tensors.items()} == dit_shapes(TINY_DIT)


def test_dims_agree_across_components(root: Path):
    wan = WanFiles(root / WAN)
    config = json.loads(wan.config.read_text())
    assert config["_class_name"] == "WanModel" and config["model_type"] == "i2v"
    assert DiTConfig.from_json(wan.config) == TINY_DIT
    t5 = read_weights(wan.t5)
    clip = read_weights(wan.clip)
    wav2vec = json.loads((root / "chinese-wav2vec2-base" / "config.json").read_text())
    assert TINY_DIT.text_dim == t5["norm.weight"].shape[0]
    assert TINY_DIT.clip_dim == clip["visual.pre_norm.weight"].shape[0] == 160
    assert clip["visual.pos_embedding"].shape == (1, 257, 160)
    assert (TINY_DIT.audio_layers, TINY_DIT.audio_channels) == (wav2vec["num_hidden_layers"], wav2vec["hidden_size"])


def test_encoder_and_vae_key_names(root: Path):
    wan = WanFiles(root / WAN)
    t5 = read_weights(wan.t5)
    assert set(t5) == keys_with_layers_below("t5_umt5xxl_enc.tsv", {"blocks": TINY_T5.num_layers})
    assert {t.dtype for t in t5.values()} == {torch.bfloat16}
    clip = read_weights(wan.clip)
    layers = {"visual.transformer": TINY_CLIP.vision_layers, "textual.blocks": TINY_CLIP.text_layers}
    assert set(clip) == keys_with_layers_below("clip_xlmr_vith14.tsv", layers)
    vae = read_weights(wan.vae)
    assert set(vae) == {key for key, _ in read_key_table("vae_wan21.tsv")[0]} and len(vae) == 194
    assert vae["conv2.weight"].shape == (16, 16, 1, 1, 1)


def test_wav2vec2_files(root: Path):
    folder = root / "chinese-wav2vec2-base"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Wav2Vec2ForPreTraining"]
    assert config["conv_dim"] == [16] * 7
    assert config["conv_kernel"] == [10, 3, 3, 3, 3, 2, 2] and config["conv_stride"] == [5, 2, 2, 2, 2, 2, 2]
    expected = {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16,
        "feat_extract_norm": "group",
        "do_stable_layer_norm": False,
        "conv_bias": False,
    }
    assert {k: config[k] for k in expected} == expected
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"
    assert preprocessor["sampling_rate"] == 16000 and preprocessor["do_normalize"] is True
    assert preprocessor["return_attention_mask"] is False

    from_bin, from_safetensors = read_weights(folder / "pytorch_model.bin"), read_weights(folder / "model.safetensors")
    assert from_bin.keys() == from_safetensors.keys()
    assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)
    # The golden case lists Wav2Vec2Model's keys (same structure); the dump adds the prefix and the pretraining heads.
    golden = {row["key"]: tuple(row["shape"]) for row in json.loads(WAV2VEC_GOLDEN.read_text())["state_dict_keys"]}
    legacy = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    for new, old in legacy.items():
        golden = {k.replace(new, old): v for k, v in golden.items()}
    encoder = {k.removeprefix("wav2vec2."): tuple(v.shape) for k, v in from_bin.items() if k.startswith("wav2vec2.")}
    assert encoder == golden
    heads = {k.split(".")[0] for k in from_bin if not k.startswith("wav2vec2.")}
    assert heads == {"quantizer", "project_q", "project_hid"}


def test_the_text_tokenizer_agrees_with_its_sentencepiece_model(root: Path):
    wan = WanFiles(root / WAN)
    text = "Two people talk to each other in a small studio, quietly."
    sp = spm.SentencePieceProcessor(model_file=str(wan.t5_tokenizer / "spiece.model"))
    t5 = AutoTokenizer.from_pretrained(wan.t5_tokenizer, local_files_only=True)
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5(text)["input_ids"] == sp.encode(text) + [1]
    assert len(t5) <= read_weights(wan.t5)["token_embedding.weight"].shape[0]


def test_same_seed_same_tensors_other_seed_other_tensors(root: Path, tmp_path: Path):
    again = write_tiny_checkpoints(tmp_path / "again", seed=0)
    other = write_tiny_checkpoints(tmp_path / "other", seed=1)
    weight_files = [p for p in PUBLISHED_FILES if p.endswith((".safetensors", ".pth", ".bin"))]
    for name in weight_files:
        first, second, third = (read_weights(r / name) for r in (root, again, other))
        assert first.keys() == second.keys() == third.keys()
        for key in first:
            assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), (name, key)
            # Constants: CLIP's log(1 / 0.07) as CLIP initialises it, and the LoRA's alpha (= its rank).
            if key != "log_scale" and not key.endswith(".alpha"):
                assert not torch.equal(first[key], third[key]), (name, key)
    for name in sorted(PUBLISHED_FILES - set(weight_files)):
        assert (root / name).read_bytes() == (again / name).read_bytes(), name


def test_loads_through_every_loader(root: Path):
    wan = WanFiles(root / WAN)
    generator = torch.Generator().manual_seed(0)
    text = TextEncoder.from_checkpoint(wan.t5, wan.t5_tokenizer, text_len=TINY_DIT.text_len, dtype=torch.float32)
    context = text(["a woman talks in a bright studio"])[0]
    image = ImageEncoder.from_checkpoint(wan.clip, dtype=torch.float32)
    clip_fea = image(torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1)
    vae = VideoVAE.from_checkpoint(wan.vae)
    latent = vae.encode(torch.rand(3, 5, 32, 32, generator=generator) * 2 - 1)
    assert latent.shape == (16, 2, 4, 4)
    feature_extractor, audio_encoder = load_wav2vec(root / "chinese-wav2vec2-base")
    wave = np.sin(np.linspace(0, 400, 3200)).astype(np.float32)
    embedding = get_embedding(wave, feature_extractor, audio_encoder)  # [5 frames, layers, channels]
    assert embedding.shape == (5, TINY_DIT.audio_layers, TINY_DIT.audio_channels)

    dit = load_dit(root / WAN, dtype=torch.float32)
    offsets = torch.arange(-(TINY_DIT.audio_window // 2), TINY_DIT.audio_window // 2 + 1)
    windows = (torch.arange(5)[:, None] + offsets).clamp(0, 4)
    y = torch.cat([torch.ones(4, 2, 4, 4), latent])[None]
    with torch.no_grad():
        velocity = dit(
            latent, torch.tensor([500.0]), context, clip_fea, y, embedding[windows][None], torch.ones(3, 4, 4)
        )
    assert velocity.shape == (16, 2, 4, 4) and torch.isfinite(velocity).all()


def test_command_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["wan.testing.tiny", str(tmp_path / "cli"), "--seed", "3"])
    main()
    assert "wrote tiny checkpoints" in capsys.readouterr().out
    assert (tmp_path / "cli" / WAN / SHARD_2).is_file()


def test_fast_lora_is_in_the_published_key_format_and_merges(root: Path):
    from wan.loading.checkpoints import FAST_LORA_DIR_NAME, FAST_LORA_NAME, dit_tensor_reader, load_dit
    from wan.loading.lora import merge_loras

    lora = load_file(root / FAST_LORA_DIR_NAME / FAST_LORA_NAME)
    assert all(k.startswith("diffusion_model.blocks.") for k in lora)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in lora} == {
        "lora_down",
        "lora_up",
        "alpha",
        "diff_b",
    }
    dit = load_dit(root / WAN, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    merged = merge_loras(dit, [(root / FAST_LORA_DIR_NAME / FAST_LORA_NAME, 1.0)], reload=dit_tensor_reader(root / WAN))
    key = "blocks.0.self_attn.q.weight"
    prefix = "diffusion_model.blocks.0.self_attn.q"
    by_hand = (
        before[key].float() + lora[f"{prefix}.lora_up.weight"].float() @ lora[f"{prefix}.lora_down.weight"].float()
    )
    torch.testing.assert_close(dit.state_dict()[key].float(), by_hand.to(torch.bfloat16).float(), rtol=0, atol=0.02)
    merged.restore()  # re-read from the shards: exactly the loaded weights again
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())
