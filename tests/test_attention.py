"""Attention kernels: the SDPA entry point against softmax attention written out, and the choice of the blocks'
self-attention kernel (FA4 only on a CUDA device that takes it; the GPU numerics are checked by tests/gpu/)."""

import torch

from wan.model.attention import attention, flash_attention_4_available
from wan.model.dit import MultiTalkDiT
from wan.runtime.kernels import self_attention_kernel
from wan.runtime.plans import RESIDENT
from wan.testing.tiny import TINY_DIT  # dim 64, 4 heads of 16


def test_attention_is_scaled_softmax_attention_per_head():
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 5, 2, 8, generator=generator), *torch.randn(2, 1, 7, 2, 8, generator=generator)
    out = attention(q, k, v)
    for head in range(2):
        weights = torch.softmax(q[0, :, head] @ k[0, :, head].T / 8**0.5, dim=-1)
        torch.testing.assert_close(out[0, :, head], weights @ v[0, :, head], rtol=1e-5, atol=1e-6)


def test_no_flash_attention_4_off_cuda():
    assert not flash_attention_4_available(torch.device("cpu"))
    assert self_attention_kernel(RESIDENT, torch.device("cpu")) is attention


def test_set_self_attention_reaches_every_block_and_only_the_self_attention():
    model = MultiTalkDiT(TINY_DIT)
    calls = []

    def kernel(q, k, v):
        calls.append(tuple(q.shape))
        return attention(q, k, v)

    model.set_self_attention(kernel)
    assert all(block.self_attn.attend is kernel for block in model.blocks)
    assert all(block.cross_attn.attend is attention for block in model.blocks)
    x = torch.randn(1, 6, 64)
    rope = torch.ones(6, 8), torch.zeros(6, 8)  # angle 0: RoPE is the identity
    out, _ = model.blocks[0].self_attn(x, rope)
    assert calls == [(1, 6, 4, 16)] and out.shape == (1, 6, 64)
