"""Golden checks of the three encoders, each loaded from a Wan-format `.pth` through its real `from_checkpoint`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from support.golden import GoldenCase, cases_with_prefix, load_case
from wan.configs import VAE_LATENT_MEAN, VAE_LATENT_STD
from wan.encoders.image import ImageEncoder
from wan.encoders.text import TextEncoder
from wan.encoders.vae import VideoVAE

pytestmark = pytest.mark.golden

PAD_ID, EOS_ID = 0, 1  # as the t5 cases' `ids` description states


def write_pth(case: GoldenCase, folder: Path) -> Path:
    """The case's Wan-format weights as the published files store them: a torch.save'd state dict."""
    path = folder / f"{case.name}.pth"
    # Some cases describe the file after its name ("weights.safetensors (only the visual.* keys ...)").
    torch.save(load_file(case.folder / case.meta["files"]["weights"].split()[0]), path)
    return path


def write_id_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A word-level tokenizer where word `t{i}` is token i, with umT5's pad 0 and an appended `</s>` 1."""
    words = {f"t{i}": i for i in range(vocab_size) if i not in (PAD_ID, EOS_ID)}
    vocab = words | {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": vocab_size}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    special = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case_name", cases_with_prefix("t5") or ["t5"])
def test_golden_t5(case_name: str, tmp_path: Path) -> None:
    case = load_case(case_name)
    ids, mask = case.inputs()["ids"], case.inputs()["mask"]
    tokenizer_dir = write_id_tokenizer(tmp_path / "tokenizer", case.config["vocab_size"])
    encoder = TextEncoder.from_checkpoint(
        write_pth(case, tmp_path), tokenizer_dir, text_len=ids.shape[1], dtype=torch.float32
    )
    config = encoder.model.config
    assert (config.d_model, config.num_heads, config.d_ff) == (
        case.config["dim"],
        case.config["num_heads"],
        case.config["dim_ffn"],
    )
    assert (config.num_layers, config.relative_attention_num_buckets) == (
        case.config["encoder_layers"],
        case.config["num_buckets"],
    )

    outputs = case.outputs()
    case.assert_close("encoder_out", encoder.hidden_states(ids, mask))
    # The trimmed outputs are rows of encoder_out, so they share its tolerance.
    for i, tensor in enumerate(encoder.encode_ids(ids, mask)):
        case.assert_close("encoder_out", tensor, outputs[f"trimmed_prompt{i}"])

    positions = torch.arange(ids.shape[1])
    attention = encoder.model.encoder.block[0].layer[0].SelfAttention
    buckets = attention._relative_position_bucket(positions[None] - positions[:, None])  # [q, k] for k - q
    case.assert_close("relative_position_bucket", buckets)

    # The same prompts as text: one padded batch through the tokenizer, each output cut to its own length.
    lengths = mask.sum(dim=1).tolist()
    assert all(ids[i, n - 1] == EOS_ID for i, n in enumerate(lengths))
    prompts = ["  ".join(f"t{t}" for t in ids[i, : n - 1].tolist()) for i, n in enumerate(lengths)]
    token_ids, token_mask = encoder.tokenize(prompts)
    assert torch.equal(token_ids, ids) and torch.equal(token_mask, mask)
    for i, tensor in enumerate(encoder(prompts)):
        case.assert_close("encoder_out", tensor, outputs[f"trimmed_prompt{i}"])


@pytest.mark.parametrize("case_name", cases_with_prefix("clip") or ["clip_visual"])
def test_golden_clip_visual(case_name: str, tmp_path: Path) -> None:
    case = load_case(case_name)
    head_dim = case.config["vision_dim"] // case.config["vision_heads"]
    encoder = ImageEncoder.from_checkpoint(write_pth(case, tmp_path), head_dim=head_dim, dtype=torch.float32)
    assert encoder.model.config.num_hidden_layers == case.config["vision_layers"]
    assert encoder.image_size == case.config["image_size"]

    cond_image = case.inputs()["cond_image"]
    case.assert_close("preprocessed", encoder.preprocess(cond_image[:, :, -1:]))
    case.assert_close("clip_context", encoder(cond_image[:, :, -1:]))
    case.assert_close("clip_context", encoder(cond_image[:, :, -1]))  # a [1, 3, H, W] frame is the same image


@pytest.mark.parametrize("case_name", cases_with_prefix("vae") or ["vae"])
def test_golden_vae(case_name: str, tmp_path: Path) -> None:
    case = load_case(case_name)
    facts = case.meta["wrapper_facts"]
    # The latent scaling is the reference's constant, not part of the checkpoint.
    assert torch.equal(torch.tensor(facts["mean"]), torch.tensor(VAE_LATENT_MEAN))
    assert torch.equal(torch.tensor(facts["std"]), torch.tensor(VAE_LATENT_STD))
    vae = VideoVAE.from_checkpoint(write_pth(case, tmp_path))
    config = vae.model.config
    assert (config.base_dim, config.z_dim, config.num_res_blocks) == (
        case.config["dim"],
        case.config["z_dim"],
        case.config["num_res_blocks"],
    )
    assert list(config.dim_mult) == case.config["dim_mult"]
    assert list(config.temperal_downsample) == case.config["temperal_downsample"]

    inputs, outputs = case.inputs(), case.outputs()
    latent = vae.encode(inputs["video"])
    case.assert_close("encode_latent", latent)
    case.assert_close("decode_video", vae.decode(inputs["latent"]))
    if "roundtrip_decode_of_encode" in outputs:
        case.assert_close("roundtrip_decode_of_encode", vae.decode(latent))
    # The GPU's layout (`place_vae`): channels-last convolutions compute the same video.
    vae.channels_last()
    conv = vae.model.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    case.assert_close("encode_latent", vae.encode(inputs["video"]))
    case.assert_close("decode_video", vae.decode(inputs["latent"]))
