"""fp8 linear layers: quantisation error within e4m3's resolution, module swap keeps the model's behaviour close."""

import dataclasses

import pytest
import torch

from bench.bench_dit import TINY_CLIP, dit_inputs
from wan.model.attention import attention
from wan.model.dit import FP32LayerNorm, MultiTalkDiT
from wan.model.fp8 import (
    FP8_MAX,
    Fp8InputLayerNorm,
    Fp8Linear,
    fp8_attention,
    quantize_blocks,
    quantize_rows,
    quantize_tensor,
)
from wan.testing.tiny import TINY_DIT, dit_shapes, random_weights

# dim 1024 so that the block linears are large enough to be quantised
FP8_DIT = dataclasses.replace(TINY_DIT, dim=1024, ffn_dim=2048, num_heads=8)


def test_quantize_rows_round_trip_within_e4m3_resolution():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 64)[:, None]
    values, scale = quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.allclose(values.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))  # each row uses the range
    # e4m3 has 3 mantissa bits: relative rounding error at most 2^-4 of the value.
    assert ((values.float() * scale - x).abs() <= x.abs() * 2**-4 + scale * 2**-9).all()


def test_fp8_linear_matches_the_bf16_linear():
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(1024, 512).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(512, 1024, generator=generator) * 0.02)
    x = torch.randn(2, 7, 1024, generator=generator).to(torch.bfloat16)
    truth = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    out = Fp8Linear(linear)(x)
    assert out.shape == (2, 7, 512) and out.dtype == torch.bfloat16
    rel = (out.float() - truth).norm() / truth.norm()
    assert rel < 0.05, rel  # two e4m3 roundings: a few percent, far from a wrong scale (which would be ~1)


def test_quantize_blocks_swaps_large_block_linears_and_the_self_attention():
    model = MultiTalkDiT(FP8_DIT)
    replaced = quantize_blocks(model)
    block = model.blocks[0]
    # Per block: self q/k/v/o, cross q/k/v/o/k_img/v_img, ffn x2, audio q/proj: all with >= 1024 inputs here.
    linears = [m for m in block.modules() if isinstance(m, (torch.nn.Linear, Fp8Linear))]
    assert replaced == sum(isinstance(m, Fp8Linear) for b in model.blocks for m in b.modules())
    assert all(isinstance(m, Fp8Linear) == (m.in_features >= 1024) for m in linears)
    assert block.self_attn.attend is fp8_attention and block.cross_attn.attend is attention
    assert isinstance(model.head.head, torch.nn.Linear)
    # The FFN's GELU moves into the second linear's activation quantisation.
    assert isinstance(block.ffn[1], torch.nn.Identity) and block.ffn[2].gelu_input
    assert not block.ffn[0].gelu_input


def test_fp8_linear_with_gelu_input_is_gelu_then_linear():
    generator = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(2048, 256).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(256, 2048, generator=generator) * 0.02)
    x = (torch.randn(3, 2048, generator=generator) * 2).to(torch.bfloat16)
    hidden = 0.5 * x.double() * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x.double() + 0.044715 * x.double() ** 3)))
    truth = hidden @ linear.weight.double().T + linear.bias.double()
    out = Fp8Linear(linear, gelu_input=True)(x)
    rel = ((out.double() - truth).norm() / truth.norm()).item()
    assert rel < 0.05, rel
    without = ((Fp8Linear(linear)(x).double() - truth).norm() / truth.norm()).item()
    assert without > 0.2, without  # the GELU really is applied: skipping it is far off


def test_quantize_tensor_uses_the_range_and_rounds_within_e4m3_resolution():
    x = torch.randn(1, 50, 4, 16, generator=torch.Generator().manual_seed(2)) * 3
    values, descale = quantize_tensor(x)
    assert values.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert values.float().abs().max() == FP8_MAX
    assert ((values.float() * descale - x).abs() <= x.abs() * 2**-4 + descale * 2**-9).all()


def test_fp8_attention_is_softmax_attention_within_e4m3_rounding():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 32, generator=generator) for _ in range(3))
    q = q * 2  # a peaked softmax, as in the trained model
    # float64 softmax attention written out, heads kept apart
    scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / 32**0.5
    truth = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.double())
    out = fp8_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    rel = ((out.double() - truth).norm() / truth.norm()).item()
    assert 0.002 < rel < 0.08, rel  # e4m3 rounding is visible, a wrong scale (error ~1) is not


@pytest.mark.parametrize("speakers", [1, 2])
def test_fused_norms_hand_each_fp8_linear_the_rows_its_norm_and_quantisation_give(speakers):
    """On a CPU the fused norms compute what the separate ones do, so the two fp8 DiTs must agree to the bit: a norm
    feeding the wrong layer, or holding other parameters, would not."""
    generator = torch.Generator().manual_seed(5)
    weights = random_weights(dit_shapes(FP8_DIT), generator)
    separate, fused = MultiTalkDiT(FP8_DIT), MultiTalkDiT(FP8_DIT)
    for model in (separate, fused):
        model.load_state_dict(weights)
        model.to(torch.bfloat16)
    norm_x = fused.blocks[0].norm_x
    quantize_blocks(separate)
    quantize_blocks(fused, fused_norms=True)
    names = ("norm1", "norm3", "norm_x", "norm2")
    for block in fused.blocks:
        assert all(type(getattr(block, name)) is Fp8InputLayerNorm for name in names)
    assert all(type(getattr(separate.blocks[0], name)) is FP32LayerNorm for name in names)
    assert fused.blocks[0].norm_x.weight is norm_x.weight and fused.blocks[0].norm_x.bias is norm_x.bias
    assert fused.blocks[0].norm_x.weight.abs().sum() > 0 and fused.blocks[0].norm1.weight is None
    assert list(fused.state_dict()) == list(separate.state_dict())

    inputs = dit_inputs(FP8_DIT, TINY_CLIP, speakers, torch.device("cpu"), generator)
    block_calls = []
    fused.blocks[0].register_forward_pre_hook(
        lambda _, args, kwargs: block_calls.append((args, kwargs)), with_kwargs=True
    )
    with torch.no_grad():
        out = fused(**inputs)
        torch.testing.assert_close(out, separate(**inputs), rtol=0, atol=0)
        # Compiled as the service compiles a block (whole, no graph break): the quantised rows pass between modules.
        args, kwargs = block_calls[0]
        compiled = torch.compile(fused.blocks[0], fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args, **kwargs), separate.blocks[0](*args, **kwargs), rtol=0, atol=0)
