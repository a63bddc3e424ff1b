"""Do the DiT's blocks run as fast compiled with dynamic sizes as compiled for the one shape? (What decides whether the
warm-up can trace dynamic graphs at once instead of a static one first.)

    python -m bench.dynamic_check --out results/dynamic.json [--layers 4]
    python -m bench.dynamic_check --tiny --out /tmp/dynamic.json   # the script itself on a CPU, about a minute

A few full-size blocks (random weights, bf16, 2 speakers): compiled as the pipeline does (static, for the common
81-frame 448x896 shape), then after a forward at a small shape (torch.compile's automatic dynamic recompile: what
the warm-up leaves requests), then compiled with `dynamic=True` from the start. Each: the first call (trace and
compile) and the median of the forwards at the common shape after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch._dynamo

from bench import build_random, environment, full_config, time_calls, tiny_config
from bench.bench_dit import FULL_CLIP, TINY_CLIP, ClipShape, dit_inputs
from wan.model.dit import MultiTalkDiT
from wan.runtime.kernels import self_attention_kernel
from wan.runtime.plans import RESIDENT

SMALL_CLIP = ClipShape(frames=9, height=112, width=224, text_tokens=512)  # the warm-up's small shape


def first_call(model, inputs: dict) -> float:
    sync = torch.cuda.synchronize if inputs["x"].is_cuda else lambda: None
    sync()
    started = time.perf_counter()
    model(**inputs)
    sync()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny DiT on the CPU: checks the script")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    config = dataclasses.replace(tiny_config() if args.tiny else full_config(), num_layers=args.layers)
    generator = torch.Generator(device).manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_random(lambda: MultiTalkDiT(config), device, dtype, generator)
    model.set_self_attention(self_attention_kernel(RESIDENT, device))
    common = dit_inputs(config, TINY_CLIP if args.tiny else FULL_CLIP, 2, device, generator)
    small = dit_inputs(config, ClipShape(5, 32, 64, 7) if args.tiny else SMALL_CLIP, 2, device, generator)
    rows = []

    def measure(label: str, first_s: float) -> None:
        timing, _ = time_calls(lambda: model(**common), device, 1, args.repeats)
        rows.append(dict(label=label, first_s=first_s, median_s=timing.median_s, times_s=timing.times_s))
        print(f"{label:48s} first {first_s:6.1f} s  forward {timing.median_s * 1e3:8.1f} ms", flush=True)

    with torch.inference_mode():
        model.compile_blocks()
        measure("static (compiled for the common shape)", first_call(model, common))
        measure("after a small shape (automatic dynamic)", first_call(model, small))
        torch._dynamo.reset()
        model.compile_blocks(dynamic=True)
        measure("dynamic=True from the start", first_call(model, common))
    result = dict(environment=environment(device), args=vars(args) | {"out": str(args.out)}, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
