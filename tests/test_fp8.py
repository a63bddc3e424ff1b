"""fp8 linear layers: quantisation error within e4m3's resolution, module swap keeps the model's behaviour close."""

import torch

from wan.fp8 import FP8_MAX, Fp8Linear, quantize_blocks, quantize_rows


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


def test_quantize_blocks_swaps_only_large_block_linears():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(1024, 64), torch.nn.Linear(64, 8))])
    model.head = torch.nn.Linear(1024, 4)
    assert quantize_blocks(model) == 1
    assert isinstance(model.blocks[0][0], Fp8Linear) and isinstance(model.blocks[0][1], torch.nn.Linear)
    assert isinstance(model.head, torch.nn.Linear)
