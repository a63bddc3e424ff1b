"""The Wan VAE's speed levers on one clip, and whether batching the guidance passes would pay.

    python -m bench.vae_check --out results/vae.json [--frames 81 --height 448 --width 896] [--profile] [--bands 2]
    python -m bench.vae_check --tiny --out /tmp/vae.json   # the script itself on a CPU

VAE: the published architecture (`AutoencoderKLWan`, random weights) encodes a MultiTalk condition (25 known frames,
zeros after them, as `encode_known_frames` gives it) and decodes a random latent of the same clip, in each variant:
float32 as the reference (TF32 convolutions, torch's default), cuDNN's autotuned algorithms, channels-last-3d
tensors, bfloat16 weights and activations. Each is timed (median of CUDA-event timings after a warm-up call) and
compared with the float32 result: relative L2, largest difference and PSNR on the [-1, 1] video.

Bands (`--bands N`, N GPUs): the kept variants (channels-last, bfloat16 and float32) as one VAE on the first GPU and
as `BandedVAE` over N (each frame in N bands of rows, one per GPU), timed the same way and compared with the one-GPU
result; `--variants` off skips the single-GPU table.

Batched guidance: a step's passes differ only in their text and audio inputs, so they could run as one batch of 2
or 3. The DiT's time is its self-attention and its linears at 32928 tokens; both are timed at batch 1 (twice) and
batch 2 (once) with the 14B shapes, bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import environment, init_random_, time_calls
from wan.configs import MULTITALK_14B
from wan.encoders.vae import VideoVAE, vae_config
from wan.runtime.vae_bands import BandedVAE
from wan.testing.tiny import VaeDims, vae_shapes

WAN_VAE = VaeDims(dim=96)
KNOWN_FRAMES = 25  # the motion frames of a later MultiTalk clip


def build_vae(device: torch.device, dims: VaeDims, generator: torch.Generator) -> VideoVAE:
    from diffusers import AutoencoderKLWan

    shapes = {key: torch.empty(shape, device="meta") for key, shape in vae_shapes(dims).items()}
    with torch.device(device):
        model = AutoencoderKLWan(**vae_config(shapes))
    init_random_(model, generator)
    return VideoVAE(model)


def variant(vae: VideoVAE, dtype: torch.dtype, channels_last: bool) -> VideoVAE:
    """A copy of `vae` as the pipeline makes it: `place_vae`'s layout, `cast` for the dtype."""
    other = VideoVAE(copy.deepcopy(vae.model))
    return (other.channels_last() if channels_last else other).cast(dtype)


def compare(ours: torch.Tensor, base: torch.Tensor) -> dict:
    diff = ours.float() - base.float()
    mse = diff.square().mean().item()
    return dict(
        rel_l2=(diff.norm() / base.float().norm()).item(),
        max_abs=diff.abs().max().item(),
        psnr_db=10 * math.log10(4.0 / mse) if mse > 0 else float("inf"),  # peak-to-peak 2 on [-1, 1]
    )


def clip_inputs(args: argparse.Namespace, device: torch.device) -> tuple[VideoVAE, torch.Tensor, torch.Tensor]:
    """The VAE (random weights), a MultiTalk condition to encode and a latent to decode."""
    generator = torch.Generator(device).manual_seed(0)
    dims = WAN_VAE if not args.tiny else VaeDims(dim=8)
    base = build_vae(device, dims, generator)
    video = torch.zeros(3, args.frames, args.height, args.width, device=device)
    known = min(KNOWN_FRAMES, args.frames)
    video[:, :known] = torch.rand(3, known, args.height, args.width, device=device, generator=generator) * 2 - 1
    latent = torch.randn(
        16, 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8, device=device, generator=generator
    )
    return base, video, latent


def vae_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    base, video, latent = clip_inputs(args, device)
    variants = [
        ("float32", torch.float32, False, False),
        ("float32 + cudnn.benchmark", torch.float32, False, True),
        ("float32 channels-last", torch.float32, True, False),
        ("float32 channels-last + cudnn.benchmark", torch.float32, True, True),
        ("bfloat16", torch.bfloat16, False, False),
        ("bfloat16 channels-last + cudnn.benchmark", torch.bfloat16, True, True),
    ]
    rows, reference = [], None
    for name, dtype, channels_last, benchmark in variants:
        vae = base if (dtype, channels_last) == (torch.float32, False) else variant(base, dtype, channels_last)
        flags = (
            torch.backends.cudnn.flags(enabled=True, benchmark=benchmark)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )
        with flags:
            encode, latent_out = time_calls(lambda: vae.encode(video), device, args.warmup, args.repeats)
            decode, video_out = time_calls(lambda: vae.decode(latent), device, args.warmup, args.repeats)
        if reference is None:
            reference = latent_out, video_out
        row = dict(
            variant=name,
            encode=encode.summary(),
            decode=decode.summary(),
            latent=compare(latent_out, reference[0]),
            video=compare(video_out, reference[1]),
            clamped=(video_out.abs() >= 1).float().mean().item(),
        )
        if device.type == "cuda":
            row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 1024**3
            torch.cuda.reset_peak_memory_stats(device)
        print(
            f"{name:42s} encode {encode.median_s:6.3f} s decode {decode.median_s:6.3f} s  "
            f"video rel {row['video']['rel_l2']:.2e} psnr {row['video']['psnr_db']:.1f} dB",
            flush=True,
        )
        rows.append(row)
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            base.decode(latent)
            torch.cuda.synchronize(device)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        print(table)
        rows.append(dict(variant="profile float32 decode", table=table))
    return rows


def banded_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One GPU against `args.bands` (the pipeline's placement: channels-last, `cast` for bfloat16)."""
    base, video, latent = clip_inputs(args, device)
    devices = [device] * args.bands if device.type == "cpu" else [f"cuda:{i}" for i in range(args.bands)]
    placed = base.channels_last() if device.type == "cuda" else base
    banded = BandedVAE.over(placed, devices)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        one, many = placed.cast(dtype), banded.cast(dtype)
        timings = {}
        for name, vae in (("1 GPU", one), (f"{args.bands} bands", many)):
            encode, latent_out = time_calls(lambda: vae.encode(video), device, args.warmup, args.repeats)
            decode, video_out = time_calls(lambda: vae.decode(latent), device, args.warmup, args.repeats)
            timings[name] = encode, decode, latent_out, video_out
        (encode1, decode1, latent1, video1), (encode_n, decode_n, latent_n, video_n) = timings.values()
        row = dict(
            dtype=str(dtype),
            bands=args.bands,
            encode_1=encode1.summary(),
            decode_1=decode1.summary(),
            encode_n=encode_n.summary(),
            decode_n=decode_n.summary(),
            latent=compare(latent_n, latent1),
            video=compare(video_n, video1),
        )
        print(
            f"{str(dtype):15s} encode {encode1.median_s:6.3f} -> {encode_n.median_s:6.3f} s  decode "
            f"{decode1.median_s:6.3f} -> {decode_n.median_s:6.3f} s ({args.bands} bands)  latent rel "
            f"{row['latent']['rel_l2']:.1e}  video rel {row['video']['rel_l2']:.1e}",
            flush=True,
        )
        rows.append(row)
    return rows


def batch_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Self-attention and a block's linears at batch 1 (two calls: two passes) against batch 2 (one call)."""
    config = MULTITALK_14B if not args.tiny else None
    tokens, dim, heads, ffn = (32928, config.dim, config.num_heads, config.ffn_dim) if config else (256, 64, 4, 128)
    generator = torch.Generator(device).manual_seed(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    weights = [rand(3 * dim, dim), rand(dim, dim), rand(ffn, dim), rand(dim, ffn)]  # qkv, o, fc1, fc2

    def linears(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, weights[0])[..., :dim]
        y = F.linear(y, weights[1])
        return F.linear(F.linear(y, weights[2]), weights[3])

    def attention(q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q)

    rows = []
    for name, fn, make in (
        ("linears (qkv, o, fc1, fc2)", linears, lambda b: rand(b, tokens, dim)),
        ("self-attention", attention, lambda b: rand(b, heads, tokens, dim // heads)),
    ):
        one, two = make(1), make(2)
        single, _ = time_calls(lambda: (fn(one), fn(one)), device, args.warmup, args.repeats)
        batched, _ = time_calls(lambda: fn(two), device, args.warmup, args.repeats)
        rows.append(
            dict(
                op=name,
                two_batch1_s=single.median_s,
                one_batch2_s=batched.median_s,
                gain=single.median_s / batched.median_s - 1,
            )
        )
        print(
            f"{name:28s} 2 x batch 1 {single.median_s * 1e3:8.2f} ms   batch 2 {batched.median_s * 1e3:8.2f} ms",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=448)
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="top kernels of the float32 decode")
    parser.add_argument("--bands", type=int, default=1, help="also time the VAE in bands over this many GPUs")
    parser.add_argument("--variants", default="on", choices=["on", "off"], help="the single-GPU variants and batching")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: checks the script")
    args = parser.parse_args()
    if args.tiny:
        args.frames, args.height, args.width = 9, 32, 64
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    with torch.inference_mode():
        result = dict(environment=environment(device), args=vars(args) | {"out": str(args.out)})
        if args.variants == "on":
            result |= dict(vae=vae_rows(args, device), batched_guidance=batch_rows(args, device))
        if args.bands > 1:
            result["bands"] = banded_rows(args, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
