"""Golden check of the wav2vec2 audio embedding: normalisation, conv features, 25 fps interpolation, layer stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.audio.wav2vec import encoder_hidden_states, get_embedding, interpolate_frames, load_wav2vec, video_frame_count
from support.golden import cases_with_prefix, load_case

pytestmark = pytest.mark.golden

CASES = cases_with_prefix("wav2vec2_")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case_name", CASES)
def test_golden_wav2vec2_embedding(case_name: str, attn_implementation: str) -> None:
    case = load_case(case_name)
    # case.json: "hf_model_dir": "hf_model/ (config.json + ...)"
    model_dir = case.folder / case.meta["files"].get("hf_model_dir", "hf_model").split()[0]
    feature_extractor, encoder = load_wav2vec(model_dir, attn_implementation=attn_implementation)
    assert encoder.config._attn_implementation == attn_implementation
    waveform = case.inputs()["waveform"].numpy()
    sample_rate = feature_extractor.sampling_rate
    expected = case.outputs()

    input_values = np.squeeze(feature_extractor(waveform, sampling_rate=sample_rate).input_values)
    case.assert_close("input_values", torch.from_numpy(input_values))

    n_frames = video_frame_count(len(waveform), sample_rate)
    batch = torch.from_numpy(input_values)[None]
    with torch.no_grad():
        conv_features = encoder.feature_extractor(batch)
        states = encoder_hidden_states(encoder, batch, n_frames)
    case.assert_close("conv_features", conv_features[0].T)
    case.assert_close("interp_features", interpolate_frames(conv_features, n_frames)[0].T)
    case.assert_close("all_hidden_states", torch.stack(states)[:, 0])

    embedding = get_embedding(waveform, feature_extractor, encoder, sr=sample_rate)
    assert embedding.dtype == torch.float32
    assert embedding.shape[0] == expected["audio_emb"].shape[0] == n_frames
    case.assert_close("audio_emb", embedding)
