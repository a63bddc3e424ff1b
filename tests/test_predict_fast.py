"""Fast mode and users' LoRAs through the real predictor on the tiny set: passes per step, merge, exact restore."""

import http.server
import threading
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from predict import Predictor
from wan.testing.tiny import write_tiny_checkpoints

EXAMPLES = {"image": "examples/two_people.png", "audio": "examples/person1.wav"}


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    predictor = Predictor()
    predictor.setup(weights=str(write_tiny_checkpoints(tmp_path_factory.mktemp("weights"))))
    return predictor


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _predict(predictor, **inputs):
    defaults = dict(
        second_audio=None, prompt="a person talks", negative_prompt="", audio_type="add", person1_bbox=None,
        person2_bbox=None, num_frames=5, resolution="480p", sampling_steps=None, turbo=True, fast=False,
        lora_url=None, lora_scale=1.0, text_guidance_scale=None, audio_guidance_scale=None, seed=1,
        color_correction_strength=1.0, use_apg=False,
    )
    return predictor.predict(**{**defaults, **EXAMPLES, **inputs})


def _count_passes(predictor):
    calls = []
    handle = predictor.pipeline.dit.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1),
                                                              with_kwargs=True)
    return calls, handle


def test_fast_mode_merges_the_lora_runs_two_passes_per_step_and_restores_exactly(predictor):
    base = {k: v.clone() for k, v in predictor.pipeline.dit.state_dict().items()}
    calls, handle = _count_passes(predictor)
    try:
        _predict(predictor, fast=True)
        assert len(calls) == 4 * 2  # the fast preset: 4 steps, text guidance 1 -> cond + drop_audio
        merged = predictor.pipeline.dit.state_dict()
        assert not torch.equal(merged["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])
        diff_b = load_file(predictor.fast_lora)["diffusion_model.blocks.0.self_attn.q.diff_b"]
        by_hand = (base["blocks.0.self_attn.q.bias"].float() + diff_b.float()).to(merged["blocks.0.self_attn.q.bias"].dtype)
        assert torch.equal(merged["blocks.0.self_attn.q.bias"], by_hand)
        calls.clear()
        _predict(predictor, turbo=False, sampling_steps=2)
        assert len(calls) == 2 * 3  # quality preset: 3 passes per step
    finally:
        handle.remove()
    assert all(torch.equal(base[k], v) for k, v in predictor.pipeline.dit.state_dict().items())


def test_user_lora_from_url_and_a_mismatching_one(predictor, lora_server):
    folder, url = lora_server
    dit = predictor.pipeline.dit
    weight = dit.state_dict()["blocks.1.ffn.0.weight"]
    generator = torch.Generator().manual_seed(0)
    up, down = torch.randn(weight.shape[0], 2, generator=generator), torch.randn(2, weight.shape[1], generator=generator)
    save_file({"diffusion_model.blocks.1.ffn.0.lora_up.weight": up,
               "diffusion_model.blocks.1.ffn.0.lora_down.weight": down}, folder / "mine.safetensors")
    save_file({"diffusion_model.blocks.7.nothing.lora_up.weight": up,
               "diffusion_model.blocks.7.nothing.lora_down.weight": down}, folder / "wrong.safetensors")
    base = {k: v.clone() for k, v in dit.state_dict().items()}

    _predict(predictor, lora_url=f"{url}/mine.safetensors", lora_scale=0.5)
    expected = (base["blocks.1.ffn.0.weight"].float() + 0.5 * up @ down).to(weight.dtype)
    torch.testing.assert_close(dit.state_dict()["blocks.1.ffn.0.weight"], expected, rtol=0, atol=1e-6)

    with pytest.raises(ValueError, match="lora_url.*blocks.7.nothing"):
        _predict(predictor, lora_url=f"{url}/wrong.safetensors")
    with pytest.raises(ValueError, match="lora_url"):
        _predict(predictor, lora_url=f"{url}/missing.safetensors")
    # A failed merge leaves the base model, and the predictor keeps working.
    assert all(torch.equal(base[k], v) for k, v in dit.state_dict().items())
    assert _predict(predictor).exists()
