"""The serving path on a CUDA GPU: `load_pipeline` on the tiny checkpoint set as the predictor calls it (blocks
compiled, the self-attention kernel the plan and the card call for: FlashAttention 4 where it is installed and runs,
cuDNN's fp8 attention on the fp8 plan), then a one-clip video with one speaker and one with two: the kernel in place,
the video's shape, every value finite.

Where CUDA is missing the `gpu` marker skips these; with that skip lifted they run on the CPU in float32 without
compiling, which checks the tests themselves.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from wan import GenerationRequest, SamplingOptions, load_pipeline
from wan.runtime.kernels import kernel_name, self_attention_kernel
from wan.runtime.plans import FP8, RESIDENT

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FRAMES, HEIGHT, WIDTH = 9, 64, 96


@pytest.fixture(scope="module", params=[RESIDENT, FP8], ids=lambda plan: plan.name)
def pipeline(request, tiny_checkpoints):
    plan = request.param
    if plan.dit_weights == "fp8" and DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) < (8, 9):
        pytest.skip(f"{torch.cuda.get_device_name(DEVICE)} has no fp8 matmuls (needs compute capability 8.9+)")
    cuda = DEVICE.type == "cuda"
    built = load_pipeline(
        tiny_checkpoints / "Wan2.1-I2V-14B-480P", tiny_checkpoints / "MeiGen-MultiTalk", device=DEVICE,
        dtype=torch.bfloat16 if cuda else torch.float32, compile=cuda, memory_plan=plan,
    )  # fmt: skip
    yield plan, built
    built.close()


def test_the_dit_runs_the_self_attention_its_plan_and_card_call_for(pipeline):
    plan, built = pipeline
    used = kernel_name(built.dit.module.blocks[0].self_attn.attend)
    assert used == kernel_name(self_attention_kernel(plan, DEVICE))


@pytest.mark.parametrize("speakers", [1, 2])
def test_a_clip_comes_out_whole_and_finite(pipeline, speakers):
    _, built = pipeline
    config = built.dit.config
    generator = torch.Generator().manual_seed(speakers)
    audio = tuple(
        torch.randn(FRAMES, config.audio_layers, config.audio_channels, generator=generator) for _ in range(speakers)
    )
    request = GenerationRequest("two people talk", Image.new("RGB", (WIDTH, HEIGHT), (120, 100, 90)), audio)
    options = SamplingOptions(size_bucket={"0.67": [HEIGHT, WIDTH]}, frame_num=FRAMES, steps=2, seed=1)
    video = built.generate(request, options, progress=False)
    assert tuple(video.shape) == (3, FRAMES, HEIGHT, WIDTH)
    assert torch.isfinite(video).all(), f"{int((~torch.isfinite(video)).sum())} non-finite values"
