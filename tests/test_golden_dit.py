"""The MultiTalk DiT against the reference's golden vectors (float32, CPU), intermediates included.

Intermediates are read with forward hooks, so the model carries no debug code.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from support.golden import cases_with_prefix, load_case
from safetensors.torch import load_file

from wan.model.audio_layers import AudioProjModel, latter_audio_slots, speaker_token_masks, split_audio_windows
from wan.configs import DiTConfig
from wan.model.dit import MultiTalkDiT

pytestmark = pytest.mark.golden

DIT_CASES = cases_with_prefix("dit_")


def dit_config(case) -> DiTConfig:
    return DiTConfig.from_dict(case.dit_config_values())


def weights_path(case):
    return case.file("weights")


@functools.cache
def load_model(case_name: str) -> MultiTalkDiT:
    case = load_case(case_name)
    model = MultiTalkDiT(dit_config(case)).eval()
    model.load_state_dict(load_file(weights_path(case)), strict=True)
    return model


def model_inputs(case) -> dict[str, torch.Tensor]:
    inputs = case.inputs()
    return {k: inputs[k] for k in ("x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks")}


def token_masks_of(case, model: MultiTalkDiT) -> torch.Tensor:
    masks = case.inputs()["ref_target_masks"]
    _, patch_h, patch_w = model.config.patch_size
    return speaker_token_masks(masks, (masks.shape[1] // patch_h, masks.shape[2] // patch_w))


def run_with_intermediates(case, model: MultiTalkDiT) -> dict[str, torch.Tensor]:
    """Forward pass, returning `out` plus the intermediates under the golden `debug.*` names."""
    found: dict[str, torch.Tensor] = {}
    token_masks = token_masks_of(case, model)
    hooks = []

    def keep(module, name, pick=lambda out: out):
        hooks.append(module.register_forward_hook(lambda m, args, out: found.__setitem__(name, pick(out))))

    keep(model.patch_embedding, "debug.patch_embedding_out")
    keep(model.time_embedding, "debug.time_embedding_e")
    keep(model.time_projection, "debug.time_projection_out")
    keep(model.text_embedding, "debug.text_embedding_out")
    keep(model.img_emb, "debug.img_emb_out")
    keep(model.audio_proj, "debug.audio_proj_out")
    keep(model.head, "debug.head_out")

    def block_inputs(module, args, kwargs):
        found["debug.block_in_x"] = args[0]
        found["debug.block_kw_e0"] = kwargs["e0"]
        found["debug.block_kw_context"] = kwargs["context"]
        found["debug.block_kw_audio_embedding"] = kwargs["audio_tokens"][None]

    hooks.append(model.blocks[0].register_forward_pre_hook(block_inputs, with_kwargs=True))

    for i, block in enumerate(model.blocks):
        prefix = f"debug.blocks.{i}."
        keep(block, prefix + "out")
        keep(block.cross_attn, prefix + "cross_attn_out")
        keep(block.audio_cross_attn, prefix + "audio_cross_attn_out")

        def self_attn_outputs(module, args, kwargs, out, prefix=prefix):
            found[prefix + "self_attn_out"], attn_map = out
            if attn_map is None:  # one speaker: the model skips the map, so compute it here from the same inputs
                attn_map = module.forward(*args, token_masks=token_masks)[1]
            found[prefix + "x_ref_attn_map"] = attn_map

        def label_positions(module, args, kwargs, prefix=prefix):
            if kwargs["q_positions"] is not None:
                frames = args[1].shape[0]
                found[prefix + "label_rope_pos_q"] = kwargs["q_positions"]
                found[prefix + "label_rope_pos_k"] = kwargs["k_positions"].repeat(frames)

        hooks.append(block.self_attn.register_forward_hook(self_attn_outputs, with_kwargs=True))
        hooks.append(block.audio_cross_attn.register_forward_pre_hook(label_positions, with_kwargs=True))

    try:
        with torch.no_grad():
            found["out"] = model(**model_inputs(case))[None]
    finally:
        for hook in hooks:
            hook.remove()
    grid = found["debug.patch_embedding_out"].shape[2:]
    found["debug.block_kw_grid_sizes"] = torch.tensor([list(grid)])
    found["debug.block_kw_seq_lens"] = torch.tensor([grid.numel()])
    found["debug.block_kw_token_ref_target_masks"] = token_masks.float()
    return found


def assert_all_close(case, actual: dict[str, torch.Tensor], names) -> None:
    failures = []
    for name in names:
        try:
            case.assert_close(name, actual[name])
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case_name", DIT_CASES)
def test_golden_dit_forward(case_name):
    case = load_case(case_name)
    model = load_model(case_name)
    expected = case.outputs()
    actual = run_with_intermediates(case, model)

    speakers = case.inputs()["audio"].shape[0]
    layers = range(len(model.blocks))
    required = {"out", "debug.block_kw_audio_embedding"} | {f"debug.blocks.{i}.x_ref_attn_map" for i in layers}
    if speakers == 2:
        required |= {f"debug.blocks.{i}.label_rope_pos_{qk}" for i in layers for qk in "qk"}
    assert required <= set(expected), f"golden case lacks {sorted(required - set(expected))}"
    assert required <= set(actual)
    if speakers == 1:
        assert not any("label_rope_pos" in name for name in actual), "label RoPE must be off for one speaker"
    assert_all_close(case, actual, sorted(set(expected) & set(actual)))


class RecordingCache:
    """A fake BlockCache: says whether to skip, records what the DiT hands it."""

    def __init__(self, skip: bool, residual: torch.Tensor | None = None):
        self.should_skip = skip
        self.residual = residual
        self.seen_e0 = None

    def skip(self, e0: torch.Tensor) -> bool:
        self.seen_e0 = e0
        return self.should_skip


@pytest.mark.parametrize("case_name", DIT_CASES)
def test_golden_dit_cache_protocol(case_name):
    case = load_case(case_name)
    model = load_model(case_name)
    expected, tolerances = case.outputs(), case.tolerances()
    last_out = f"debug.blocks.{len(model.blocks) - 1}.out"
    golden_residual = expected[last_out] - expected["debug.block_in_x"]

    # Computing path: the cache sees e0 and receives residual = blocks_out - blocks_in.
    computing = RecordingCache(skip=False)
    with torch.no_grad():
        out = model(**model_inputs(case), cache=computing)
    case.assert_close("debug.block_kw_e0", computing.seen_e0)
    case.assert_close("out", out[None])
    residual_tol = tolerances[last_out]["strict_max_abs_err"] + tolerances["debug.block_in_x"]["strict_max_abs_err"]
    assert (computing.residual - golden_residual).abs().max() <= residual_tol

    # Skipping path: no block runs, the golden residual is added to the patch tokens, and the head still runs.
    calls = []
    hooks = [block.register_forward_pre_hook(lambda m, a: calls.append(m)) for block in model.blocks]
    try:
        with torch.no_grad():
            out = model(**model_inputs(case), cache=RecordingCache(skip=True, residual=golden_residual))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []
    case.assert_close("out", out[None])


@pytest.mark.parametrize("case_name", DIT_CASES)
def test_golden_dit_bf16_runs_close_to_float32(case_name):
    """bf16 parameters: t reaches the time embedding as the float64 sinusoid of the float32 t (the reference's
    timesteps are float32 and never take the activation dtype), and the output is within bf16 noise of the float32
    golden. Rounding t to bf16 first (988.25 -> 988 on dit_1p) moves the output by ~4 % of its mean magnitude."""
    case = load_case(case_name)
    model = MultiTalkDiT(dit_config(case)).eval()
    model.load_state_dict(load_file(weights_path(case)), strict=True)
    model.to(torch.bfloat16)
    sinusoids = []
    hook = model.time_embedding.register_forward_pre_hook(lambda m, args: sinusoids.append(args[0]))
    try:
        found = run_with_intermediates(case, model)
    finally:
        hook.remove()
    expected = case.outputs()

    t = case.inputs()["t"].to(torch.float32).double().numpy()
    half = sinusoids[0].shape[1] // 2
    angles = np.outer(t, np.power(10000.0, -np.arange(half) / half))
    assert sinusoids[0].dtype == torch.float32
    np.testing.assert_allclose(sinusoids[0].numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-6)

    for name in ("debug.patch_embedding_out", "debug.text_embedding_out", "debug.img_emb_out", "debug.audio_proj_out"):
        err = (found[name].float() - expected[name]).abs().max()
        assert err <= 0.02 * expected[name].abs().max(), f"{name}: bf16 error {err:.3g}"
    out = found["out"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 noise is ~1 % of the mean magnitude here (two speakers: a few tokens flip their speaker, so no max bound).
    relative = (out - expected["out"]).abs().mean() / expected["out"].abs().mean()
    assert relative <= 0.025, f"bf16 output {relative:.2%} away from the float32 golden"


def test_blocks_compile_fullgraph():
    """The block traces as one graph (no graph breaks) for one and two speakers, and matches eager."""
    by_speakers = {load_case(name).inputs()["audio"].shape[0]: name for name in reversed(DIT_CASES)}
    for case_name in by_speakers.values():
        case = load_case(case_name)
        model = load_model(case_name)
        calls = []
        hook = model.blocks[0].register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**model_inputs(case))
        finally:
            hook.remove()
        args, kwargs = calls[0]
        compiled = torch.compile(model.blocks[0], fullgraph=True, backend="eager")
        with torch.no_grad():
            assert torch.equal(compiled(*args, **kwargs), model.blocks[0](*args, **kwargs))


@pytest.mark.parametrize("case_name", cases_with_prefix("audio_proj"))
def test_golden_audio_proj(case_name):
    case = load_case(case_name)
    config = case.config
    weights = load_file(weights_path(case))
    state = {k.removeprefix("audio_proj."): v for k, v in weights.items() if k.startswith("audio_proj.")}
    window, layers, channels = case.inputs()["audio"].shape[2:]
    model = AudioProjModel(
        window=window,
        window_vf=config["seq_len_vf"],
        layers=layers,
        channels=channels,
        intermediate_dim=config["intermediate_dim"],
        output_dim=config["output_dim"],
        context_tokens=config["context_tokens"],
        norm_output=config["norm_output_audio"],
    )
    model.load_state_dict(state, strict=True)

    audio = case.inputs()["audio"]
    vae_scale = config["vae_scale"]
    with torch.no_grad():
        tokens = model(*split_audio_windows(audio, vae_scale))
    case.assert_close("audio_proj_tokens", tokens)
    case.assert_close("audio_embedding", tokens.transpose(0, 1).flatten(1, 2)[None])

    slots = latter_audio_slots(window, vae_scale)
    latent_frames = tokens.shape[1]
    frame_index = torch.tensor([[1 + vae_scale * (t - 1) + f for f, _ in slots] for t in range(1, latent_frames)])
    window_index = torch.tensor([[w for _, w in slots] for _ in range(1, latent_frames)])
    case.assert_close("latter_frame_index", frame_index)
    case.assert_close("latter_window_index", window_index)
