"""The serving path on the GPU: the pipeline built from a checkpoint folder as the predictor builds it
(compiled blocks, FA4 self-attention where it passes its self-check, or fp8), then two short clips, one and two
speakers. Meant for the tiny set, which any machine can write:

    python -m wan.testing.tiny /tmp/tiny && python -m bench.pipeline_check --weights /tmp/tiny [--fp8]

Prints the self-attention kernel in use and, per clip, its shape, seconds and whether every value is finite; exits
1 if a clip is not finite.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from PIL import Image

from wan import GenerationRequest, SamplingOptions, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="folder written by `python -m wan.testing.tiny`")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu checks the script itself (no compile)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    started = time.perf_counter()
    pipeline = load_pipeline(
        args.weights / "Wan2.1-I2V-14B-480P", args.weights / "MeiGen-MultiTalk",
        device=args.device, compile=args.device == "cuda", fp8=args.fp8,
    )
    kernel = pipeline.dit.blocks[0].self_attn.attend.__name__
    print(f"built in {time.perf_counter() - started:.1f} s; self-attention: {kernel}", flush=True)
    config = pipeline.dit.config
    generator = torch.Generator().manual_seed(0)
    failed = False
    for speakers in (1, 2):
        audio = tuple(
            torch.randn(9, config.audio_layers, config.audio_channels, generator=generator) for _ in range(speakers)
        )
        started = time.perf_counter()
        request = GenerationRequest("two people talk", Image.new("RGB", (96, 64), (120, 100, 90)), audio)
        options = SamplingOptions(size_bucket={"0.67": [64, 96]}, frame_num=9, steps=2, seed=1)
        video = pipeline.generate(request, options, progress=False)
        finite = bool(torch.isfinite(video).all())
        failed |= not finite
        print(f"{speakers} speaker(s): video {tuple(video.shape)} in {time.perf_counter() - started:.1f} s, "
              f"finite {finite}", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
