"""Swapping the DiT's audio layers (MultiTalk <-> InfiniteTalk single / multi) over one set of base weights: the
published files' tensors go in, switching back is bit-exact, LoRAs and fp8 layers survive it."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from wan import load_pipeline
from wan.loading.checkpoints import INFINITETALK_DIR_NAME, INFINITETALK_FILES, is_multitalk_key
from wan.model.fp8 import Fp8Linear, quantize_blocks
from wan.model.fp8_rows import quantize_rows


@pytest.fixture
def pipeline(tiny_weights):
    return load_pipeline(
        tiny_weights / "Wan2.1-I2V-14B-480P",
        tiny_weights / "MeiGen-MultiTalk",
        tiny_weights / INFINITETALK_DIR_NAME,
        device="cpu",
        dtype=torch.float32,
    )


def _state(pipeline) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipeline.dit.module.state_dict().items()}


def test_switching_reads_the_files_and_switching_back_is_exact(pipeline, tiny_weights):
    original = _state(pipeline)
    assert pipeline.dit.weights.active_audio_layers == "multitalk" and not pipeline.dit.module.audio_proj.float32_norm
    for name, relative in INFINITETALK_FILES.items():
        pipeline.set_weights(name)
        published = load_file(tiny_weights / INFINITETALK_DIR_NAME / relative)
        state = pipeline.dit.module.state_dict()
        assert set(published) == {k for k in state if is_multitalk_key(k)}
        assert all(torch.equal(state[k], published[k]) for k in published)
        assert all(torch.equal(state[k], original[k]) for k in state if not is_multitalk_key(k))  # base untouched
        assert pipeline.dit.module.audio_proj.float32_norm
    pipeline.set_weights("multitalk")
    assert all(torch.equal(v, original[k]) for k, v in pipeline.dit.module.state_dict().items())
    assert not pipeline.dit.module.audio_proj.float32_norm
    with pytest.raises(ValueError, match="model: the other audio weights are not installed"):
        pipeline.set_weights("other")


def test_loras_come_off_before_a_switch_and_go_back_on(pipeline, tiny_weights):
    original = _state(pipeline)
    fast = [(str(tiny_weights / "loras" / next(p.name for p in (tiny_weights / "loras").iterdir())), 1.0)]
    pipeline.set_weights("multitalk", fast)
    with_lora = _state(pipeline)
    pipeline.set_weights("infinitetalk-multi", fast)
    pipeline.set_weights("multitalk", fast)
    assert all(torch.equal(v, with_lora[k]) for k, v in pipeline.dit.module.state_dict().items())
    pipeline.set_weights("multitalk", [])
    assert all(torch.equal(v, original[k]) for k, v in pipeline.dit.module.state_dict().items())


def test_fp8_layers_take_the_new_weights_quantised(pipeline, tiny_weights):
    quantize_blocks(pipeline.dit.module, min_features=32)  # the tiny DiT's 64-wide layers count as large here
    layer = pipeline.dit.module.blocks[0].audio_cross_attn.q_linear
    assert isinstance(layer, Fp8Linear)
    pipeline.set_weights("infinitetalk-single")
    weight = load_file(tiny_weights / INFINITETALK_DIR_NAME / INFINITETALK_FILES["infinitetalk-single"])[
        "blocks.0.audio_cross_attn.q_linear.weight"
    ]
    values, scale = quantize_rows(weight)
    assert torch.equal(layer.weight.float(), values.float()) and torch.equal(layer.weight_scale, scale.T)


def test_infinitetalk_norm_runs_in_float32_on_bf16_weights(pipeline):
    projector = pipeline.dit.module.audio_proj.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    config = pipeline.dit.module.config
    first = torch.randn(1, 1, 5, config.audio_layers, config.audio_channels, generator=generator).bfloat16()
    latter = torch.randn(1, 2, 8, config.audio_layers, config.audio_channels, generator=generator).bfloat16()
    projector.float32_norm = True
    tokens = projector(first, latter)
    projector.float32_norm = False
    plain = projector(first, latter)
    norm = projector.norm
    hidden = projector.proj3(
        F.relu(
            projector.proj2(
                torch.cat([F.relu(projector.proj1(first.flatten(2))), F.relu(projector.proj1_vf(latter.flatten(2)))], 1)
            )
        )
    )
    hidden = hidden.unflatten(-1, (config.context_tokens, config.output_dim))
    by_hand = F.layer_norm(hidden.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    assert tokens.dtype == torch.float32 and torch.equal(tokens, by_hand)
    assert plain.dtype == torch.bfloat16
    assert (plain.float() - tokens).abs().max() <= 2**-7 * tokens.abs().max()  # about one bf16 ulp apart
