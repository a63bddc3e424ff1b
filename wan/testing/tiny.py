"""A complete tiny checkpoint set in the published layout, with random weights, for tests and the CPU demo.

    python -m wan.testing.tiny DIR [--seed N]

writes `DIR/Wan2.1-I2V-14B-480P/`, `DIR/MeiGen-MultiTalk/` and `DIR/chinese-wav2vec2-base/` with the published file
and key names, every width and depth shrunk (a few MB in all). The same seed gives the same tensors. The DiT is split
the way the downloads are: base keys in two fp32 shards under Wan's own index, audio keys in `multitalk.safetensors`
under MultiTalk's index (the README merge is then a copy of that index and file into the Wan dir).

The shape tables below are written from the reference's module constructors; with the published sizes they reproduce
`tests/data/keys/*.tsv` exactly (see tests/test_tiny.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import T5Tokenizer, Wav2Vec2Config, Wav2Vec2ForPreTraining

from ..loading.checkpoints import (
    DIT_INDEX_NAME,
    FAST_LORA_DIR_NAME,
    FAST_LORA_NAME,
    INFINITETALK_DIR_NAME,
    INFINITETALK_FILES,
    MULTITALK_DIR_NAME,
    MULTITALK_WEIGHTS_NAME,
    SIZE_BUCKETS_NAME,
    WAN_DIR_NAME,
    WAV2VEC_DIR_NAME,
    WanFiles,
    is_multitalk_key,
)
from ..configs import ASPECT_RATIO_BUCKETS, DiTConfig

Shapes = dict[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class T5Dims:
    """Wan's umT5 encoder (`models_t5_umt5-xxl-enc-bf16.pth`)."""

    vocab_size: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32


@dataclasses.dataclass(frozen=True)
class ClipDims:
    """Wan's XLM-R CLIP: ViT visual tower plus XLM-RoBERTa text tower with a projection head."""

    vision_dim: int
    vision_layers: int
    embed_dim: int
    text_vocab_size: int
    text_dim: int
    text_layers: int
    text_max_len: int
    image_size: int = 224
    patch_size: int = 14
    mlp_ratio: int = 4


@dataclasses.dataclass(frozen=True)
class VaeDims:
    """Wan2.1 VAE (`WanVAE_`); the published one has dim 96, dim_mult (1, 2, 4, 4), 2 res blocks."""

    dim: int
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)


TOKENIZER_VOCAB = 256
TINY_T5 = T5Dims(vocab_size=TOKENIZER_VOCAB, dim=32, ffn_dim=64, num_heads=4, num_layers=2)
# 160 = 2 heads of 80 (ViT-H's head width); 224 px / 14 px patches -> 257 tokens like the real model.
TINY_CLIP = ClipDims(
    vision_dim=160,
    vision_layers=2,
    embed_dim=32,
    text_vocab_size=TOKENIZER_VOCAB + 2,
    text_dim=32,
    text_layers=2,
    text_max_len=34,
)
TINY_VAE = VaeDims(dim=4)
TINY_WAV2VEC = dict(
    architectures=["Wav2Vec2ForPreTraining"],
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[16] * 7,
    conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=False,
    feat_extract_norm="group",
    do_stable_layer_norm=False,
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
    num_codevectors_per_group=8,
    num_codevector_groups=2,
    codevector_dim=16,
    proj_codevector_dim=16,
)
TINY_DIT = DiTConfig(
    dim=64,
    ffn_dim=128,
    num_heads=4,
    num_layers=2,
    text_len=32,
    text_dim=TINY_T5.dim,
    intermediate_dim=8,
    output_dim=32,
    context_tokens=32,
    clip_dim=TINY_CLIP.vision_dim,
    audio_layers=TINY_WAV2VEC["num_hidden_layers"],
    audio_channels=TINY_WAV2VEC["hidden_size"],
)
PREPROCESSOR_CONFIG = {
    "do_normalize": True,
    "feature_extractor_type": "Wav2Vec2FeatureExtractor",
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
    "sampling_rate": 16000,
}
# The fields of the published config.json; the tiny one adds every other DiTConfig field it changes.
PUBLISHED_CONFIG_FIELDS = (
    "dim",
    "eps",
    "ffn_dim",
    "freq_dim",
    "in_dim",
    "model_type",
    "num_heads",
    "num_layers",
    "out_dim",
    "text_len",
)
DIT_SHARDS = 2

TOKENIZER_TEXT = """\
A woman with long dark hair sits in a bright studio and talks calmly to the camera.
Two people talk to each other in a small studio, smiling and nodding as they speak.
A man in a grey suit gives a short speech at a wooden desk beside a window.
The singer closes her eyes and sings a slow song while soft light falls on her face.
An old fisherman tells a story about the sea, the storm and the boat he lost years ago.
Children laugh in the park; a dog runs after a red ball across the green grass.
The reporter stands in front of the city hall and describes the morning traffic.
A teacher explains the lesson, pointing at the board with a piece of white chalk.
Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images.
Overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers.
Poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture.
Messy background, three legs, many people in the background, walking backwards.
The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.
Video frames move at twenty five frames per second, and the audio is sampled at sixteen kilohertz.
She whispers, he shouts, they argue and then they agree; everyone is happy in the end.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 25 81 480 720 1000 2025.
一个女人在明亮的工作室里对着镜头平静地说话。两个人在小房间里交谈。
"""


# --- shape tables -------------------------------------------------------------------------------------------------


def dit_shapes(config: DiTConfig) -> Shapes:
    """The MultiTalk `WanModel` state dict, in the published key order."""
    dim, ffn = config.dim, config.ffn_dim
    audio_in = config.audio_layers * config.audio_channels
    shapes: Shapes = {
        "patch_embedding.weight": (dim, config.in_dim, *config.patch_size),
        "patch_embedding.bias": (dim,),
        **_linear("text_embedding.0", config.text_dim, dim),
        **_linear("text_embedding.2", dim, dim),
        **_linear("time_embedding.0", config.freq_dim, dim),
        **_linear("time_embedding.2", dim, dim),
        **_linear("time_projection.1", dim, 6 * dim),
    }
    for i in range(config.num_layers):
        p = f"blocks.{i}."
        shapes[p + "modulation"] = (1, 6, dim)
        for name in ("q", "k", "v", "o"):
            shapes.update(_linear(p + "self_attn." + name, dim, dim))
        if config.qk_norm:
            shapes[p + "self_attn.norm_q.weight"] = shapes[p + "self_attn.norm_k.weight"] = (dim,)
        if config.cross_attn_norm:
            shapes[p + "norm3.weight"] = shapes[p + "norm3.bias"] = (dim,)
        for name in ("q", "k", "v", "o"):
            shapes.update(_linear(p + "cross_attn." + name, dim, dim))
        if config.qk_norm:
            shapes[p + "cross_attn.norm_q.weight"] = shapes[p + "cross_attn.norm_k.weight"] = (dim,)
        shapes.update(_linear(p + "cross_attn.k_img", dim, dim))
        shapes.update(_linear(p + "cross_attn.v_img", dim, dim))
        if config.qk_norm:
            shapes[p + "cross_attn.norm_k_img.weight"] = (dim,)
        shapes.update(_linear(p + "ffn.0", dim, ffn))
        shapes.update(_linear(p + "ffn.2", ffn, dim))
        shapes.update(_linear(p + "audio_cross_attn.q_linear", dim, dim))
        shapes.update(_linear(p + "audio_cross_attn.proj", dim, dim))
        shapes.update(_linear(p + "audio_cross_attn.kv_linear", config.output_dim, 2 * dim))
        if config.norm_input_visual:
            shapes[p + "norm_x.weight"] = shapes[p + "norm_x.bias"] = (dim,)
    shapes["head.modulation"] = (1, 2, dim)
    shapes.update(_linear("head.head", dim, math.prod(config.patch_size) * config.out_dim))
    shapes.update(_layer_norm("img_emb.proj.0", config.clip_dim))
    shapes.update(_linear("img_emb.proj.1", config.clip_dim, config.clip_dim))
    shapes.update(_linear("img_emb.proj.3", config.clip_dim, dim))
    shapes.update(_layer_norm("img_emb.proj.4", dim))
    shapes.update(_linear("audio_proj.proj1", config.audio_window * audio_in, config.intermediate_dim))
    window_vf = config.audio_window + config.vae_scale - 1
    shapes.update(_linear("audio_proj.proj1_vf", window_vf * audio_in, config.intermediate_dim))
    shapes.update(_linear("audio_proj.proj2", config.intermediate_dim, config.intermediate_dim))
    shapes.update(_linear("audio_proj.proj3", config.intermediate_dim, config.context_tokens * config.output_dim))
    if config.norm_output_audio:
        shapes.update(_layer_norm("audio_proj.norm", config.output_dim))
    return shapes


def t5_shapes(d: T5Dims) -> Shapes:
    shapes: Shapes = {"token_embedding.weight": (d.vocab_size, d.dim)}
    for i in range(d.num_layers):
        p = f"blocks.{i}."
        shapes[p + "norm1.weight"] = (d.dim,)
        for name in ("q", "k", "v", "o"):
            shapes[p + f"attn.{name}.weight"] = (d.dim, d.dim)
        shapes[p + "norm2.weight"] = (d.dim,)
        shapes[p + "ffn.gate.0.weight"] = shapes[p + "ffn.fc1.weight"] = (d.ffn_dim, d.dim)
        shapes[p + "ffn.fc2.weight"] = (d.dim, d.ffn_dim)
        shapes[p + "pos_embedding.embedding.weight"] = (d.num_buckets, d.num_heads)
    shapes["norm.weight"] = (d.dim,)
    return shapes


def clip_shapes(d: ClipDims) -> Shapes:
    w, t = d.vision_dim, d.text_dim
    tokens = (d.image_size // d.patch_size) ** 2 + 1
    shapes: Shapes = {
        "log_scale": (),
        "visual.cls_embedding": (1, 1, w),
        "visual.pos_embedding": (1, tokens, w),
        "visual.head": (w, d.embed_dim),
        "visual.patch_embedding.weight": (w, 3, d.patch_size, d.patch_size),
        **_layer_norm("visual.pre_norm", w),
    }
    for i in range(d.vision_layers):
        p = f"visual.transformer.{i}."
        shapes.update(_layer_norm(p + "norm1", w))
        shapes.update(_linear(p + "attn.to_qkv", w, 3 * w))
        shapes.update(_linear(p + "attn.proj", w, w))
        shapes.update(_layer_norm(p + "norm2", w))
        shapes.update(_linear(p + "mlp.0", w, d.mlp_ratio * w))
        shapes.update(_linear(p + "mlp.2", d.mlp_ratio * w, w))
    shapes.update(_layer_norm("visual.post_norm", w))
    shapes["textual.token_embedding.weight"] = (d.text_vocab_size, t)
    shapes["textual.type_embedding.weight"] = (1, t)
    shapes["textual.pos_embedding.weight"] = (d.text_max_len, t)
    for i in range(d.text_layers):
        p = f"textual.blocks.{i}."
        for name in ("q", "k", "v", "o"):
            shapes.update(_linear(p + f"attn.{name}", t, t))
        shapes.update(_layer_norm(p + "norm1", t))
        shapes.update(_linear(p + "ffn.0", t, 4 * t))
        shapes.update(_linear(p + "ffn.2", 4 * t, t))
        shapes.update(_layer_norm(p + "norm2", t))
    shapes.update(_layer_norm("textual.norm", t))
    mid = (t + d.embed_dim) // 2
    shapes["textual.head.0.weight"] = (mid, t)
    shapes["textual.head.2.weight"] = (d.embed_dim, mid)
    return shapes


def vae_shapes(d: VaeDims) -> Shapes:
    """`WanVAE_`: encoder (to mean and log-variance), the two 1x1x1 convs, decoder."""
    mult = d.dim_mult
    shapes: Shapes = {}
    dims = [d.dim * m for m in (1, *mult)]
    shapes.update(_conv3d("encoder.conv1", 3, dims[0], (3, 3, 3)))
    n = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(d.num_res_blocks):
            shapes.update(_residual_block(f"encoder.downsamples.{n}", c_in, c_out))
            c_in, n = c_out, n + 1
        if i != len(mult) - 1:
            shapes.update(_resample(f"encoder.downsamples.{n}", c_out, up=False, temporal=d.temporal_downsample[i]))
            n += 1
    shapes.update(_middle("encoder.middle", dims[-1]))
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    shapes.update(_conv3d("encoder.head.2", dims[-1], 2 * d.z_dim, (3, 3, 3)))
    shapes.update(_conv3d("conv1", 2 * d.z_dim, 2 * d.z_dim, (1, 1, 1)))
    shapes.update(_conv3d("conv2", d.z_dim, d.z_dim, (1, 1, 1)))

    dims = [d.dim * m for m in (mult[-1], *mult[::-1])]
    temporal_upsample = d.temporal_downsample[::-1]
    shapes.update(_conv3d("decoder.conv1", d.z_dim, dims[0], (3, 3, 3)))
    shapes.update(_middle("decoder.middle", dims[0]))
    n = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            c_in //= 2  # the previous upsample halved the channels
        for _ in range(d.num_res_blocks + 1):
            shapes.update(_residual_block(f"decoder.upsamples.{n}", c_in, c_out))
            c_in, n = c_out, n + 1
        if i != len(mult) - 1:
            shapes.update(_resample(f"decoder.upsamples.{n}", c_out, up=True, temporal=temporal_upsample[i]))
            n += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    shapes.update(_conv3d("decoder.head.2", dims[-1], 3, (3, 3, 3)))
    return shapes


def _linear(prefix: str, c_in: int, c_out: int) -> Shapes:
    return {prefix + ".weight": (c_out, c_in), prefix + ".bias": (c_out,)}


def _layer_norm(prefix: str, dim: int) -> Shapes:
    return {prefix + ".weight": (dim,), prefix + ".bias": (dim,)}


def _conv3d(prefix: str, c_in: int, c_out: int, kernel: tuple[int, ...]) -> Shapes:
    return {prefix + ".weight": (c_out, c_in, *kernel), prefix + ".bias": (c_out,)}


def _residual_block(prefix: str, c_in: int, c_out: int) -> Shapes:
    shapes = {f"{prefix}.residual.0.gamma": (c_in, 1, 1, 1)}
    shapes.update(_conv3d(f"{prefix}.residual.2", c_in, c_out, (3, 3, 3)))
    shapes[f"{prefix}.residual.3.gamma"] = (c_out, 1, 1, 1)
    shapes.update(_conv3d(f"{prefix}.residual.6", c_out, c_out, (3, 3, 3)))
    if c_in != c_out:
        shapes.update(_conv3d(f"{prefix}.shortcut", c_in, c_out, (1, 1, 1)))
    return shapes


def _resample(prefix: str, dim: int, *, up: bool, temporal: bool) -> Shapes:
    """Spatial 3x3 conv (halving the channels when upsampling), plus a temporal conv for the 3-D modes."""
    shapes = _conv3d(f"{prefix}.resample.1", dim, dim // 2 if up else dim, (3, 3))
    if temporal:
        shapes.update(_conv3d(f"{prefix}.time_conv", dim, 2 * dim if up else dim, (3, 1, 1)))
    return shapes


def _middle(prefix: str, dim: int) -> Shapes:
    shapes = _residual_block(f"{prefix}.0", dim, dim)
    shapes[f"{prefix}.1.norm.gamma"] = (dim, 1, 1)
    shapes.update(_conv3d(f"{prefix}.1.to_qkv", dim, 3 * dim, (1, 1)))
    shapes.update(_conv3d(f"{prefix}.1.proj", dim, dim, (1, 1)))
    shapes.update(_residual_block(f"{prefix}.2", dim, dim))
    return shapes


# --- random weights -----------------------------------------------------------------------------------------------

_NORM_WEIGHT = re.compile(r"(norm[^.]*\.weight|\.gamma|^img_emb\.proj\.[04]\.weight)$")


def random_weights(shapes: Shapes, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Small random tensors: norm scales 1 + N(0, 0.02), everything else N(0, 0.02); drawn in key order."""
    tensors = {}
    for key, shape in shapes.items():
        values = torch.randn(shape, generator=generator, device=generator.device) * 0.02
        if _NORM_WEIGHT.search(key):
            values += 1.0
        elif key == "log_scale":
            values = torch.tensor(math.log(1 / 0.07))
        tensors[key] = values.to(dtype)
    return tensors


def _generator(seed: int, component: int) -> torch.Generator:
    # One stream per component, so resizing one file leaves the others' tensors unchanged.
    return torch.Generator().manual_seed(seed * 101 + component)


# --- writers ------------------------------------------------------------------------------------------------------


def write_tiny_checkpoints(root: Path, seed: int = 0) -> Path:
    """Write the tiny set under `root` (created if needed) and return `root`."""
    root = Path(root)
    wan = WanFiles(root / WAN_DIR_NAME)
    wan.root.mkdir(parents=True, exist_ok=True)
    write_dit(wan.root, root / MULTITALK_DIR_NAME, TINY_DIT, _generator(seed, 0))
    torch.save(random_weights(t5_shapes(TINY_T5), _generator(seed, 1), torch.bfloat16), wan.t5)
    torch.save(random_weights(clip_shapes(TINY_CLIP), _generator(seed, 2)), wan.clip)
    torch.save(random_weights(vae_shapes(TINY_VAE), _generator(seed, 3)), wan.vae)
    write_t5_tokenizer(wan.t5_tokenizer)
    write_wav2vec(root / WAV2VEC_DIR_NAME, _generator(seed, 4))
    write_fast_lora(root / FAST_LORA_DIR_NAME / FAST_LORA_NAME, TINY_DIT, _generator(seed, 5))
    for index, relative in enumerate(INFINITETALK_FILES.values()):
        write_audio_layers(root / INFINITETALK_DIR_NAME / relative, TINY_DIT, _generator(seed, 6 + index))
    _write_json(root / SIZE_BUCKETS_NAME, tiny_size_buckets())
    return root


def tiny_size_buckets(shrink: int = 14) -> dict[str, dict[str, list[int]]]:
    """The published bucket tables shrunk `shrink` times (sides multiples of 16, the VAE stride times the patch, and at
    least 32: two tokens), so that the tiny set serves thumbnails and any request on it finishes in seconds on a CPU."""
    return {
        table: {ratio: [max(32, 16 * round(side / shrink / 16)) for side in size] for ratio, size in buckets.items()}
        for table, buckets in ASPECT_RATIO_BUCKETS.items()
    }


def write_fast_lora(path: Path, config: DiTConfig, generator: torch.Generator, rank: int = 4) -> None:
    """A step-distillation LoRA in the published lightx2v layout: `diffusion_model.<module>.lora_down/lora_up/alpha`
    on every attention and FFN linear of every block, plus `diff_b` bias offsets."""
    modules = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o")] + ["ffn.0", "ffn.2"]
    shapes = dit_shapes(config)
    tensors = {}
    for block in range(config.num_layers):
        for module in modules:
            prefix = f"blocks.{block}.{module}"
            out_features, in_features = shapes[f"{prefix}.weight"]
            key = f"diffusion_model.{prefix}"
            tensors[f"{key}.lora_down.weight"] = 0.1 * torch.randn(rank, in_features, generator=generator)
            tensors[f"{key}.lora_up.weight"] = 0.1 * torch.randn(out_features, rank, generator=generator)
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
            tensors[f"{key}.diff_b"] = 0.01 * torch.randn(out_features, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def write_dit(
    wan_dir: Path,
    multitalk_dir: Path,
    config: DiTConfig,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    num_shards: int = DIT_SHARDS,
) -> None:
    """config.json + base shards + Wan's index in `wan_dir`; audio weights + MultiTalk's index in `multitalk_dir`.
    The tensors are drawn on the generator's device (a GPU for the published sizes) and saved shard by shard."""
    tensors = random_weights(dit_shapes(config), generator, dtype)
    base = {k: v for k, v in tensors.items() if not is_multitalk_key(k)}
    audio = {k: v for k, v in tensors.items() if is_multitalk_key(k)}

    shard_names = [f"diffusion_pytorch_model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]
    total = sum(_nbytes(t) for t in base.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in shard_names]
    done = 0
    for key, tensor in base.items():
        shards[min(num_shards - 1, done * num_shards // total)][key] = tensor
        done += _nbytes(tensor)
    for name, shard in zip(shard_names, shards):
        save_file({k: v.cpu() for k, v in shard.items()}, wan_dir / name, metadata={"format": "pt"})
    base_map = {key: name for name, shard in zip(shard_names, shards) for key in shard}
    _write_index(wan_dir / DIT_INDEX_NAME, base_map, total)

    multitalk_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in audio.items()}, multitalk_dir / MULTITALK_WEIGHTS_NAME, metadata={"format": "pt"})
    audio_map = {key: MULTITALK_WEIGHTS_NAME for key in audio}
    audio_total = total + sum(_nbytes(t) for t in audio.values())
    _write_index(multitalk_dir / DIT_INDEX_NAME, {**base_map, **audio_map}, audio_total)
    _write_json(wan_dir / "config.json", dit_config_json(config))


def write_audio_layers(path: Path, config: DiTConfig, generator: torch.Generator) -> None:
    """Another audio-layer set (InfiniteTalk's files): the DiT's audio keys alone, as published."""
    shapes = {key: shape for key, shape in dit_shapes(config).items() if is_multitalk_key(key)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(shapes, generator), path, metadata={"format": "pt"})


def dit_config_json(config: DiTConfig) -> dict:
    """The published config.json's fields, plus every other DiTConfig field whose value differs from the default."""
    values = dataclasses.asdict(config)
    defaults = dataclasses.asdict(DiTConfig())
    out = {"_class_name": "WanModel", "_diffusers_version": "0.30.0"}
    for key, value in values.items():
        if key in PUBLISHED_CONFIG_FIELDS or value != defaults[key]:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def write_t5_tokenizer(folder: Path) -> None:
    """umT5-style sentencepiece unigram model (pad 0, eos 1, unk 2) and the tokenizers-backed T5 tokenizer."""
    model = _train_sentencepiece(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    processor = spm.SentencePieceProcessor(model_proto=model)
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    _save_tokenizer(folder, "spiece.model", model, T5Tokenizer(vocab=vocab, extra_ids=0))


def _train_sentencepiece(**special_ids: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT.splitlines()),
        model_writer=model,
        vocab_size=TOKENIZER_VOCAB,
        model_type="unigram",
        character_coverage=1.0,
        # Identity normalisation keeps the tokenizer.json (built without protobuf) equal to the sentencepiece model.
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
        **special_ids,
    )
    return model.getvalue()


def _save_tokenizer(folder: Path, model_name: str, model: bytes, tokenizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    (folder / model_name).write_bytes(model)
    special = {
        name: str(getattr(tokenizer, name))
        for name in tokenizer.SPECIAL_TOKENS_ATTRIBUTES
        if name != "additional_special_tokens" and getattr(tokenizer, name, None) is not None
    }
    _write_json(folder / "special_tokens_map.json", special)


def write_wav2vec(folder: Path, generator: torch.Generator, config: dict = TINY_WAV2VEC) -> None:
    """A `Wav2Vec2ForPreTraining` dump like chinese-wav2vec2-base: legacy weight-norm names, .bin and .safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2Config(**config)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Wav2Vec2ForPreTraining(config).state_dict().items()}
    # The published files predate torch's parametrized weight norm: magnitude and direction are weight_g / weight_v.
    shapes = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in shapes.items()
    }
    tensors = random_weights(shapes, generator)
    for key in [k for k in tensors if k.endswith("weight_v")]:
        # A magnitude equal to the direction's norm (over all dims but the kernel axis) makes the conv weight = v.
        tensors[key[:-1] + "g"] = tensors[key].norm(dim=(0, 1), keepdim=True)
    config.to_json_file(folder / "config.json")
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    torch.save(tensors, folder / "pytorch_model.bin")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    _write_json(path, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="output folder (created if needed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = write_tiny_checkpoints(args.dir, args.seed)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote tiny checkpoints to {root} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
