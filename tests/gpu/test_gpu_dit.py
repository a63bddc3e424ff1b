"""The DiT's numerics on a CUDA GPU: the golden `dit_*` cases in float32 and bf16, and the full-width model cut to one
block (dim 5120, 40 heads, 32928 tokens, 1 and 2 speakers, random weights) in bf16 under each attention kernel and in
fp8, against float32 on the same weights.

The float32 truth of a bf16 or fp8 check runs the bf16 weights, upcast, on the same inputs (TF32 off), so only the
arithmetic differs. bf16 is held to rel = |bf16 - fp32| / |fp32| (2-norms) < 2e-2 with one speaker and < 5e-2 with
two: two speakers route each token by an argmax over a bf16 attention map, and near-ties move a few tokens to the
other speaker's label positions (dit_2p on the CPU: 1 and 4 of 288 tokens in its two blocks, 2.3e-2 at the output),
as the reference's own bf16 run does. fp8 (e4m3, 3 mantissa bits) is held to 0.15: it catches a broken scale (rel
about 1), not the rounding. The number of moved tokens per block is in each failure message.

Where CUDA is missing the `gpu` marker skips these; with that skip lifted they run on the CPU at the golden cases'
tiny width, which checks the tests themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from support.golden import cases_with_prefix, load_case

from bench import (
    attention_backend,
    build_random,
    exact_float32,
    full_config,
    relative_error,
    set_self_attention,
    tiny_config,
)
from bench.bench_dit import FULL_CLIP, TINY_CLIP, dit_inputs
from wan.model.dit import MultiTalkDiT
from wan.model.fp8 import quantize_blocks
from wan.runtime.kernels import self_attention_kernel
from wan.runtime.plans import FP8

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16_REL_TOL = {1: 2e-2, 2: 5e-2}  # by number of speakers, see above
FP8_REL_TOL = 0.15
MODEL_INPUTS = ("x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks")
ATTENTION = ("sdpa", "cudnn", "flash", "fa4")


def forward_with_probes(model: MultiTalkDiT, inputs: dict) -> dict:
    """The output, the first block's output, and each block's audio label positions (two speakers only)."""
    blocks, positions = [], []
    hooks = [model.blocks[0].register_forward_hook(lambda m, a, out: blocks.append(out))]
    for block in model.blocks:
        hooks.append(
            block.audio_cross_attn.register_forward_pre_hook(
                lambda m, a, kwargs: positions.append(kwargs.get("q_positions")), with_kwargs=True
            )
        )
    try:
        with torch.inference_mode():
            out = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(out=out, block=blocks[0], positions=positions)


def routing_flips(test: dict, truth: dict) -> list[int]:
    """Tokens per block whose label position moved to another speaker's range (a change of more than 1)."""
    pairs = zip(test["positions"], truth["positions"])
    return [int(((a.float() - b.float()).abs() > 1).sum()) for a, b in pairs if a is not None and b is not None]


def golden_inputs(case) -> dict[str, torch.Tensor]:
    inputs = case.inputs()
    return {key: inputs[key].to(DEVICE) for key in MODEL_INPUTS}


@pytest.mark.parametrize("name", cases_with_prefix("dit_"))
def test_golden_dit_in_float32_is_within_the_strict_tolerance(name):
    case = load_case(name)
    model = case.dit().to(DEVICE)
    with exact_float32():
        out = forward_with_probes(model, golden_inputs(case))["out"]
    case.assert_close("out", out[None])


@pytest.mark.parametrize("name", cases_with_prefix("dit_"))
def test_golden_dit_in_bf16_is_near_its_float32_run(name):
    case = load_case(name)
    inputs = golden_inputs(case)
    model16 = case.dit().to(DEVICE).to(torch.bfloat16)
    run16 = forward_with_probes(model16, inputs)
    with exact_float32():
        run32 = forward_with_probes(copy.deepcopy(model16).float(), inputs)
    error = relative_error(run16["out"], run32["out"])
    golden = relative_error(run16["out"][None].float().cpu(), case.outputs()["out"])
    tolerance = BF16_REL_TOL[inputs["audio"].shape[0]]
    assert error["rel"] < tolerance, (
        f"{name} bf16 vs fp32: rel {error['rel']:.3g} max_abs {error['max_abs']:.3g} (< {tolerance}); routing flips "
        f"{routing_flips(run16, run32)}; vs golden rel {golden['rel']:.3g}"
    )


@dataclasses.dataclass
class OneBlock:
    """The one-block DiT in bf16, its inputs, and the float32 run of the same weights."""

    model16: MultiTalkDiT
    inputs: dict
    truth: dict
    tokens: int


@functools.cache
def one_block(speakers: int) -> OneBlock:
    full = DEVICE.type == "cuda"
    config = dataclasses.replace(full_config() if full else tiny_config(), num_layers=1)
    clip = FULL_CLIP if full else TINY_CLIP
    generator = torch.Generator(device=DEVICE).manual_seed(100 + speakers)
    model16 = build_random(lambda: MultiTalkDiT(config), DEVICE, torch.bfloat16, generator)
    inputs = dit_inputs(config, clip, speakers, DEVICE, generator)  # t = 992 is exact in bf16
    model32 = copy.deepcopy(model16).float()
    with exact_float32():
        truth = forward_with_probes(model32, inputs)
    del model32
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    tokens = ((clip.frames - 1) // config.vae_scale + 1) * (clip.height // 16) * (clip.width // 16)
    return OneBlock(model16, inputs, truth, tokens)


@pytest.mark.parametrize("speakers", [1, 2])
@pytest.mark.parametrize("kernel", ATTENTION)
def test_one_full_width_block_in_bf16_is_near_float32(speakers, kernel):
    case = one_block(speakers)
    why_not = set_self_attention(case.model16, kernel)
    try:
        if why_not:
            pytest.skip(why_not)
        with attention_backend(kernel):
            run = forward_with_probes(case.model16, case.inputs)
    finally:
        set_self_attention(case.model16, "sdpa")
    block = relative_error(run["block"], case.truth["block"])
    out = relative_error(run["out"], case.truth["out"])
    tolerance = BF16_REL_TOL[speakers]
    assert block["rel"] < tolerance and out["rel"] < tolerance, (
        f"{case.tokens} tokens, {speakers} speaker(s), {kernel}: block rel {block['rel']:.3g}, output rel "
        f"{out['rel']:.3g} max_abs {out['max_abs']:.3g} (< {tolerance}); routing flips "
        f"{routing_flips(run, case.truth)}"
    )


@pytest.mark.parametrize("speakers", [1, 2])
@pytest.mark.parametrize("fast_accumulation, fused_norms", [(True, False), (False, False), (True, True)])
def test_one_full_width_block_in_fp8_is_near_float32(speakers, fast_accumulation, fused_norms):
    case = one_block(speakers)
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) < (8, 9):
        pytest.skip(f"{torch.cuda.get_device_name(DEVICE)} has no fp8 matmuls (needs compute capability 8.9+)")
    model8 = copy.deepcopy(case.model16)
    quantize_blocks(model8, fast_accumulation=fast_accumulation, fused_norms=fused_norms)
    # The self-attention the fp8 plan runs on this card (cuDNN's fp8 attention on Hopper and newer).
    model8.set_self_attention(self_attention_kernel(FP8, DEVICE))
    run = forward_with_probes(model8, case.inputs)
    del model8
    out = relative_error(run["out"], case.truth["out"])
    block = relative_error(run["block"], case.truth["block"])
    summary = (
        f"{case.tokens} tokens, {speakers} speaker(s), fp8 fast_accumulation={fast_accumulation} fused_norms="
        f"{fused_norms}: block rel "
        f"{block['rel']:.4g}, output rel {out['rel']:.4g} max_abs {out['max_abs']:.3g}; routing flips "
        f"{routing_flips(run, case.truth)}"
    )
    print(summary)
    assert out["rel"] < FP8_REL_TOL, f"{summary} (< {FP8_REL_TOL})"


@pytest.mark.parametrize("affine, modulated", [(False, True), (True, False)])
def test_fused_norm_quantisation_on_the_gpu_is_the_norm_then_its_row_quantisation(affine, modulated):
    """norm1/norm2 (modulated, no parameters) and norm3/norm_x (affine) at full width, against the torch path."""
    if DEVICE.type != "cuda":
        pytest.skip("the fused norm quantisation is a Triton kernel: CUDA only")
    from wan.model.dit import FP32LayerNorm
    from wan.model.fp8_rows import quantize_rows

    generator = torch.Generator().manual_seed(6)
    rows, cols = 4111, 5120
    x = (torch.randn(rows, cols, generator=generator) * torch.logspace(-1, 3, rows)[:, None]).bfloat16()
    norm = FP32LayerNorm(cols, eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.2 * torch.randn(cols, generator=generator))
            norm.bias.copy_(0.2 * torch.randn(cols, generator=generator))
    norm = norm.bfloat16()
    shift, scale = (0.3 * torch.randn(1, 1, cols, generator=generator) if modulated else None for _ in range(2))
    expected_values, expected_scales = quantize_rows(norm(x, shift, scale))
    weight, bias = (None, None) if not affine else (norm.weight.to(DEVICE), norm.bias.to(DEVICE))
    on_device = [None if t is None else t.to(DEVICE) for t in (shift, scale)]
    values, scales = torch.ops.multitalk.norm_quantize_rows(x.to(DEVICE), weight, bias, *on_device, 1e-6)
    codes = values.cpu().view(torch.uint8).int(), expected_values.view(torch.uint8).int()
    same = (codes[0] == codes[1]).float().mean().item()
    scale_rel = ((scales.cpu() - expected_scales).abs() / expected_scales).max().item()
    print(f"affine={affine} modulated={modulated}: {same:.6f} of the e4m3 codes equal, scales rel {scale_rel:.2g}")
    # The row statistics round differently from torch's LayerNorm (Welford), which moves a few bf16 roundings by a
    # step: the next e4m3 code at most, and a row's scale by at most one bf16 step of its largest value.
    assert same > 0.999 and (codes[0] - codes[1]).abs().max().item() <= 1, f"{same:.7f} of the e4m3 codes equal"
    assert scale_rel <= 2**-8, f"scales rel {scale_rel:.2g}"


@pytest.mark.parametrize("rows, cols, gelu", [(333, 5120, False), (257, 13824, True), (64, 1024, False)])
def test_row_quantisation_on_the_gpu_gives_the_bits_of_its_torch_arithmetic(rows, cols, gelu):
    if DEVICE.type != "cuda":
        pytest.skip("the one-pass row quantisation is a Triton kernel: CUDA only")
    from wan.model.fp8_rows import quantize_rows

    generator = torch.Generator().manual_seed(5)
    # Rows of very different magnitudes, as tokens are.
    x = (torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 3, rows)[:, None]).bfloat16()
    values, scales = torch.ops.multitalk.quantize_rows(x.to(DEVICE), gelu)
    expected_values, expected_scales = quantize_rows(x, gelu=gelu)
    same = (values.cpu().float() == expected_values.float()).float().mean().item()
    scale_rel = ((scales.cpu() - expected_scales).abs() / expected_scales).max().item()
    assert scale_rel == 0.0, f"scales rel {scale_rel:.2g}"
    if not gelu:
        assert same == 1.0, f"{same:.7f} of the e4m3 values equal"
        return
    # GELU's tanh in Triton and on the CPU differ in the last bit, which puts a few values (9 of 3.5 M on an H100,
    # 2026-12-07) on the other side of a rounding boundary: the next e4m3 code, never further.
    codes = values.cpu().view(torch.uint8).int(), expected_values.view(torch.uint8).int()
    assert same > 1 - 1e-5 and (codes[0] - codes[1]).abs().max().item() <= 1, f"{same:.7f} of the e4m3 values equal"
