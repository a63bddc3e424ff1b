"""Fast mode and users' LoRAs through the real runner on the tiny set: passes per step, merge, exact restore."""

import pytest
import torch
from safetensors.torch import load_file, save

from support.cog_inputs import run_inputs

EXAMPLES = {"image": "examples/two_people.png", "audio": "examples/person1.wav"}


def _predict(runner, **inputs):
    return runner.run(**run_inputs(**{"num_frames": 5, "seed": 1, **EXAMPLES, **inputs}))


def _count_passes(runner):
    calls = []
    handle = runner.service.pipeline.dit.module.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(1), with_kwargs=True
    )
    return calls, handle


def test_fast_mode_merges_the_lora_runs_two_passes_per_step_and_restores_exactly(runner):
    base = {k: v.clone() for k, v in runner.service.pipeline.dit.module.state_dict().items()}
    calls, handle = _count_passes(runner)
    try:
        _predict(runner, fast=True)
        assert len(calls) == 4 * 2  # the fast preset: 4 steps, text guidance 1 -> cond + drop_audio
        merged = runner.service.pipeline.dit.module.state_dict()
        assert not torch.equal(merged["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])
        diff_b = load_file(runner.service.fast_lora)["diffusion_model.blocks.0.self_attn.q.diff_b"]
        by_hand = (base["blocks.0.self_attn.q.bias"].float() + diff_b.float()).to(
            merged["blocks.0.self_attn.q.bias"].dtype
        )
        assert torch.equal(merged["blocks.0.self_attn.q.bias"], by_hand)
        calls.clear()
        _predict(runner, fast=True, audio_guidance_scale=1.0)
        assert len(calls) == 4 * 1  # text and audio guidance 1: the conditional pass alone
        calls.clear()
        _predict(runner, turbo=False, sampling_steps=2)
        assert len(calls) == 2 * 3  # quality preset: 3 passes per step
    finally:
        handle.remove()
    assert all(torch.equal(base[k], v) for k, v in runner.service.pipeline.dit.module.state_dict().items())


def test_user_lora_from_url_and_a_mismatching_one(runner, loopback):
    dit = runner.service.pipeline.dit.module
    weight = dit.state_dict()["blocks.1.ffn.0.weight"]
    generator = torch.Generator().manual_seed(0)
    up, down = (
        torch.randn(weight.shape[0], 2, generator=generator),
        torch.randn(2, weight.shape[1], generator=generator),
    )
    mine = loopback.url(
        "mine.safetensors",
        save(
            {
                "diffusion_model.blocks.1.ffn.0.lora_up.weight": up,
                "diffusion_model.blocks.1.ffn.0.lora_down.weight": down,
            }
        ),
    )
    wrong = loopback.url(
        "wrong.safetensors",
        save(
            {
                "diffusion_model.blocks.7.nothing.lora_up.weight": up,
                "diffusion_model.blocks.7.nothing.lora_down.weight": down,
            }
        ),
    )
    base = {k: v.clone() for k, v in dit.state_dict().items()}

    _predict(runner, lora_url=mine, lora_scale=0.5)
    expected = (base["blocks.1.ffn.0.weight"].float() + 0.5 * up @ down).to(weight.dtype)
    torch.testing.assert_close(dit.state_dict()["blocks.1.ffn.0.weight"], expected, rtol=0, atol=1e-6)

    merged = {k: v.clone() for k, v in dit.state_dict().items()}
    with pytest.raises(ValueError, match="lora_url.*blocks.7.nothing"):
        _predict(runner, lora_url=wrong)
    with pytest.raises(ValueError, match="lora_url"):
        _predict(runner, lora_url=f"{loopback.base}/files/missing.safetensors")
    # A LoRA that does not fit fails before any weight moves (the plan reads it), and the runner keeps working: the
    # next request runs on the base model.
    assert all(torch.equal(merged[k], v) for k, v in dit.state_dict().items())
    assert _predict(runner).exists()
    assert all(torch.equal(base[k], v) for k, v in dit.state_dict().items())
