"""Time the MultiTalk DiT on one GPU: random bf16 weights, the 81-frame 448x896 clip, 1 and 2 speakers.

    python -m bench.bench_dit --out results/dit.json [--compile] [--attention sdpa,fa4] [--fp8]
    python -m bench.bench_dit --tiny --out /tmp/bench.json     # every code path on a tiny config, CPU, seconds

Cases: `1p`, `2p` (one forward pass each), `step1p`, `step2p` (one guided denoising step: cond, drop_text and uncond
with one speaker of zeroed audio, then the guidance and the Euler update), `vae` (encode of 81 frames, decode of the
latent; only where diffusers imports). See bench/README.md for the protocol, bench/RESULTS.md for the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import time
from pathlib import Path

import torch
import torch._dynamo

from wan.generation import sampling
from wan.model.dit import MultiTalkDiT
from wan.model.fp8 import quantize_blocks

from . import (
    ATTENTION_CHOICES,
    GIB,
    attention_backend,
    backend_supports,
    build_random,
    environment,
    full_config,
    set_self_attention,
    time_calls,
    tiny_config,
)

# The reference implementation (MeiGen-AI/MultiTalk) on an H100 80GB HBM3, its own benchmark (bench/RESULTS.md): seconds
# per forward pass; the step entries add up the passes a guided step makes (cond + drop_text + uncond, uncond with
# one speaker).
REFERENCE_S = {"1p": 5.096, "2p": 5.933, "step1p": 3 * 5.096, "step2p": 2 * 5.933 + 5.096}
# The reference's bf16 VAE ran under autocast; ours casts the weights (as `wan.encoders.vae.VideoVAE` does).
REFERENCE_VAE_S = {"encode_fp32": 2.001, "decode_fp32": 3.246, "encode_bf16": 1.435, "decode_bf16": 2.330}
FLOOR_S_PER_PASS = 2.75  # ~1.83 PFLOP a pass at the H100's measured matmul and attention rates (bench/RESULTS.md)
DIT_CASES = ("1p", "2p", "step1p", "step2p")
TEXT_SCALE, AUDIO_SCALE = 5.0, 4.0  # the quality preset's guidance


@dataclasses.dataclass(frozen=True)
class ClipShape:
    frames: int
    height: int
    width: int
    text_tokens: int


FULL_CLIP = ClipShape(frames=81, height=448, width=896, text_tokens=512)
TINY_CLIP = ClipShape(frames=9, height=64, width=96, text_tokens=7)
TINY_VAE_CLIP = ClipShape(frames=5, height=32, width=32, text_tokens=0)
# (warmup, repeats, step repeats, vae repeats) when not given on the command line
DEFAULT_REPEATS = {"full": (2, 5, 3, 3), "tiny": (1, 2, 1, 1)}


def speaker_latent_masks(speakers: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """`[3, lat_h, lat_w]` (person1, person2, background) like the pipeline without boxes: all ones for one speaker;
    the left and right halves inset by 5 % for two, background where neither is."""
    if speakers == 1:
        return torch.ones(3, lat_h, lat_w)
    masks = torch.zeros(3, lat_h, lat_w)
    half, top, bottom = lat_w // 2, int(lat_h * 0.05), math.ceil(lat_h * 0.95)
    inset = max(int(half * 0.05), 0)
    masks[0, top:bottom, inset : half - inset] = 1
    masks[1, top:bottom, half + inset : lat_w - inset] = 1
    masks[2] = (masks[:2].sum(0) == 0).float()
    return masks


def dit_inputs(config, clip: ClipShape, speakers: int, device: torch.device, generator: torch.Generator) -> dict:
    """Random inputs of one clip in the shapes the pipeline feeds the DiT (float32; the DiT casts)."""
    latent_frames = (clip.frames - 1) // config.vae_scale + 1
    lat_h, lat_w = clip.height // 8, clip.width // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    first_frame = torch.zeros(4, latent_frames, lat_h, lat_w, device=device)
    first_frame[:, 0] = 1
    return dict(
        x=randn(config.out_dim, latent_frames, lat_h, lat_w),
        t=torch.tensor([992.0], device=device),
        context=randn(clip.text_tokens, config.text_dim),
        clip_fea=randn(1, 257, config.clip_dim),
        y=torch.cat([first_frame, randn(16, latent_frames, lat_h, lat_w)])[None],
        audio=randn(speakers, clip.frames, config.audio_window, config.audio_layers, config.audio_channels),
        ref_target_masks=speaker_latent_masks(speakers, lat_h, lat_w).to(device),
    )


def guided_step(model, inputs: dict, null_context: torch.Tensor) -> torch.Tensor:
    """One denoising step as the pipeline's quality preset takes it: three passes, guidance, Euler update."""
    mute = torch.zeros_like(inputs["audio"][-1:])
    v_cond = model(**inputs)
    v_drop_text = model(**{**inputs, "context": null_context})
    v_uncond = model(**{**inputs, "context": null_context, "audio": mute})
    velocity = sampling.guide(v_cond, v_drop_text, v_uncond, TEXT_SCALE, AUDIO_SCALE)
    return sampling.euler_step(inputs["x"], velocity, inputs["t"], inputs["t"] - 25.0)


def probe_attention(name: str, config, clip: ClipShape, device: torch.device, dtype: torch.dtype) -> dict:
    """Whether backend `name` alone takes each attention of the DiT at this size (else SDPA falls back)."""
    g = torch.Generator(device=device).manual_seed(7)
    lat_t, tokens_hw = (clip.frames - 1) // 4 + 1, (clip.height // 16) * (clip.width // 16)
    heads, head_dim = config.num_heads, config.head_dim

    def qkv(batch: int, lq: int, lk: int):
        return [torch.randn(batch, n, heads, head_dim, generator=g, device=device, dtype=dtype) for n in (lq, lk, lk)]

    shapes = {
        "self": (1, lat_t * tokens_hw, lat_t * tokens_hw),
        "text": (1, lat_t * tokens_hw, config.text_len),
        "image": (1, lat_t * tokens_hw, 257),
        "audio_2p": (lat_t, tokens_hw, 2 * config.context_tokens),
    }
    return {key: backend_supports(name, *qkv(*shape)) for key, shape in shapes.items()}


def run_dit_cases(label: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Build the DiT, time the selected cases under each attention backend, free it."""
    config = tiny_config() if args.tiny else full_config()
    clip = TINY_CLIP if args.tiny else FULL_CLIP
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    model = build_random(lambda: MultiTalkDiT(config), device, dtype, generator)
    if args.fp8:
        quantize_blocks(model, fast_accumulation=not args.exact_accumulation, fused_norms=args.fused_norms)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"[{label}] built {params / 1e9:.3f} B params in {time.perf_counter() - start:.1f} s", flush=True)

    records = []
    for backend in args.attention:
        # fp8 brings its own self-attention kernel; the other choices set theirs.
        if args.fp8:
            skipped = "fp8 sets the self-attention" if backend == "fa4" else None
            if backend == "fp8-triton":
                from .triton_fp8_attention import triton_fp8_attention

                model.set_self_attention(triton_fp8_attention)
        else:
            skipped = set_self_attention(model, backend)
        if skipped:
            print(f"[{label}] attention {backend} skipped: {skipped}", flush=True)
            records.append(dict(model=label, case=backend, skipped=skipped))
            continue
        if args.compile:
            torch._dynamo.reset()  # the SDPA backend is fixed when a graph is traced
            for block in model.blocks:
                block.compile(
                    fullgraph=True, dynamic=False, backend=args.compile_backend, options=args.inductor_options or None
                )
        support = probe_attention(backend, config, clip, device, dtype)
        print(f"[{label}] attention {backend} alone takes: {support}", flush=True)
        for case in (c for c in args.cases if c in DIT_CASES):
            speakers = 2 if case.endswith("2p") else 1
            inputs = dit_inputs(config, clip, speakers, device, generator)
            if case.startswith("step"):
                null_context = torch.randn(inputs["context"].shape, generator=generator, device=device)
                step = functools.partial(guided_step, model, inputs, null_context)
                record = _measure(step, device, 1, args.step_repeats, backend)
                passes = 3
            else:
                record = _measure(functools.partial(model, **inputs), device, args.warmup, args.repeats, backend)
                passes = 1
            record.update(model=label, case=case, passes=passes, attention=backend, attention_support=support)
            record["s_per_pass"] = record["median_s"] / passes
            record["reference_s"] = None if args.tiny else REFERENCE_S[case]
            records.append(record)
            print(_row(record), flush=True)
            del inputs
    del model
    if args.compile:
        torch._dynamo.reset()  # compiled graphs hold on to the blocks
    _free(device)
    return records


def _measure(fn, device: torch.device, warmup: int, repeats: int, backend: str) -> dict:
    """Peak memory from a clean slate, timing, and whether the last result is finite."""
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), attention_backend(backend):
        timing, result = time_calls(fn, device, warmup, repeats)
    record = timing.summary()
    record["finite"] = bool(torch.isfinite(result).all())
    record["peak_GiB"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return record


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_vae(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Encode of one clip's frames and decode of its latent with diffusers' AutoencoderKLWan (the Wan2.1 layout,
    built from code with random weights), in float32 and bf16 weights."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as err:
        print(f"[vae] skipped: diffusers does not import ({err})", flush=True)
        return [dict(model="vae", case="vae", skipped=f"diffusers not importable: {err}")]
    clip = TINY_VAE_CLIP if args.tiny else FULL_CLIP
    make = (lambda: AutoencoderKLWan(base_dim=4)) if args.tiny else AutoencoderKLWan  # default: the Wan2.1 VAE
    records = []
    for dtype_name in args.vae_dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        generator = torch.Generator(device=device).manual_seed(args.seed)
        vae = build_random(make, device, dtype, generator)
        latent_frames = (clip.frames - 1) // 4 + 1
        video = torch.rand(1, 3, clip.frames, clip.height, clip.width, generator=generator, device=device) * 2 - 1
        latent_shape = (1, 16, latent_frames, clip.height // 8, clip.width // 8)
        latent = torch.randn(latent_shape, generator=generator, device=device)
        video, latent = video.to(dtype), latent.to(dtype)
        jobs = dict(
            encode=functools.partial(encode_mode, vae, video), decode=functools.partial(decode_sample, vae, latent)
        )
        for op, fn in jobs.items():
            record = _measure(fn, device, 1, args.vae_repeats, "sdpa")
            key = f"{op}_{dtype_name}"
            record.update(model="vae", case=key, passes=1, attention="sdpa", s_per_pass=record["median_s"])
            record["reference_s"] = None if args.tiny else REFERENCE_VAE_S[key]
            records.append(record)
            print(_row(record), flush=True)
        del vae, video, latent, jobs
        _free(device)
    return records


def encode_mode(vae, video: torch.Tensor) -> torch.Tensor:
    return vae.encode(video).latent_dist.mode()


def decode_sample(vae, latent: torch.Tensor) -> torch.Tensor:
    return vae.decode(latent).sample


def _row(r: dict) -> str:
    if "skipped" in r:
        return f"{r['model']:<10} {r['case']:<12} skipped: {r['skipped']}"
    ref = r.get("reference_s")
    peak = "-" if r.get("peak_GiB") is None else f"{r['peak_GiB']:.1f}"
    versus = "-" if ref is None else f"{ref / r['median_s']:.2f}x"
    return (
        f"{r['model']:<10} {r['case']:<12} {r['attention']:<9} {r['median_s']:>8.3f} {min(r['times_s']):>8.3f} "
        f"{max(r['times_s']):>8.3f} {r['s_per_pass']:>8.3f} {r['first_s']:>8.2f} {peak:>7} "
        f"{'-' if ref is None else f'{ref:.2f}':>7} {versus:>7} {'' if r['finite'] else 'NON-FINITE'}"
    )


HEADER = (
    f"{'model':<10} {'case':<12} {'attention':<9} {'median_s':>8} {'min_s':>8} {'max_s':>8} {'s/pass':>8} "
    f"{'first_s':>8} {'peakGiB':>7} {'ref_s':>7} {'ref/us':>7}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the full results")
    all_cases = DIT_CASES + ("vae",)
    parser.add_argument("--cases", default=",".join(all_cases), help="comma list of " + ", ".join(all_cases))
    parser.add_argument("--attention", default="sdpa", help="comma list of " + ", ".join(ATTENTION_CHOICES))
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (regional)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--inductor-options", type=json.loads, default={}, help='JSON, e.g. {"coordinate_descent_tuning": true}'
    )
    parser.add_argument("--fp8", action="store_true", help="fp8 linear layers and self-attention")
    parser.add_argument(
        "--exact-accumulation", action="store_true", help="fp8 GEMMs without use_fast_accum (as before 2026-12-08)"
    )
    parser.add_argument(
        "--fused-norms", action="store_true", help="fp8 blocks whose LayerNorms quantise their own output (one pass)"
    )
    parser.add_argument("--warmup", type=int, help="untimed passes before each case (default 2)")
    parser.add_argument("--repeats", type=int, help="timed passes per case (default 5)")
    parser.add_argument("--step-repeats", type=int, help="timed guided steps, after one untimed (default 3)")
    parser.add_argument("--vae-dtypes", default="fp32,bf16")
    parser.add_argument("--vae-repeats", type=int, help="timed VAE calls, after one untimed (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="free text saved with the results (e.g. the commit)")
    parser.add_argument("--tiny", action="store_true", help="tiny config, float32, a few tokens (CPU check)")
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.attention = [a for a in args.attention.split(",") if a]
    args.vae_dtypes = [d for d in args.vae_dtypes.split(",") if d]
    defaults = DEFAULT_REPEATS["tiny" if args.tiny else "full"]
    for name, default in zip(("warmup", "repeats", "step_repeats", "vae_repeats"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    unknown = set(args.cases) - set(all_cases) | set(args.attention) - set(ATTENTION_CHOICES)
    if unknown:
        parser.error(f"unknown case or attention backend: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    env = environment(device)
    print(
        f"{env['device_name']} | torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}) | {env['date']} | "
        f"commit {env['commit']} | FA3 {'yes' if env['fa3_installed'] else 'no'} | {args.label}",
        flush=True,
    )
    results = dict(env=env, args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    results["reference"] = dict(dit_s=REFERENCE_S, vae_s=REFERENCE_VAE_S, floor_s_per_pass=FLOOR_S_PER_PASS)
    records = []
    started = time.perf_counter()
    if any(c != "vae" for c in args.cases):
        records += run_dit_cases(args.label or "current", args, device, dtype)
    if "vae" in args.cases:
        records += run_vae(args, device)
    results["records"] = records
    results["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))

    print(f"\n{env['device_name']} | torch {env['torch']} | {env['date']} | total {results['total_s']:.0f} s")
    ref_1p, ref_2p = REFERENCE_S["1p"], REFERENCE_S["2p"]
    print(f"floor ~{FLOOR_S_PER_PASS} s/pass; reference (H100) 1p {ref_1p:.2f} s, 2p {ref_2p:.2f} s per pass")
    print(HEADER)
    for record in records:
        print(_row(record))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
