"""Correctness of the MultiTalk DiT on the GPU, before timing it.

    python -m bench.gpu_check --golden .bench/golden --out $OUT/check.json [--attention sdpa,cudnn,flash]
    python -m bench.gpu_check --golden ../shared/golden --tiny --out /tmp/check.json   # CPU, seconds

(a) Every golden `dit_*` case under --golden: float32 on the device without TF32 against the golden output at the
    case's strict tolerance; bf16 against a float32 run of the same inputs, and against the golden (t reaches the
    time embedding in float32 on every dtype, as in the reference).
(b) The full-size DiT cut to one block (dim 5120, 40 heads, 32928 tokens), 1 and 2 speakers, random weights: bf16
    under each SDPA backend against float32 (no TF32) as truth, at the block output and at the model output; with
    --fp8 also the fp8 block (`wan.fp8.quantize_blocks`) against the same truth and against bf16.
The float32 truth of a bf16 check runs the bf16 weights, upcast, on the same inputs: only the arithmetic differs.
bf16 passes at rel = |bf16 - fp32| / |fp32| (2-norms) < 2e-2 with one speaker, < 5e-2 with two: two speakers route
each token by an argmax over a bf16 attention map, and near-ties flip a few tokens to another speaker's label
position (dit_2p on CPU: 1 and 4 of 288 tokens in its two blocks, 2.3e-2 at the output), a discrete change the
reference's bf16 run makes too.
The number of flipped tokens is reported. Prints PASS/FAIL lines, writes JSON, exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from wan.model.dit import MultiTalkDiT
from wan.model.fp8 import quantize_blocks
from wan.model.fp8_rows import quantize_rows
from wan.testing.golden import dit_config

from . import (
    ATTENTION_CHOICES,
    attention_backend,
    build_random,
    environment,
    exact_float32,
    full_config,
    relative_error,
    set_self_attention,
    tiny_config,
)
from .bench_dit import FULL_CLIP, TINY_CLIP, dit_inputs

BF16_REL_TOL = {1: 2e-2, 2: 5e-2}  # by number of speakers, see above
# fp8 is measured, not held to bf16's bar: e4m3 keeps 3 mantissa bits. This only catches a broken scale (rel ~1).
FP8_REL_TOL = 0.15
MODEL_INPUTS = ("x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks")


class Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []

    def add(self, name: str, passed: bool, detail: str, **metrics) -> None:
        self.checks.append(dict(name=name, passed=passed, detail=detail, **metrics))
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not c["passed"] for c in self.checks)


def forward_with_probes(model, inputs: dict) -> dict:
    """Output, first block's output, and each block's audio label positions (two speakers only)."""
    blocks, positions = [], []
    hooks = [model.blocks[0].register_forward_hook(lambda m, a, out: blocks.append(out))]
    for block in model.blocks:
        hooks.append(
            block.audio_cross_attn.register_forward_pre_hook(
                lambda m, a, kwargs: positions.append(kwargs.get("q_positions")), with_kwargs=True
            )
        )
    try:
        with torch.inference_mode():
            out = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(out=out, block=blocks[0], positions=positions)


def routing_flips(test: dict, truth: dict) -> list[int]:
    """Tokens per block whose label position moved to another speaker's range (a change of more than 1)."""
    pairs = zip(test["positions"], truth["positions"])
    return [int(((a.float() - b.float()).abs() > 1).sum()) for a, b in pairs if a is not None and b is not None]


def golden_cases(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("dit_") and (p / "case.json").is_file())


def check_golden_case(case_dir: Path, device: torch.device, report: Report) -> None:
    meta = json.loads((case_dir / "case.json").read_text())
    config = dit_config(meta)
    files = meta["files"]
    # A weights entry may carry a note after the path.
    weights = load_file(case_dir / files["weights"].split()[0])
    inputs = load_file(case_dir / files.get("inputs", "inputs.safetensors"))
    inputs = {k: inputs[k].to(device) for k in MODEL_INPUTS}
    golden = load_file(case_dir / files.get("outputs", "outputs.safetensors"))["out"].to(device)
    tolerance = meta["tolerance"]["per_tensor"]["out"]
    strict, loose = tolerance["strict_max_abs_err"], tolerance["loose_max_abs_err"]

    model = MultiTalkDiT(config).eval().requires_grad_(False)
    model.load_state_dict(weights, strict=True)
    model.to(device)
    with exact_float32():
        out32 = forward_with_probes(model, inputs)["out"][None]
    err = relative_error(out32, golden)
    verdict = "strict" if err["max_abs"] <= strict else "loose (suspicious)" if err["max_abs"] <= loose else "bug"
    report.add(
        f"golden {case_dir.name} fp32",
        err["max_abs"] <= strict,
        f"max_abs {err['max_abs']:.3g} (strict {strict:.3g}, loose {loose:.3g}: {verdict}), rel {err['rel']:.3g}",
        **err,
    )

    # The float32 truth gets the bf16 weights, so that only the arithmetic differs.
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    run16 = forward_with_probes(model16, inputs)
    with exact_float32():
        run32 = forward_with_probes(copy.deepcopy(model16).float(), inputs)
    vs_fp32, vs_golden = relative_error(run16["out"], run32["out"]), relative_error(run16["out"][None], golden)
    tol, flips = BF16_REL_TOL[inputs["audio"].shape[0]], routing_flips(run16, run32)
    report.add(
        f"golden {case_dir.name} bf16",
        vs_fp32["rel"] < tol,
        f"vs fp32 rel {vs_fp32['rel']:.3g} max_abs {vs_fp32['max_abs']:.3g} (< {tol}), routing flips {flips}; "
        f"vs golden rel {vs_golden['rel']:.3g} max_abs {vs_golden['max_abs']:.3g}",
        vs_fp32=vs_fp32,
        vs_golden=vs_golden,
        routing_flips=flips,
    )


def check_full_block(speakers: int, args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """One full-width block inside the real model (embeddings, audio projection, head): bf16 vs float32."""
    config = dataclasses.replace(tiny_config() if args.tiny else full_config(), num_layers=1)
    clip = TINY_CLIP if args.tiny else FULL_CLIP
    generator = torch.Generator(device=device).manual_seed(100 + speakers)
    model16 = build_random(lambda: MultiTalkDiT(config), device, torch.bfloat16, generator)
    model = copy.deepcopy(model16).float()  # the truth computes in float32 on the same (bf16) weights
    inputs = dit_inputs(config, clip, speakers, device, generator)  # t = 992 is exact in bf16
    tokens = (clip.frames - 1) // config.vae_scale + 1
    tokens *= (clip.height // 16) * (clip.width // 16)
    tol = BF16_REL_TOL[speakers]

    with exact_float32():
        run32 = forward_with_probes(model, inputs)
    for backend in args.attention:
        skipped = set_self_attention(model16, backend)
        if skipped:
            report.add(f"dim{config.dim} block {speakers}p bf16 [{backend}]", True, f"skipped: {skipped}")
            continue
        with attention_backend(backend):
            run16 = forward_with_probes(model16, inputs)
        block_err, out_err = relative_error(run16["block"], run32["block"]), relative_error(run16["out"], run32["out"])
        flips = routing_flips(run16, run32)
        report.add(
            f"dim{config.dim} block {speakers}p bf16 [{backend}] vs fp32",
            block_err["rel"] < tol and out_err["rel"] < tol,
            f"{tokens} tokens; block rel {block_err['rel']:.3g} max_abs {block_err['max_abs']:.3g}; "
            f"output rel {out_err['rel']:.3g} max_abs {out_err['max_abs']:.3g} (< {tol}); routing flips {flips}",
            block=block_err,
            output=out_err,
            attention=backend,
            routing_flips=flips,
        )
    if args.fp8:
        set_self_attention(model16, "sdpa")
        run16 = forward_with_probes(model16, inputs)  # the bf16 run the fp8 one is compared with
        model8 = copy.deepcopy(model16)
        quantize_blocks(model8)
        run8 = forward_with_probes(model8, inputs)
        vs_fp32, vs_bf16 = relative_error(run8["out"], run32["out"]), relative_error(run8["out"], run16["out"])
        block_err = relative_error(run8["block"], run32["block"])
        report.add(
            f"dim{config.dim} block {speakers}p fp8 (linears + self-attention) vs fp32",
            vs_fp32["rel"] < FP8_REL_TOL,
            f"{tokens} tokens; block rel {block_err['rel']:.3g}; output rel {vs_fp32['rel']:.3g} max_abs "
            f"{vs_fp32['max_abs']:.3g} (< {FP8_REL_TOL}); vs bf16 rel {vs_bf16['rel']:.3g}; routing flips "
            f"{routing_flips(run8, run32)}",
            block=block_err,
            output=vs_fp32,
            vs_bf16=vs_bf16,
            routing_flips=routing_flips(run8, run32),
        )
        del model8
    del model, model16
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_quantize_rows(device: torch.device, report: Report) -> None:
    """The one-pass row quantisation (Triton on CUDA) against its torch arithmetic on the CPU: same bits."""
    if device.type != "cuda":
        return
    generator = torch.Generator().manual_seed(5)
    for rows, cols, gelu in ((333, 5120, False), (257, 13824, True), (64, 1024, False)):
        # Rows of very different magnitudes, as tokens are.
        x = (torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 3, rows)[:, None]).bfloat16()
        values, scales = torch.ops.multitalk.quantize_rows(x.to(device), gelu)
        ref_values, ref_scales = quantize_rows(x, gelu=gelu)
        same = (values.cpu().float() == ref_values.float()).float().mean().item()
        scale_err = ((scales.cpu() - ref_scales).abs() / ref_scales).max().item()
        report.add(
            f"quantize_rows {rows}x{cols}{' gelu' if gelu else ''} cuda vs torch",
            same == 1.0 and scale_err == 0.0,
            f"{same:.5f} of the e4m3 values equal, scales rel {scale_err:.2g}",
            same=same,
            scale_rel=scale_err,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", type=Path, required=True, help="folder holding the golden dit_* cases")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attention", default="sdpa,cudnn,flash", help="comma list of " + ", ".join(ATTENTION_CHOICES))
    parser.add_argument("--tiny", action="store_true", help="tiny config for part (b) (CPU check)")
    parser.add_argument("--fp8", action="store_true", help="also the fp8 blocks (wan.model.fp8) in part (b)")
    args = parser.parse_args(argv)
    args.attention = [a for a in args.attention.split(",") if a]
    if set(args.attention) - set(ATTENTION_CHOICES):
        parser.error(f"unknown attention backend in {args.attention}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"{env['device_name']} | torch {env['torch']} | {env['date']} | commit {env['commit']}", flush=True)
    report = Report()
    cases = golden_cases(args.golden) if args.golden.is_dir() else []
    if not cases:
        report.add("golden cases", False, f"no dit_* case under {args.golden}")
    for case_dir in cases:
        check_golden_case(case_dir, device, report)
    if args.fp8:
        check_quantize_rows(device, report)
    for speakers in (1, 2):
        check_full_block(speakers, args, device, report)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(env=env, checks=report.checks, failed=report.failed), indent=1))
    print(f"{len(report.checks) - report.failed}/{len(report.checks)} checks passed; wrote {args.out}", flush=True)
    raise SystemExit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
