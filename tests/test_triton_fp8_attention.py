"""The Triton fp8 flash attention that bench/ times against cuDNN's (`bench.triton_fp8_attention`) on the CPU, through
Triton's interpreter.

The interpreter runs the kernel's own code (tiles, masks, the online softmax, the e4m3 probabilities) with numpy; it
is chosen when Triton is imported, so each case runs in a fresh process with TRITON_INTERPRET=1. The truths are
independent of the kernel: softmax attention over the same e4m3 inputs in float64, and cases whose answer is known
by hand.
"""

from __future__ import annotations

import textwrap

import pytest

from support.triton_interpreter import run_interpreted

CASES = textwrap.dedent(
    """
    import torch
    from wan.model.fp8 import quantize_tensor
    from bench.triton_fp8_attention import fp8_flash_attention

    def inputs(q, k, v):
        (q8, dq), (k8, dk), (v8, dv) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
        descales = torch.cat([dq.reshape(1), dk.reshape(1), dv.reshape(1)])
        return (q8, k8, v8.permute(0, 2, 3, 1), descales), [t.double() * d.double() for t, d in
                                                          ((q8, dq), (k8, dk), (v8, dv))]

    def truth(q, k, v):
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)

    generator = torch.Generator().manual_seed(0)
    # 200 tokens: tiles of 64 leave 8 queries and 8 keys past the last full tile (masked keys, clipped stores);
    # 200 bytes is no multiple of 16 either, so V's transposed rows are re-padded for the descriptor.
    L, H, D = 200, 2, 128
    q, k, v = torch.randn(3, 1, L, H, D, generator=generator)
    args, exact = inputs(q, k, v)
    out = fp8_flash_attention(*args, block_m=64, block_n=64, num_warps=4)
    assert out.dtype == torch.bfloat16 and out.shape == (1, L, H, D)
    want = truth(*exact)
    rel = ((out.double() - want).norm() / want.norm()).item()
    print("random", rel)
    # e4m3 probabilities (3 mantissa bits) on outputs that average 200 random rows: a few percent.
    assert rel < 0.08, rel

    # Equal keys: every probability is exactly 1 (e4m3 holds it), so the output is V's mean over the 200 real keys,
    # padding excluded, for every query.
    k_same = k[:, :1].expand(1, L, H, D).contiguous()
    args, exact = inputs(q, k_same, v)
    out = fp8_flash_attention(*args, block_m=64, block_n=64, num_warps=4)
    mean = exact[2].mean(dim=1, keepdim=True).expand_as(out)
    error = (out.double() - mean).abs().max().item()
    print("equal keys", error)
    # The interpreter's fp8 products accumulate in half precision (on the GPU, float32): 2^-6 of the largest output
    # covers that, and is 1/25 of what counting the 56 padded keys (a mean over 256) would do.
    assert error <= 2**-6 * mean.abs().max().item(), error

    # One key far above the others for each query (q = 8 k_j for j = query's own index): the output is that V row.
    q_sharp = 8 * k / k.norm(dim=-1, keepdim=True) * D**0.5
    args, exact = inputs(q_sharp, k, v)
    out = fp8_flash_attention(*args, block_m=64, block_n=64, num_warps=4)
    want = truth(*exact)
    rel = ((out.double() - want).norm() / want.norm()).item()
    print("sharp", rel)
    assert rel < 0.03, rel
    print("ok")
    """
)


@pytest.mark.timeout(600)
def test_fp8_flash_attention_in_triton_interpreter_matches_float64_attention():
    run_interpreted(CASES)
