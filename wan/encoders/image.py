"""CLIP ViT-H/14 image features: the visual tower of Wan's XLM-R CLIP `.pth` in `transformers.CLIPVisionModel`.

The features are the penultimate block's hidden states (the reference's `use_31_block`), without post-norm or head,
of the frame squashed to the model's square size exactly as the reference does it (never `CLIPImageProcessor`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..configs import CLIP_MEAN, CLIP_STD
from .state_dict import assign_checked, check_keys, derive_config, read_state_dict

CLIP_HEAD_DIM = 80  # ViT-H/14: 16 heads of 80
CLIP_EPS = 1e-5

_CLIP_LAYER_KEYS = {  # CLIPVisionModel key inside `encoder.layers.{i}.` -> Wan key inside `visual.transformer.{i}.`
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.2",
}
_CLIP_KEYS = {
    "embeddings.patch_embedding.weight": "visual.patch_embedding.weight",
    "embeddings.class_embedding": "visual.cls_embedding",
    "embeddings.position_embedding.weight": "visual.pos_embedding",
    "pre_layrnorm": "visual.pre_norm",
    "post_layernorm": "visual.post_norm",
}
_QKV = ("q_proj", "k_proj", "v_proj")  # Wan's fused to_qkv rows, in this order


def clip_vision_config(state_dict: dict[str, torch.Tensor], head_dim: int = CLIP_HEAD_DIM) -> CLIPVisionConfig:
    """The visual tower's config, read off the tensor shapes of a Wan-format state dict."""
    width, channels, _, patch_size = state_dict["visual.patch_embedding.weight"].shape
    grid = math.isqrt(state_dict["visual.pos_embedding"].shape[1] - 1)
    if width % head_dim:
        raise ValueError(f"CLIP width {width} is not a multiple of head_dim {head_dim}")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=state_dict["visual.transformer.0.mlp.0.weight"].shape[0],
        num_hidden_layers=len({k.split(".")[2] for k in state_dict if k.startswith("visual.transformer.")}),
        num_attention_heads=width // head_dim,
        num_channels=channels,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",  # exact erf GELU
        layer_norm_eps=CLIP_EPS,
        attention_dropout=0.0,
        attn_implementation="sdpa",
    )


def wan_clip_key(key: str) -> tuple[str, int | None]:
    """The Wan key holding CLIPVisionModel's `key`, and which third of it along dim 0 (for q/k/v), if any."""
    module, _, leaf = key.rpartition(".")
    if key in _CLIP_KEYS:
        return _CLIP_KEYS[key], None
    if module in _CLIP_KEYS:
        return f"{_CLIP_KEYS[module]}.{leaf}", None
    _, _, index, layer_module = module.split(".", 3)  # encoder.layers.{i}.{layer_module}
    prefix = f"visual.transformer.{index}"
    projection = layer_module.removeprefix("self_attn.")
    if projection in _QKV:
        return f"{prefix}.attn.to_qkv.{leaf}", _QKV.index(projection)
    return f"{prefix}.{_CLIP_LAYER_KEYS[layer_module]}.{leaf}", None


def is_ignored(key: str) -> bool:
    """In the published file but not part of the visual features: the text tower, the logit scale, the projection."""
    return key.startswith("textual.") or key in ("log_scale", "visual.head")


def _model_layout(tensor: torch.Tensor, source: str, chunk: int | None, shape: torch.Size, path: Path) -> torch.Tensor:
    """Wan's tensor in the model's layout: class/position embeddings lose Wan's leading batch dims, q/k/v are split."""
    if chunk is not None:
        file_shape = (3 * shape[0], *shape[1:])
    else:
        file_shape = {"visual.cls_embedding": (1, 1, *shape), "visual.pos_embedding": (1, *shape)}.get(source, shape)
    if tensor.shape != file_shape:
        raise ValueError(f"checkpoint {path}: {source} has shape {list(tensor.shape)}, expected {list(file_shape)}")
    return tensor.reshape(shape) if chunk is None else tensor.chunk(3, dim=0)[chunk]


def load_clip_vision(
    state_dict: dict[str, torch.Tensor],
    path: Path,
    *,
    head_dim: int = CLIP_HEAD_DIM,
    dtype: torch.dtype,
    device: str | torch.device,
) -> CLIPVisionModel:
    """CLIPVisionModel holding the visual tower of a Wan-format state dict read from `path` (named in errors)."""
    config = derive_config(lambda sd: clip_vision_config(sd, head_dim), state_dict, path)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    expected = model.state_dict()
    # transformers 5 dropped the `vision_model.` prefix; older releases still have it.
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in expected) else ""
    sources = {key: wan_clip_key(key.removeprefix(prefix)) for key in expected}
    check_keys(set(state_dict), {source for source, _ in sources.values()}, path, ignored=is_ignored)
    tensors = {
        key: _model_layout(state_dict[source], source, chunk, expected[key].shape, path).to(device, dtype)
        for key, (source, chunk) in sources.items()
    }
    assign_checked(model, tensors, {key: source for key, (source, _) in sources.items()}, path)
    # A non-persistent buffer is in no state dict, so loading left it on the meta device.
    embeddings = model.get_submodule(f"{prefix}embeddings")
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand(1, -1)
    return model


class ImageEncoder:
    """Condition frame in [-1, 1] -> CLIP context `[1, 257, width]` (ViT-H/14: width 1280)."""

    def __init__(self, model: CLIPVisionModel):
        self.model = model.eval().requires_grad_(False)
        self.image_size = model.config.image_size
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Path,
        *,
        head_dim: int = CLIP_HEAD_DIM,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu",
    ) -> "ImageEncoder":
        model = load_clip_vision(read_state_dict(checkpoint), checkpoint, head_dim=head_dim, dtype=dtype, device=device)
        return cls(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "ImageEncoder":
        self.model.to(device)
        return self

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """`[B, 3, T, H, W]` or `[B, 3, H, W]` in [-1, 1] -> normalised `[B*T, 3, size, size]` float32."""
        if frames.dim() == 5:
            frames = frames.transpose(1, 2).flatten(0, 1)  # each frame an image, batch-major as the reference
        size = (self.image_size, self.image_size)
        pixels = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False)
        pixels = pixels.mul(0.5).add(0.5)
        return (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(frames.to(self.device)).to(self.model.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
