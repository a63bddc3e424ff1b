"""umT5-XXL text encoder: Wan's `models_t5_umt5-xxl-enc-bf16.pth` in `transformers.UMT5EncoderModel`."""

from __future__ import annotations

import html
import re
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .state_dict import assign_checked, check_keys, derive_config, read_state_dict

# Both fixed in umT5 rather than stored in the checkpoint.
T5_MAX_DISTANCE = 128
T5_EPS = 1e-6

_T5_BLOCK_KEYS = {  # UMT5 key inside `encoder.block.{i}.` -> Wan key inside `blocks.{i}.`
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # the GELU branch
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",  # the linear branch
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def umt5_config(state_dict: dict[str, torch.Tensor], attn_implementation: str = "sdpa") -> UMT5Config:
    """The encoder's config, read off the tensor shapes of a Wan-format state dict."""
    if "blocks.0.pos_embedding.embedding.weight" not in state_dict:
        raise ValueError("expected umT5 per-block relative position tables (blocks.0.pos_embedding.embedding.weight)")
    vocab_size, d_model = state_dict["token_embedding.weight"].shape
    num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    num_layers = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=state_dict["blocks.0.attn.q.weight"].shape[0] // num_heads,
        d_ff=state_dict["blocks.0.ffn.fc1.weight"].shape[0],
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",  # gelu_new: the tanh GELU Wan uses
        layer_norm_epsilon=T5_EPS,
        dropout_rate=0.0,
        use_cache=False,
        attn_implementation=attn_implementation,
    )


def wan_t5_key(key: str) -> str:
    """The Wan checkpoint key that holds UMT5EncoderModel's `key`."""
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    _, _, index, rest = key.split(".", 3)  # encoder.block.{i}.{rest}
    return f"blocks.{index}.{_T5_BLOCK_KEYS[rest]}"


def load_umt5(
    state_dict: dict[str, torch.Tensor], path: Path, *, dtype: torch.dtype, device: str | torch.device
) -> UMT5EncoderModel:
    """UMT5EncoderModel holding a Wan-format state dict read from `path` (named in errors)."""
    config = derive_config(umt5_config, state_dict, path)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    sources = {key: wan_t5_key(key) for key in model.state_dict()}
    check_keys(set(state_dict), set(sources.values()), path)
    # One cast per file tensor, so the tied embedding stays one tensor.
    cast = {key: state_dict[key].to(device=device, dtype=dtype) for key in set(sources.values())}
    assign_checked(model, {key: cast[file_key] for key, file_key in sources.items()}, sources, path)
    model.tie_weights()
    return model


def clean_prompt(text: str) -> str:
    """The reference's cleaning: ftfy, HTML unescape twice, strip, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Prompts -> umT5 embeddings, one `[L_i, d_model]` tensor per prompt, cut to its real token count."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = 512):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Path,
        tokenizer_dir: Path,
        *,
        text_len: int = 512,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> "TextEncoder":
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
        model = load_umt5(read_state_dict(checkpoint), checkpoint, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model, tokenizer, text_len)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, `[B, text_len]` each."""
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens.input_ids, tokens.attention_mask

    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output `[B, L, d_model]` of a padded batch, padded positions included."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [u[:n] for u, n in zip(self.hidden_states(ids, mask), lengths)]

    def __call__(self, prompts: list[str]) -> list[torch.Tensor]:
        return self.encode_ids(*self.tokenize(prompts))
