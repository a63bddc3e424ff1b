"""LoRA merging into the tiny golden DiT: every published key format against merges computed here by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.golden import load_case
from wan.configs import DiTConfig
from wan.model.dit import MultiTalkDiT
from wan.loading.lora import LoRAError, load_lora_file, merge_loras, normalize_lora_keys

RANK = 4


@pytest.fixture(scope="module")
def golden_weights() -> dict[str, torch.Tensor]:
    return load_file(load_case("dit_1p").file("weights"))


def tiny_dit(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> MultiTalkDiT:
    model = MultiTalkDiT(DiTConfig.from_dict(load_case("dit_1p").config))
    model.load_state_dict(weights, strict=True)
    return model.to(dtype)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * 0.5


def low_rank(gen: torch.Generator, weight: torch.Tensor, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) for a Linear weight [out, in] or a Conv3d weight [out, in, *k] (up [out, r, 1, 1, 1])."""
    up = randn(gen, weight.shape[0], rank, *([1] * (weight.ndim - 2)))
    return up, randn(gen, rank, *weight.shape[1:])


def by_hand(up: torch.Tensor, down: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return (up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)).reshape(shape)


def assert_merged(model: torch.nn.Module, base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> None:
    """Touched parameters equal base + delta (computed in float64, rounded once); all others are bit-identical."""
    for name, actual in model.named_parameters():
        if name not in deltas:
            assert torch.equal(actual, base[name]), f"{name} changed but no LoRA touches it"
            continue
        expected = (base[name].double() + deltas[name]).to(base[name].dtype)
        # Float32 deltas may round a bf16 value one ulp (2^-7 relative) the other way, or several where base and delta
        # nearly cancel (hence atol, far below the 0.5-sized deltas); anything larger is a wrong merge.
        rtol, atol = (2**-7, 1e-6) if expected.dtype == torch.bfloat16 else (1e-6, 1e-6)
        torch.testing.assert_close(actual.detach().float(), expected.float(), rtol=rtol, atol=atol, msg=name)


def reference_format_lora(gen: torch.Generator, weights: dict[str, torch.Tensor]):
    """`diffusion_model.*` with lora_down/up, .alpha, .diff, .diff_b. Returns (state dict, deltas(alpha_mode))."""
    sd, lora_parts, diffs = {}, [], {}
    for module, alpha in (("blocks.0.self_attn.q", 2.0), ("blocks.1.cross_attn.v_img", 8.0), ("patch_embedding", None)):
        up, down = low_rank(gen, weights[f"{module}.weight"])
        sd[f"diffusion_model.{module}.lora_up.weight"] = up
        sd[f"diffusion_model.{module}.lora_down.weight"] = down
        if alpha is not None:
            sd[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
        lora_parts.append((f"{module}.weight", up, down, alpha))
    for key, param in (
        ("head.head.diff", "head.head.weight"),
        ("blocks.1.cross_attn.norm_k.diff", "blocks.1.cross_attn.norm_k.weight"),
        ("blocks.0.ffn.0.diff_b", "blocks.0.ffn.0.bias"),
        ("blocks.0.self_attn.q.diff_b", "blocks.0.self_attn.q.bias"),
    ):
        sd[f"diffusion_model.{key}"] = diffs[param] = randn(gen, *weights[param].shape)

    def deltas(alpha_mode: str, scale: float) -> dict[str, torch.Tensor]:
        out = {name: scale * diff.double() for name, diff in diffs.items()}
        for name, up, down, alpha in lora_parts:
            ratio = alpha / RANK if alpha_mode == "standard" and alpha is not None else 1.0
            out[name] = out.get(name, 0) + scale * ratio * by_hand(up, down, weights[name].shape)
        return out

    return sd, deltas


# kohya names, diffusers names and PEFT prefixes, each with the Wan parameter it must land on (written out by hand).
KOHYA_MODULES = {
    "lora_unet_blocks_0_self_attn_q": ("blocks.0.self_attn.q", 1.0),
    "lora_unet_blocks_1_cross_attn_k_img": ("blocks.1.cross_attn.k_img", 2.0),
    "lora_unet_blocks_0_audio_cross_attn_kv_linear": ("blocks.0.audio_cross_attn.kv_linear", 16.0),
    "lora_unet_blocks_1_ffn_2": ("blocks.1.ffn.2", 4.0),
    "lora_unet_time_projection_1": ("time_projection.1", 8.0),
    "lora_unet_audio_proj_proj1_vf": ("audio_proj.proj1_vf", 3.0),
}
DIFFUSERS_MODULES = {
    "transformer.blocks.0.attn1.to_q": "blocks.0.self_attn.q",
    "transformer.blocks.0.attn1.to_out.0": "blocks.0.self_attn.o",
    "transformer.blocks.1.attn2.to_k": "blocks.1.cross_attn.k",
    "transformer.blocks.1.attn2.add_k_proj": "blocks.1.cross_attn.k_img",
    "transformer.blocks.1.attn2.add_v_proj": "blocks.1.cross_attn.v_img",
    "transformer.blocks.0.ffn.net.0.proj": "blocks.0.ffn.0",
    "transformer.blocks.1.ffn.net.2": "blocks.1.ffn.2",
    "transformer.proj_out": "head.head",
    "transformer.condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "transformer.condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "transformer.condition_embedder.time_proj": "time_projection.1",
    "transformer.condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
}
DIFFUSERS_BIASES = {
    "transformer.blocks.0.attn1.to_q": "blocks.0.self_attn.q.bias",
    "transformer.blocks.1.norm2": "blocks.1.norm3.bias",  # diffusers' norm2 is Wan's norm3
}
PEFT_MODULES = {
    "diffusion_model.blocks.0.ffn.2": "blocks.0.ffn.2",
    "base_model.model.blocks.1.self_attn.v": "blocks.1.self_attn.v",
    "transformer.blocks.0.cross_attn.o": "blocks.0.cross_attn.o",
}


def kohya_lora(gen, weights):
    sd, parts = {}, []
    for module, (wan, alpha) in KOHYA_MODULES.items():
        up, down = low_rank(gen, weights[f"{wan}.weight"])
        sd.update({f"{module}.lora_up.weight": up, f"{module}.lora_down.weight": down})
        sd[f"{module}.alpha"] = torch.tensor(alpha)
        parts.append((f"{wan}.weight", up, down, alpha))

    def deltas(alpha_mode: str, scale: float) -> dict[str, torch.Tensor]:
        return {
            name: scale * (alpha / RANK if alpha_mode == "standard" else 1.0) * by_hand(up, down, weights[name].shape)
            for name, up, down, alpha in parts
        }

    return sd, deltas


def lora_ab(gen, weights, modules: dict[str, str], biases: dict[str, str]):
    """PEFT/diffusers lora_A/lora_B (no alpha stored: ratio 1), `lora_B.bias` is a bias difference."""
    sd, out = {}, {}
    for module, wan in modules.items():
        up, down = low_rank(gen, weights[f"{wan}.weight"])
        sd.update({f"{module}.lora_B.weight": up, f"{module}.lora_A.weight": down})
        out[f"{wan}.weight"] = by_hand(up, down, weights[f"{wan}.weight"].shape)
    for module, bias in biases.items():
        sd[f"{module}.lora_B.bias"] = diff_b = randn(gen, *weights[bias].shape)
        out[bias] = diff_b.double()
    return sd, lambda alpha_mode, scale: {name: scale * delta for name, delta in out.items()}


FORMATS = {
    "reference": reference_format_lora,
    "kohya": kohya_lora,
    "diffusers": lambda gen, weights: lora_ab(gen, weights, DIFFUSERS_MODULES, DIFFUSERS_BIASES),
    "peft": lambda gen, weights: lora_ab(gen, weights, PEFT_MODULES, {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha_mode", ["standard", "reference"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_merges_like_the_hand_computed_delta(golden_weights, tmp_path, fmt, alpha_mode, dtype):
    sd, deltas = FORMATS[fmt](torch.Generator().manual_seed(1), golden_weights)
    save_file(sd, tmp_path / f"{fmt}.safetensors")
    model = tiny_dit(golden_weights, dtype)
    base = snapshot(model)
    merge_loras(model, [(tmp_path / f"{fmt}.safetensors", 0.8)], alpha_mode=alpha_mode)
    assert_merged(model, base, deltas(alpha_mode, 0.8))


def test_normalize_maps_every_format_to_wan_parameter_names(golden_weights):
    gen = torch.Generator().manual_seed(2)
    expected = {
        "kohya": {f"{wan}.weight" for wan, _ in KOHYA_MODULES.values()},
        "diffusers": {f"{wan}.weight" for wan in DIFFUSERS_MODULES.values()} | {"blocks.1.norm3.weight"},
        "peft": {f"{wan}.weight" for wan in PEFT_MODULES.values()},
    }
    for fmt, names in expected.items():
        entries = normalize_lora_keys(FORMATS[fmt](gen, golden_weights)[0], golden_weights)
        assert {entry.param_name for entry in entries} == names, fmt
    kohya = normalize_lora_keys(kohya_lora(gen, golden_weights)[0], golden_weights)
    assert {e.param_name: e.alpha for e in kohya} == {f"{wan}.weight": a for wan, a in KOHYA_MODULES.values()}


def test_several_loras_and_same_stem_files_each_apply_once(golden_weights, tmp_path):
    gen = torch.Generator().manual_seed(3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_sd, ref_deltas = reference_format_lora(gen, golden_weights)
    kohya_sd, kohya_deltas = kohya_lora(gen, golden_weights)  # also touches blocks.0.self_attn.q.weight
    diffusers_sd, diffusers_deltas = FORMATS["diffusers"](gen, golden_weights)
    save_file(ref_sd, tmp_path / "a" / "style.safetensors")
    save_file(kohya_sd, tmp_path / "b" / "style.safetensors")
    model = tiny_dit(golden_weights, torch.bfloat16)
    base = snapshot(model)
    loras = [(tmp_path / "a" / "style.safetensors", 0.7), (str(tmp_path / "b" / "style.safetensors"), 1.3),
             (diffusers_sd, -0.4)]  # fmt: skip
    merge_loras(model, loras, alpha_mode="standard")
    total: dict[str, torch.Tensor] = {}
    for part in (ref_deltas("standard", 0.7), kohya_deltas("standard", 1.3), diffusers_deltas("standard", -0.4)):
        for name, delta in part.items():
            total[name] = total.get(name, 0) + delta
    assert_merged(model, base, total)


def _assert_lora_error(model, base, loras, *fragments: str) -> None:
    with pytest.raises(LoRAError) as error:
        merge_loras(model, loras)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))
    for name, param in model.named_parameters():
        assert torch.equal(param, base[name]), f"{name} changed by a failed merge"


def test_mismatching_loras_raise_listing_keys_and_leave_the_model_untouched(golden_weights, tmp_path):
    gen = torch.Generator().manual_seed(4)
    model = tiny_dit(golden_weights, torch.bfloat16)
    base = snapshot(model)
    good, _ = reference_format_lora(gen, golden_weights)
    q_up, q_down = low_rank(gen, golden_weights["blocks.0.self_attn.q.weight"])

    # Blocks far beyond the tiny DiT's: 8 modules x (up, down) = 16 keys that fit nothing.
    unknown = {f"diffusion_model.blocks.{i}.ffn.0.lora_{p}.weight": q_up for i in range(90, 98) for p in ("up", "down")}
    first = "diffusion_model.blocks.90.ffn.0.lora_up.weight"
    _assert_lora_error(model, base, [(unknown, 1.0)], "16 key(s)", first, "and 11 more")
    wrong_shape = {"lora_unet_blocks_0_self_attn_q.lora_up.weight": q_up,
                   "lora_unet_blocks_0_self_attn_q.lora_down.weight": q_down[:, :32]}  # fmt: skip
    _assert_lora_error(model, base, [(wrong_shape, 1.0)], "lora_unet_blocks_0_self_attn_q.lora_down.weight", "[4, 32]")
    partial = good | {"lora_unet_blocks_0_self_attn_qkv.lora_down.weight": q_down}
    _assert_lora_error(model, base, [(partial, 1.0)], "1 key(s)", "lora_unet_blocks_0_self_attn_qkv.lora_down.weight")
    not_a_lora = good | {"diffusion_model.blocks.0.self_attn.q.weight": q_up @ q_down}
    _assert_lora_error(model, base, [(not_a_lora, 1.0)], "diffusion_model.blocks.0.self_attn.q.weight")
    up_only = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": q_up}
    _assert_lora_error(model, base, [(up_only, 1.0)], "diffusion_model.blocks.0.self_attn.q.lora_up.weight")
    diffusers_bad = {"transformer.blocks.0.attn1.add_k_proj.lora_A.weight": q_down,
                     "transformer.blocks.0.attn1.add_k_proj.lora_B.weight": q_up}  # fmt: skip
    _assert_lora_error(model, base, [(diffusers_bad, 1.0)], "blocks.0.self_attn.k_img")
    # The first LoRA is fine, the second is not: nothing may have been merged when the error comes.
    save_file(good, tmp_path / "good.safetensors")
    _assert_lora_error(model, base, [(tmp_path / "good.safetensors", 1.0), (partial, 1.0)], "qkv")
    _assert_lora_error(model, base, [({}, 1.0)], "no tensors")


def test_modulation_deltas_the_reference_skips_are_skipped_and_named(golden_weights, caplog):
    """Kijai's I2V lightx2v LoRA carries `diffusion_model.blocks.N.diff_m`, which the reference does not apply: the
    rest merges, and one log line names what was left out."""
    gen = torch.Generator().manual_seed(5)
    model = tiny_dit(golden_weights, torch.float32)
    good, _ = reference_format_lora(gen, golden_weights)
    modulation = {f"diffusion_model.blocks.{i}.diff_m": torch.randn(1, 6, 64, generator=gen) for i in range(2)}
    expected = tiny_dit(golden_weights, torch.float32)
    merge_loras(expected, [(good, 1.0)])
    with caplog.at_level("INFO", logger="wan.loading.lora"):
        merge_loras(model, [(good | modulation, 1.0)])
    assert all(torch.equal(p, dict(expected.named_parameters())[n]) for n, p in model.named_parameters())
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "2 keys" in line and "diffusion_model.blocks.0.diff_m" in line and "diffusion_model.blocks.1.diff_m" in line


def test_unreadable_files_raise_lora_error(tmp_path):
    with pytest.raises(LoRAError, match="not found"):
        load_lora_file(tmp_path / "missing.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoRAError, match="corrupt.safetensors"):
        load_lora_file(tmp_path / "corrupt.safetensors")


def test_ambiguous_kohya_names_are_an_error_not_a_guess():
    model = torch.nn.Module()
    model.a_b = torch.nn.ModuleDict({"c": torch.nn.Linear(2, 2)})
    model.a = torch.nn.ModuleDict({"b_c": torch.nn.Linear(2, 2)})
    names = [name for name, _ in model.named_parameters()]
    lora = {"lora_unet_a_b_c.lora_up.weight": torch.ones(2, 1), "lora_unet_a_b_c.lora_down.weight": torch.ones(1, 2)}
    with pytest.raises(LoRAError, match="ambiguous"):
        normalize_lora_keys(lora, names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_reload", [False, True])
def test_restore_gives_back_bit_identical_weights(golden_weights, dtype, use_reload):
    gen = torch.Generator().manual_seed(5)
    model = tiny_dit(golden_weights, dtype)
    base = snapshot(model)
    loras = [(reference_format_lora(gen, golden_weights)[0], 1.2), (FORMATS["diffusers"](gen, golden_weights)[0], 0.9)]
    merged = merge_loras(model, loras, reload=golden_weights.__getitem__ if use_reload else None)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, base[name])}
    assert changed and changed <= set(merged.param_names)
    if use_reload:
        assert merged.originals == {}
    else:  # only the touched parameters are kept, in host memory, in their own dtype
        assert set(merged.originals) == set(merged.param_names)
        assert all(t.device.type == "cpu" and t.dtype == dtype for t in merged.originals.values())
    merged.restore()
    for name, param in model.named_parameters():
        assert torch.equal(param, base[name]), name
    with pytest.raises(RuntimeError):
        merged.restore()
