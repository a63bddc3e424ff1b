"""Where one DiT pass spends its GPU time: torch.profiler over one compiled forward, kernels grouped by kind.

python -m bench.profile_dit [--fp8 [--fp8-attention triton] [--exact-accumulation] [--fused-norms]] [--layers N]
    [--out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict

import torch

from bench import build_random, full_config
from bench.bench_dit import FULL_CLIP, dit_inputs
from wan.model.dit import MultiTalkDiT
from wan.model.fp8 import quantize_blocks

# Inductor's kernels come first: their names list the fused ops ("..._scaled_mm_...", "..._cudnn_attention_...")
# although they run none of them.
KINDS = (
    ("fused elementwise (triton)", ("triton_",)),
    ("fp8 row quantisation", ("quantize_rows",)),
    ("fp8 attention (triton)", ("_fp8_flash_kernel",)),
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("matmul", ("gemm", "sm90", "cutlass", "cublas", "scaled_mm", "nvjet")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--fp8-attention", choices=("cudnn", "triton"), default="cudnn")
    parser.add_argument("--exact-accumulation", action="store_true", help="fp8 GEMMs without use_fast_accum")
    parser.add_argument("--fused-norms", action="store_true", help="LayerNorms that quantise their own output")
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--speakers", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device("cuda")
    config = dataclasses.replace(full_config(), num_layers=args.layers)
    generator = torch.Generator(device=device).manual_seed(0)
    model = build_random(lambda: MultiTalkDiT(config), device, torch.bfloat16, generator)
    if args.fp8:
        quantize_blocks(model, fast_accumulation=not args.exact_accumulation, fused_norms=args.fused_norms)
        if args.fp8_attention == "triton":
            from bench.triton_fp8_attention import triton_fp8_attention

            model.set_self_attention(triton_fp8_attention)
    model.compile_blocks()
    inputs = dit_inputs(config, FULL_CLIP, args.speakers, device, generator)
    with torch.no_grad():
        for _ in range(2):
            model(**inputs)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(**inputs)
            torch.cuda.synchronize()

    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_time_total > 0:
            per_kernel[event.key] += event.device_time_total / 1e3  # ms
    per_kind: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        per_kind[kind_of(name)] += ms
    total = sum(per_kernel.values())
    print(f"layers {args.layers} speakers {args.speakers} fp8 {args.fp8}: GPU kernel time {total:.1f} ms")
    for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {ms:9.1f} ms  {100 * ms / total:5.1f} %")
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:40]
    for name, ms in top:
        print(f"  {ms:9.2f} ms  {name[:110]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), total_ms=total, per_kind=per_kind, top=top), f, indent=1)


if __name__ == "__main__":
    main()
