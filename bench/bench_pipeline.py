"""End to end on the GPU at full size with random weights: `MultiTalkPipeline.generate()` for one 81-frame clip at
448x896, every component published-size (umT5-XXL, CLIP ViT-H/14, Wan VAE, the 14B MultiTalk DiT), plus the time
to merge and restore a rank-32 step-distillation LoRA.

    python -m bench.bench_pipeline --presets fast --out F

Needs transformers and diffusers (carry diffusers as a wheel where the device lacks it). Random weights make the
video meaningless and TeaCache's skip rate unrepresentative, so the turbo preset is not timed here.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from bench import build_random, environment
from wan.model.attention import fastest_self_attention
from wan.configs import MULTITALK_14B, PRESETS
from wan.model.dit import MultiTalkDiT
from wan.model.fp8 import quantize_blocks
from wan.encoders.image import ImageEncoder, clip_vision_config
from wan.loading.lora import merge_loras
from wan.pipeline import MultiTalkPipeline
from wan.encoders.text import TextEncoder, umt5_config
from wan.testing.tiny import (
    TINY_CLIP, TINY_DIT, TINY_T5, TINY_VAE, ClipDims, T5Dims, VaeDims, clip_shapes, t5_shapes, vae_shapes,
)
from wan.encoders.vae import VideoVAE, vae_config

UMT5_XXL = T5Dims(vocab_size=256384, dim=4096, ffn_dim=10240, num_heads=64, num_layers=24)
VIT_H14 = ClipDims(
    vision_dim=1280, vision_layers=32, embed_dim=1024, text_vocab_size=250002, text_dim=1024, text_layers=24,
    text_max_len=514,
)
WAN_VAE = VaeDims(dim=96)
FULL = (UMT5_XXL, VIT_H14, WAN_VAE, MULTITALK_14B)


def meta_state_dict(shapes: dict) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def build_pipeline(
    device: torch.device, generator: torch.Generator, compile: bool, tiny: bool = False, fp8: bool = False
) -> MultiTalkPipeline:
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, UMT5EncoderModel

    # The encoders are built on the GPU by their libraries' own random init (they hold buffers), then cast.
    t5_dims, clip_dims, vae_dims, dit_config = (TINY_T5, TINY_CLIP, TINY_VAE, TINY_DIT) if tiny else FULL
    low = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        t5 = UMT5EncoderModel(umt5_config(meta_state_dict(t5_shapes(t5_dims)))).to(low).eval()
        clip = CLIPVisionModel(clip_vision_config(meta_state_dict(clip_shapes(clip_dims)))).to(low).eval()
        vae = AutoencoderKLWan(**vae_config(meta_state_dict(vae_shapes(vae_dims)))).eval()
    dit = build_random(lambda: MultiTalkDiT(dit_config), device, low, generator)
    if fp8:
        quantize_blocks(dit)
    else:
        dit.set_self_attention(fastest_self_attention(device))  # as MultiTalkPipeline(...) does
    if compile:
        dit.compile_blocks()
    text_encoder = TextEncoder(t5, tokenizer=None, text_len=dit_config.text_len)
    ids = torch.randint(0, t5_dims.vocab_size, (2, dit_config.text_len), generator=generator, device=device)
    mask = torch.zeros_like(ids)
    mask[0, :10], mask[1, :20] = 1, 1  # a short prompt and the longer negative prompt

    def encode_text(prompts: list[str]) -> list[torch.Tensor]:
        return text_encoder.encode_ids(ids, mask)

    return MultiTalkPipeline.from_components(dit, encode_text, ImageEncoder(clip), VideoVAE(vae), device)


def rank32_lora(dit: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A lightx2v-shaped LoRA: rank 32 on every linear layer of every block, in the reference's key format."""
    lora = {}
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
            prefix = f"diffusion_model.{name}"
            lora[f"{prefix}.lora_down.weight"] = 0.01 * torch.randn(
                32, module.in_features, generator=generator, device=generator.device).to(torch.bfloat16)
            lora[f"{prefix}.lora_up.weight"] = 0.01 * torch.randn(
                module.out_features, 32, generator=generator, device=generator.device).to(torch.bfloat16)
            lora[f"{prefix}.alpha"] = torch.tensor(32.0)
    return lora


def time_lora_merge(dit: torch.nn.Module, generator: torch.Generator, sync) -> dict:
    """Seconds to merge a rank-32 LoRA into every block linear and to restore the weights (copies on the host)."""
    lora = rank32_lora(dit, generator)
    sync()
    started = time.perf_counter()
    merged = merge_loras(dit, [(lora, 1.0)])
    sync()
    merge_s = time.perf_counter() - started
    started = time.perf_counter()
    merged.restore()
    sync()
    restore_s = time.perf_counter() - started
    print(f"rank-32 LoRA on {len(lora) // 3} layers: merge {merge_s:.2f} s, restore {restore_s:.2f} s", flush=True)
    return dict(lora_merge_s=merge_s, lora_restore_s=restore_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="fast")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="fp8 linears in the DiT blocks (skips the LoRA timing)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny dims on the CPU: checks the script, times nothing")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    frames, height, width = (5, 64, 96) if args.tiny else (81, 448, 896)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator(device).manual_seed(0)
    started = time.perf_counter()
    pipeline = build_pipeline(device, generator, args.compile, args.tiny, args.fp8)
    results = dict(environment=environment(device), build_s=time.perf_counter() - started, runs=[])
    print(f"built the full-size stack in {results['build_s']:.1f} s", flush=True)

    results["fp8"] = args.fp8
    if not args.fp8:  # a LoRA merges into bf16 weights, before any fp8 quantisation
        results.update(time_lora_merge(pipeline.dit, generator, sync))

    channels = (pipeline.dit.config.audio_layers, pipeline.dit.config.audio_channels)
    audio = torch.randn(frames, *channels, generator=generator, device=device).cpu()
    image = Image.new("RGB", (width, height), (120, 100, 90))
    for index, name in enumerate(args.presets.split(",")):
        preset = PRESETS[name]
        # One warm-up in all (compilation, autotuning): every preset runs the same shapes.
        for attempt in ("warm-up", "timed") if index == 0 else ("timed",):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            started = time.perf_counter()
            video = pipeline.generate(
                {"prompt": "a person talks", "cond_image": image, "cond_audio": {"person1": audio}},
                frame_num=81, size_buckget={"0.50": [height, width]}, sampling_steps=preset.sampling_steps, shift=preset.shift,
                text_guide_scale=preset.text_guide_scale, audio_guide_scale=preset.audio_guide_scale, seed=1,
                progress=False,
            )
            sync()
            seconds = time.perf_counter() - started
            run = dict(preset=name, attempt=attempt, seconds=seconds, frames=video.shape[1],
                       peak_GiB=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None, finite=bool(torch.isfinite(video).all()))
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
