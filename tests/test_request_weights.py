"""TeaCache's steps are predicted for the weights a request will run with: a LoRA that changes the time embedding
changes the prediction, the prediction equals what TeaCache decides once the LoRA is merged, and predicting touches
none of the DiT's weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wan import GuidanceOptions, SamplingOptions, load_pipeline
from wan.model.dit import TIME_EMBEDDING_PREFIXES

OPTIONS = SamplingOptions(
    size_bucket={"1.00": [32, 32]}, frame_num=5, steps=24, shift=5.0, seed=1,
    guidance=GuidanceOptions(use_teacache=True, teacache_thresh=3e5),
)  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tiny_weights):
    return load_pipeline(
        tiny_weights / "Wan2.1-I2V-14B-480P", tiny_weights / "MeiGen-MultiTalk", device="cpu", dtype=torch.float32
    )


def time_lora(pipeline, path, strength: float) -> list[tuple[str, float]]:
    """A LoRA on the time projection (as Kijai's extractor writes one for every 2-D weight): it moves e0."""
    weight = pipeline.dit.module.time_projection[1].weight
    generator = torch.Generator().manual_seed(3)
    save_file(
        {
            "diffusion_model.time_projection.1.lora_up.weight": strength * torch.randn(weight.shape[0], 2, generator=generator),
            "diffusion_model.time_projection.1.lora_down.weight": torch.randn(2, weight.shape[1], generator=generator),
        },
        path,
    )  # fmt: skip
    return [(str(path), 1.0)]


def test_the_prediction_is_made_for_the_requests_loras_without_merging_them(pipeline, tmp_path):
    lora = time_lora(pipeline, tmp_path / "time.safetensors", 0.5)
    before = {name: value.clone() for name, value in pipeline.dit.module.state_dict().items()}
    without = pipeline.computed_steps(OPTIONS)
    predicted = pipeline.computed_steps(OPTIONS, lora)
    assert all(torch.equal(value, before[name]) for name, value in pipeline.dit.module.state_dict().items())
    assert predicted != without, "the fixture's LoRA must change TeaCache's decisions"
    pipeline.set_weights(None, lora)
    try:
        assert pipeline.computed_steps(OPTIONS) == predicted  # what TeaCache decides with the LoRA merged
        assert pipeline.computed_steps(OPTIONS, []) == without  # and the other way round, from a merged state
        assert pipeline.computed_steps(OPTIONS, lora) == predicted
    finally:
        pipeline.set_weights(None, [])
    assert all(torch.equal(value, before[name]) for name, value in pipeline.dit.module.state_dict().items())


def test_the_time_embedding_with_a_lora_is_the_merged_one_to_the_bit(pipeline, tmp_path):
    lora = time_lora(pipeline, tmp_path / "time.safetensors", 0.5)
    values = pipeline.dit.weights.time_embedding_with(lora)
    assert set(values) == {
        n for n, _ in pipeline.dit.module.named_parameters() if n.startswith(TIME_EMBEDDING_PREFIXES)
    }
    pipeline.set_weights(None, lora)
    try:
        merged = dict(pipeline.dit.module.named_parameters())
        assert all(torch.equal(values[name], merged[name]) for name in values)
        t = torch.tensor([700.0])
        ours = pipeline.dit.module.time_embeddings(t)[1]
    finally:
        pipeline.set_weights(None, [])
    assert torch.equal(pipeline.dit.module.time_embeddings(t, values)[1], ours)
