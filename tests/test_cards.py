"""Every card a user can pick: the plan by what the card computes (bfloat16, fp8) as well as its memory, refusals
that name the card, what it lacks and the smallest card that works, the attention kernel per architecture, and the
bf16 streamed plan equal to resident bf16 to the bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from support.golden import load_case
from wan import GenerationRequest, SamplingOptions, load_pipeline
from wan.model.attention import attention
from wan.model.fp8 import fp8_attention
from wan.runtime import kernels, placement
from wan.runtime.plans import (
    FP8,
    RESIDENT,
    STREAMED,
    STREAMED_BF16,
    Card,
    UnsupportedCard,
    plan_for_card,
)
from wan.runtime.streaming import stream_blocks

# The free GPU memory a card leaves a process (its size less the driver's share), and 64 GiB of host memory.
CARDS = {
    # name: (capability, GiB free) -> plan
    "NVIDIA GeForce RTX 3090": ((8, 6), 23.5, "streamed_bf16"),
    "NVIDIA A10": ((8, 6), 22.0, "streamed_bf16"),
    "NVIDIA RTX A6000": ((8, 6), 47.0, "streamed_bf16"),
    "NVIDIA A40": ((8, 6), 44.3, "streamed_bf16"),
    "NVIDIA A100-SXM4-40GB": ((8, 0), 39.4, "streamed_bf16"),
    "NVIDIA A100-SXM4-80GB": ((8, 0), 79.1, "resident"),
    "NVIDIA L4": ((8, 9), 22.0, "streamed"),
    "NVIDIA GeForce RTX 4090": ((8, 9), 23.0, "streamed"),
    "NVIDIA L40S": ((8, 9), 44.3, "fp8"),
    "NVIDIA H100 80GB HBM3": ((9, 0), 79.1, "resident"),
    "NVIDIA H200": ((9, 0), 139.8, "resident"),
    "NVIDIA B200": ((10, 0), 178.0, "resident"),
}


@pytest.mark.parametrize("name", list(CARDS))
def test_each_card_gets_the_fastest_plan_it_can_compute_and_hold(name):
    capability, free, expected = CARDS[name]
    plan = plan_for_card(Card(name, capability, free, host_gib=64.0))
    assert plan.name == expected
    assert plan.dit_weights == "bf16" or capability >= (8, 9)  # no fp8 on Ampere
    assert plan.gpu_gib <= free and plan.host_gib <= 64.0


def test_an_ada_card_whose_fp8_does_not_run_gets_the_bf16_plans():
    assert plan_for_card(Card("NVIDIA L40S", (8, 9), 44.3, fp8_linears=False)) == STREAMED_BF16
    assert plan_for_card(Card("NVIDIA L40S", (8, 9), 44.3, fp8_linears=True)) == FP8


def test_a_card_without_bfloat16_is_refused_naming_it_and_the_smallest_card_that_works():
    with pytest.raises(UnsupportedCard) as refused:
        plan_for_card(Card("Tesla T4", (7, 5), 15.0, host_gib=64.0))
    message = str(refused.value)
    for part in ("Tesla T4", "compute capability 7.5", "no bfloat16", "8.0+", "RTX 3090", "17 GiB", "45 GiB"):
        assert part in message, message


def test_too_little_gpu_or_host_memory_is_refused_with_what_is_needed():
    with pytest.raises(UnsupportedCard, match=r"NVIDIA A2 .*15\.0 GiB .*\(17\.14 GiB, plan 'streamed_bf16'\)"):
        plan_for_card(Card("NVIDIA A2", (8, 6), 15.0))
    with pytest.raises(UnsupportedCard, match=r"\(16\.29 GiB, plan 'streamed'\)"):
        plan_for_card(Card("NVIDIA L4", (8, 9), 15.0))
    # The streamed plans keep the blocks in host memory: 34.6 + 10.6 GiB in bf16.
    with pytest.raises(UnsupportedCard, match=r"keeps 45\.2 GiB of weights in host memory, and 32\.0 GiB"):
        plan_for_card(Card("NVIDIA GeForce RTX 3090", (8, 6), 23.5, host_gib=32.0))


def test_an_override_is_checked_against_what_the_card_computes():
    card = Card("NVIDIA A40", (8, 6), 44.3)
    with pytest.raises(ValueError, match="MULTITALK_MEMORY_PLAN=fp8: .* NVIDIA A40 .* cannot compute"):
        plan_for_card(card, "fp8", "MULTITALK_MEMORY_PLAN")
    assert plan_for_card(card, "resident") == RESIDENT  # the user's word: it may not fit
    assert plan_for_card(Card("NVIDIA L4", (8, 9), 22.0), "streamed_bf16") == STREAMED_BF16


@pytest.mark.parametrize(
    "capability, expected",
    [((8, 9), attention), ((9, 0), fp8_attention), ((10, 0), attention), ((12, 0), attention)],
    ids=["ada", "hopper", "blackwell", "blackwell-rtx"],
)
def test_fp8_attention_only_on_hopper(monkeypatch, capability, expected):
    """cuDNN's fp8 attention is built and measured for Hopper: Ada and Blackwell run fp8 linears with a bf16
    attention (FA4 where it passes its check on the card; here, without it, SDPA)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(kernels, "flash_attention_4_available", lambda device: False)
    assert kernels.self_attention_kernel(FP8, "cuda:0") is expected
    assert kernels.self_attention_kernel(STREAMED, "cuda:0") is expected
    assert kernels.self_attention_kernel(STREAMED_BF16, "cuda:0") is attention


def test_bf16_blocks_stream_bit_for_bit():
    case = load_case("dit_2p")
    inputs = {name: value for name, value in case.inputs().items() if name in (
        "x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks")}  # fmt: skip
    with torch.no_grad():
        resident = case.dit().to(torch.bfloat16)(**inputs)
        model = case.dit().to(torch.bfloat16)
        stream_blocks(model, "cpu")
        streamed = model(**inputs)
    assert torch.equal(streamed, resident)


def test_the_bf16_streamed_plan_gives_the_resident_video(tiny_weights):
    def video(plan) -> torch.Tensor:
        pipeline = load_pipeline(
            tiny_weights / "Wan2.1-I2V-14B-480P", tiny_weights / "MeiGen-MultiTalk", device="cpu",
            dtype=torch.bfloat16, memory_plan=plan,
        )  # fmt: skip
        config = pipeline.dit.config
        generator = torch.Generator().manual_seed(0)
        audio = tuple(torch.randn(5, config.audio_layers, config.audio_channels, generator=generator) for _ in range(2))
        request = GenerationRequest("two people talk", Image.new("RGB", (96, 64), (120, 100, 90)), audio)
        options = SamplingOptions(size_bucket={"1.00": [64, 96]}, frame_num=5, steps=2, seed=1)
        return pipeline.generate(request, options, progress=False)

    assert torch.equal(video(dataclasses.replace(STREAMED_BF16, vae_tiled=False)), video(RESIDENT))


def test_the_loader_refuses_a_plan_the_card_cannot_compute(monkeypatch):
    """`load_dit_for_plan` on a card checks the plan as `setup()` checks a named one."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A40")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    placement.check_device_supports(STREAMED_BF16, "cuda:0")
    with pytest.raises(ValueError, match="memory plan 'fp8' keeps the DiT in fp8, which NVIDIA A40 .* cannot compute"):
        placement.check_device_supports(FP8, "cuda:0")
    placement.check_device_supports(FP8, "cpu")  # the CPU emulates it
