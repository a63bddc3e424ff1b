"""The reference's own call pattern (generate_multitalk.py) runs unchanged on the tiny checkpoint set, and the
switches it passes through `extra_args` (TeaCache, APG) and `color_correction_strength` take effect."""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import wan
from wan.generation import sampling
from src.audio import get_embedding, load_wav2vec
from wan.generation.conditioning import image_to_tensor, rgb_to_lab
from wan.configs import WAN_CONFIGS


@pytest.mark.slow
def test_reference_call_pattern(tiny_weights, tmp_path, monkeypatch):
    cwd_before = set(os.listdir())
    root = tiny_weights
    extractor, encoder = load_wav2vec(root / "chinese-wav2vec2-base")
    t = np.arange(int(0.2 * 16000)) / 16000
    for k, f0 in enumerate((180.0, 240.0)):
        speech = (0.3 * np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        torch.save(get_embedding(speech, extractor, encoder, sr=16000, device="cpu"), tmp_path / f"{k + 1}.pt")
    # A wide image picks the 0.26 bucket (320x1216) of multitalk-480.
    Image.new("RGB", (1216, 320), (90, 120, 150)).save(tmp_path / "multi.png")
    input_data = {
        "prompt": "Two people talk in a studio.",
        "cond_image": str(tmp_path / "multi.png"),
        "cond_audio": {"person1": str(tmp_path / "1.pt"), "person2": str(tmp_path / "2.pt")},
        "audio_type": "add",
        "video_audio": str(tmp_path / "sum.wav"),
    }
    args = argparse.Namespace(
        size="multitalk-480",
        frame_num=5,
        motion_frame=25,
        sample_shift=7.0,
        sample_steps=7,
        sample_text_guide_scale=5.0,
        sample_audio_guide_scale=4.0,
        base_seed=42,
        offload_model=False,
        mode="clip",
        # A threshold that random tiny weights reach (their time embedding moves ~100 % per step, not ~1 %).
        color_correction_strength=1.0,
        use_teacache=True,
        teacache_thresh=1e12,
        use_apg=True,
        apg_momentum=-0.75,
        apg_norm_threshold=55,
    )
    wan_i2v = wan.MultiTalkPipeline(
        config=WAN_CONFIGS["multitalk-14B"],
        checkpoint_dir=str(root / "Wan2.1-I2V-14B-480P"),
        device_id=0,
        rank=0,
        t5_fsdp=False,
        dit_fsdp=False,
        use_usp=False,
        t5_cpu=False,
        lora_dir=None,
        lora_scales=None,
        quant=None,
        quant_dir=None,
    )
    block_runs, apg_terms = [], []
    wan_i2v.pipeline.dit.module.blocks[0].register_forward_pre_hook(lambda module, args: block_runs.append(1))
    apg_direction = sampling.apg_direction
    monkeypatch.setattr(sampling, "apg_direction", lambda *a, **k: apg_terms.append(1) or apg_direction(*a, **k))
    video = wan_i2v.generate(
        input_data,
        size_buckget=args.size,
        motion_frame=args.motion_frame,
        frame_num=args.frame_num,
        shift=args.sample_shift,
        sampling_steps=args.sample_steps,
        text_guide_scale=args.sample_text_guide_scale,
        audio_guide_scale=args.sample_audio_guide_scale,
        seed=args.base_seed,
        offload_model=args.offload_model,
        max_frames_num=args.frame_num if args.mode == "clip" else 1000,
        color_correction_strength=args.color_correction_strength,
        extra_args=args,
    )
    assert video.shape == (3, 5, 320, 1216)
    assert torch.isfinite(video).all() and video.abs().max() <= 1
    # TeaCache: after 5 computed steps of warm-up, steps 6 and 7 reuse the cached residual in all 3 passes.
    assert len(block_runs) == 3 * 5
    # APG: a text and an audio direction per step.
    assert len(apg_terms) == 2 * 7
    # Colour correction at strength 1: every frame takes the condition image's Lab mean (its std is 0 here).
    reference = rgb_to_lab(
        ((image_to_tensor(Image.open(input_data["cond_image"]), 320, 1216)[0, :, 0] + 1) / 2).permute(1, 2, 0)
    ).mean(dim=(0, 1))
    frames = rgb_to_lab(((video.double() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)).mean(dim=(1, 2))
    torch.testing.assert_close(frames, reference.expand_as(frames), atol=0.5, rtol=0)
    assert set(os.listdir()) == cwd_before  # nothing written to the working directory
