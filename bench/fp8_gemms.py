"""The fp8 linear layers of one DiT block at a clip's 32928 tokens: `torch._scaled_mm` with row-wise scales as
`Fp8Linear` calls it, with and without fast accumulation, against the bf16 matmul and the card's fp8 rate.

    python -m bench.fp8_gemms --out results/fp8_gemms.json      # < 1 min on an H100
    python -m bench.fp8_gemms --tiny --out /tmp/gemms.json      # the script itself on the CPU (bf16 only)

Per shape: median of 20 timed products after 5 warm-ups (CUDA events), TFLOP/s, and each result's distance (relative
L2) from the float32 product of the same e4m3 values and scales, so that only the accumulation differs. Random
N(0, 1) activations and N(0, 1/fan_in) weights; a kernel's time does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from wan.model.fp8_rows import quantize_rows

from . import environment

TOKENS = 32928
# (name, in, out, layers of the kind in a block): self-attention q, k, v, o; cross-attention q, o (its k, v run on 512
# text and 257 image tokens); the FFN's two; the audio cross-attention's q and o. Last, not counted in the block: the
# self-attention's q, k, v as one product, for what fusing them would give.
SHAPES = [("attn qkvo", 5120, 5120, 4), ("cross q, o", 5120, 5120, 2), ("ffn in", 5120, 13824, 1),
          ("ffn out", 13824, 5120, 1), ("audio q, o", 5120, 5120, 2),
          ("qkv as one", 5120, 15360, 0)]  # fmt: skip


def timed(fn, device: torch.device, warmup: int = 5, repeats: int = 20) -> float:
    """Median seconds of `fn()`."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return float("nan")
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    env = environment(device)
    print(f"{env['device_name']} | torch {env['torch']} | {env['date']} | commit {env['commit']}", flush=True)
    tokens = 64 if args.tiny else TOKENS
    generator = torch.Generator(device).manual_seed(0)
    rows, block = [], {"bf16": 0.0, "fp8": 0.0, "fp8 fast accumulation": 0.0}
    for name, fan_in, fan_out, count in SHAPES:
        x = torch.randn(tokens, fan_in, device=device, generator=generator, dtype=torch.bfloat16)
        w = (torch.randn(fan_out, fan_in, device=device, generator=generator) / fan_in**0.5).bfloat16()
        flop = 2 * tokens * fan_in * fan_out
        row = dict(shape=name, tokens=tokens, fan_in=fan_in, fan_out=fan_out, per_block=count)
        row["bf16_s"] = timed(lambda: x @ w.T, device)
        if device.type == "cuda":
            xq, xs = quantize_rows(x)
            wq, ws = quantize_rows(w)
            exact = (xq.float() * xs) @ (wq.float() * ws).T
            for label, fast in (("fp8", False), ("fp8 fast accumulation", True)):

                def product(fast=fast):
                    return torch._scaled_mm(
                        xq, wq.t(), scale_a=xs, scale_b=ws.T.contiguous(), out_dtype=torch.bfloat16,
                        use_fast_accum=fast,
                    )  # fmt: skip

                key = "fp8_fast_s" if fast else "fp8_s"
                row[key] = timed(product, device)
                row[key.replace("_s", "_rel")] = ((product().float() - exact).norm() / exact.norm()).item()
                block[label] += row[key] * count
        block["bf16"] += row["bf16_s"] * count
        for key in ("bf16_s", "fp8_s", "fp8_fast_s"):
            if key in row:
                row[key.replace("_s", "_tflops")] = flop / row[key] / 1e12
        rows.append(row)
        print(
            f"{name:<11} {tokens}x{fan_in}x{fan_out}: bf16 {row['bf16_s'] * 1e3:.2f} ms; fp8 "
            f"{row.get('fp8_s', float('nan')) * 1e3:.2f} ms ({row.get('fp8_tflops', 0):.0f} TFLOP/s, rel "
            f"{row.get('fp8_rel', 0):.1e}); fast accumulation {row.get('fp8_fast_s', float('nan')) * 1e3:.2f} ms "
            f"({row.get('fp8_fast_tflops', 0):.0f} TFLOP/s, rel {row.get('fp8_fast_rel', 0):.1e})",
            flush=True,
        )
    print("a block's linear layers: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in block.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(env=env, shapes=rows, block_s=block), indent=1))


if __name__ == "__main__":
    main()
