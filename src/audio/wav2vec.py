"""wav2vec2 audio embeddings at the video frame rate (25 fps), computed with the stock transformers Wav2Vec2Model.

MultiTalk's only change to the stock forward: the conv features (50 Hz) are linearly interpolated to one frame per
video frame before the feature projection and the transformer. We run the stock submodules in that order ourselves,
so nothing is stored on the model and one model can serve concurrent calls.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2EncoderStableLayerNorm

from wan.configs import FPS

from .decode import TARGET_SAMPLE_RATE, AudioInputError


def load_wav2vec(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> tuple[Wav2Vec2FeatureExtractor, Wav2Vec2Model]:
    """Feature extractor and encoder (eval mode) from a HF wav2vec2 folder, e.g. `chinese-wav2vec2-base`.

    Accepts a `Wav2Vec2ForPreTraining` dump (as published: `wav2vec2.` key prefix, quantiser and projection keys, which
    are loaded and dropped) or a plain `Wav2Vec2Model` one, in `model.safetensors` or `pytorch_model.bin`, with
    weight-norm stored as `weight_g/weight_v` or `parametrizations.weight.original0/1`. Raises if a weight is missing
    or left over.
    """
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    # A pretraining dump holds the quantiser and projections too: load it as what it is, so that no key is unexpected.
    pretraining = any(key.startswith("quantizer.") for key in _stored_keys(Path(model_dir)))
    model_class = Wav2Vec2ForPreTraining if pretraining else Wav2Vec2Model
    model, info = model_class.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
    )
    # masked_spec_embed only replaces masked frames in training; a dump without it is complete for inference.
    missing = sorted(key for key in info["missing_keys"] if not key.endswith("masked_spec_embed"))
    if missing or info["mismatched_keys"] or info["unexpected_keys"]:
        raise RuntimeError(
            f"wav2vec2 checkpoint in {os.fspath(model_dir)!r} does not fit {model_class.__name__}: missing {missing}, "
            f"unexpected {sorted(info['unexpected_keys'])}, mismatched {sorted(info['mismatched_keys'])}"
        )
    encoder = model.wav2vec2 if pretraining else model
    return feature_extractor, encoder.to(device).eval()


def _stored_keys(model_dir: Path) -> list[str]:
    if (model_dir / "model.safetensors").is_file():
        with safe_open(model_dir / "model.safetensors", framework="pt") as f:
            return list(f.keys())
    # Memory-mapped: the keys without reading the tensors.
    return list(torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True))


def video_frame_count(num_samples: int, sample_rate: int, fps: int = FPS) -> int:
    """Number of video frames the audio covers, truncated as the reference does: int(seconds * fps)."""
    return int(num_samples / sample_rate * fps)


def interpolate_frames(features: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Linear resampling in time of [batch, channels, time] features to `n_frames` (ends aligned)."""
    return F.interpolate(features, size=n_frames, mode="linear", align_corners=True)


def encoder_hidden_states(encoder: Wav2Vec2Model, input_values: torch.Tensor, n_frames: int) -> list[torch.Tensor]:
    """All hidden states [batch, n_frames, hidden] of `encoder` on normalised `input_values` [batch, samples].

    Index 0 is the transformer input (after the positional conv), index i the output of layer i, as
    `output_hidden_states=True` returns them; the conv features are interpolated to `n_frames` first.
    """
    conv_features = interpolate_frames(encoder.feature_extractor(input_values), n_frames)
    hidden, _ = encoder.feature_projection(conv_features.transpose(1, 2))
    transformer = encoder.encoder
    stable_layer_norm = isinstance(transformer, Wav2Vec2EncoderStableLayerNorm)
    hidden = hidden + transformer.pos_conv_embed(hidden)
    if not stable_layer_norm:
        hidden = transformer.layer_norm(hidden)
    hidden = transformer.dropout(hidden)
    states = [hidden]
    for layer in transformer.layers:
        hidden = layer(hidden, attention_mask=None)
        states.append(hidden)
    if stable_layer_norm:
        # Pre-norm encoders report their last state after the final LayerNorm.
        states[-1] = transformer.layer_norm(states[-1])
    return states


def get_embedding(
    speech_array: np.ndarray,
    wav2vec_feature_extractor: Wav2Vec2FeatureExtractor,
    audio_encoder: Wav2Vec2Model,
    sr: int = TARGET_SAMPLE_RATE,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Audio embedding [frames, layers, hidden] (float32, CPU) with frames = int(seconds * 25): the output of every
    transformer layer (not the layer-0 input), one row per video frame. [T, 12, 768] for chinese-wav2vec2-base."""
    n_frames = video_frame_count(len(speech_array), sr)
    if n_frames < 1:
        raise AudioInputError(
            f"audio: {len(speech_array) / sr:.3f} s is shorter than one video frame (1/{FPS} s); use longer audio"
        )
    input_values = np.squeeze(wav2vec_feature_extractor(speech_array, sampling_rate=sr).input_values)
    input_values = torch.from_numpy(input_values).float().to(device=device, dtype=audio_encoder.dtype).unsqueeze(0)
    with torch.no_grad():
        states = encoder_hidden_states(audio_encoder, input_values, n_frames)
    return torch.stack(states[1:], dim=2)[0].float().cpu()
