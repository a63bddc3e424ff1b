"""The memory plans on one GPU: the full 14B DiT with random weights, run resident in bf16, then streamed in bf16
from page-locked host memory under 24 GiB with fp8 kept off (the plan of Ampere cards), then as the 46 GiB plan (fp8
resident) and the 24 GiB plan (fp8 blocks streamed), each under `torch.cuda.set_per_process_memory_fraction` at its
cap.

    python -m bench.memory_check --out results/memory.json         # ~5 min on an H200
    python -m bench.memory_check --tiny --out /tmp/memory.json     # the script itself, on the CPU, seconds

The same weights throughout (one seed per tensor): built in bf16 on the GPU, moved block by block to page-locked host
memory for the bf16 streamed plan, built again, quantised in place for fp8, then each block moved to page-locked host
memory for streaming (no pageable copy). Per plan: seconds per DiT pass (81 frames at 448x896, 2
speakers; one warm-up, which compiles, then the median of 3), peak GPU memory of a pass, the text encoder's round
trip (a stand-in with umT5-XXL's tensor shapes, parked in host memory, brought in and released), peak host RSS
(VmHWM, reset per plan through /proc/self/clear_refs), and the output's distance from the resident bf16 pass. A fast
request (10 s of audio, 2 speakers: 5 clips of 4 steps x 2 passes) is estimated as 40 passes plus the text encoder's
round trip; the VAE and the image encoder are not part of this script.

Prints PASS/FAIL lines, a table and the JSON; exit 1 on any FAIL. Imports only torch and `wan/` (without
`wan/__init__`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo

from service.presets import PRESETS
from wan.configs import FPS
from wan.model import dit as dit_module
from wan.runtime import streaming
from wan.runtime.placement import free_gpu_bytes, place_dit
from wan.runtime.plans import FP8, RESIDENT, STREAMED, STREAMED_BF16, Card, choose_memory_plan, plan_for_card

from . import GIB, build_random, environment, full_config, relative_error, tiny_config
from .bench_dit import FULL_CLIP, TINY_CLIP, dit_inputs

CAPS_GIB = {"fp8": 46.0, "streamed": 24.0, "streamed_bf16": 24.0}
FAST_REQUEST_SECONDS, FRAME_NUM, MOTION_FRAME = 10, 81, 25
HOST_RSS_TARGET_BYTES = 40e9  # the 40 GB for the 24 GiB plan
RATIO_TARGETS = {"fp8": 1.1, "streamed": 2.0}  # per fast request, against the resident fp8 DiT
BF16_STREAMED_TARGET = 1.3  # a bf16 streamed pass, against the resident bf16 pass
# umT5-XXL encoder tensors (5.68 B parameters): the embedding, then per layer q, k, v, o and the gated FFN.
UMT5_XXL_SHAPES = [(256384, 4096)] + [(4096, 4096)] * 4 * 24 + [(10240, 4096)] * 2 * 24 + [(4096, 10240)] * 24
TINY_TEXT_SHAPES = [(256, 32), (32, 32), (64, 32)]


def host_rss() -> dict:
    """Current and peak resident set size of this process (bytes), from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return dict(rss=fields.get("VmRSS"), peak=fields.get("VmHWM"))


def reset_peak_rss() -> bool:
    """Lower VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def free_gpu(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_cap(device: torch.device, cap_gib: float | None) -> None:
    """Cap this process's GPU allocations at `cap_gib` (None: the whole card)."""
    if device.type != "cuda":
        return
    free_gpu(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total), device)


def weight_sums(model) -> torch.Tensor:
    """Each parameter's sum (float64): enough to tell two builds of the random weights apart."""
    with torch.no_grad():
        return torch.stack([param.double().sum() for param in model.parameters()]).cpu()


def time_passes(model, inputs: dict, device: torch.device, repeats: int) -> dict:
    """One warm-up pass (compiles), then `repeats` timed passes; the peak GPU memory of the timed ones."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        started = time.perf_counter()
        out = model(**inputs)
        sync()
        first = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            out = model(**inputs)
            sync()
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return dict(
        first_s=first,
        times_s=times,
        s_per_pass=statistics.median(times),
        peak_GiB=peak,
        finite=bool(torch.isfinite(out).all()),
        out=out.float().cpu(),
    )


def text_encoder_stand_in(shapes, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A module holding tensors of the text encoder's shapes (values unset: only their movement is timed)."""
    module = torch.nn.Module()
    module.weights = torch.nn.ParameterList(
        torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False) for shape in shapes
    )
    return module


def time_round_trip(parked, device: torch.device, repeats: int = 3) -> dict:
    """Seconds to bring the parked weights to the GPU (and drop them again): what each request pays."""
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        started = time.perf_counter()
        with parked.on_device() as module:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            on_device = all(t.device.type == device.type for t in module.parameters())
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return dict(round_trip_s=statistics.median(times), on_device=on_device, peak_GiB=peak, GiB=parked.nbytes / GIB)


def fast_request_passes() -> int:
    """DiT passes of a fast request of FAST_REQUEST_SECONDS: `plan_clips`' streaming rule (81-frame clips advancing
    by 56 frames) times the fast preset's steps and passes (text guidance 1: cond and audio-dropped passes)."""
    frames = FAST_REQUEST_SECONDS * FPS
    clips = 1 + math.ceil((frames - FRAME_NUM) / (FRAME_NUM - MOTION_FRAME))
    preset = PRESETS["multitalk"]["fast"]
    passes_per_step = 2 if preset.text_scale == 1.0 else 3
    return clips * preset.steps * passes_per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU: checks the script, times nothing")
    parser.add_argument("--no-compile", action="store_true", help="eager blocks only (quicker)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started_all = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda:0")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    compile_blocks = not args.no_compile and device.type == "cuda"
    config = tiny_config() if args.tiny else full_config()
    env = environment(device)
    print(f"{env['device_name']} | torch {env['torch']} | {env['date']} | commit {env['commit']}", flush=True)
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    results: dict = dict(env=env, args=vars(args) | {"out": str(args.out)}, plans={})
    generator = torch.Generator(device=device).manual_seed(args.seed)
    inputs = dit_inputs(config, TINY_CLIP if args.tiny else FULL_CLIP, 2, device, generator)
    text_shapes = TINY_TEXT_SHAPES if args.tiny else UMT5_XXL_SHAPES

    def recompile(model) -> None:
        torch._dynamo.reset()  # graphs traced for other modules or placements go
        if compile_blocks:
            model.compile_blocks()

    def run_plan(name: str, model, extra: dict) -> dict:
        record = time_passes(model, inputs, device, args.repeats)
        record.update(extra, host=host_rss() | dict(peak_reset_before=results["host_peak_reset"]))
        print(
            f"[{name}] {record['s_per_pass']:.3f} s/pass (first {record['first_s']:.1f} s), peak GPU "
            f"{record['peak_GiB'] or 0:.1f} GiB, peak host RSS {record['host']['peak'] / GIB:.1f} GiB",
            flush=True,
        )
        return record

    if device.type == "cuda":
        free = free_gpu_bytes(device)
        check(
            "plan choice (whole card)",
            choose_memory_plan(free).name == "resident",
            f"{free / GIB:.1f} GiB free before loading",
        )

    def build() -> dit_module.MultiTalkDiT:
        """The bf16 DiT, the same weights at every call (each tensor drawn from its own seeded stream)."""
        model = build_random(lambda: dit_module.MultiTalkDiT(config), device, dtype, generator, seed=args.seed)
        place_dit(model, RESIDENT, device)
        return model

    def stream(model, plan) -> dict:
        """Move the blocks to page-locked host memory for `plan`; what the move cost and where the blocks went."""
        started = time.perf_counter()
        place_dit(model, plan, device)
        pin_s = time.perf_counter() - started
        streamer = model.run_blocks
        host_gib = sum(host.nbytes for host in streamer.host_blocks) / GIB
        if device.type == "cuda":
            locked = all(host.buffer.is_pinned() for host in streamer.host_blocks)
            check(
                f"{plan.name} blocks page-locked",
                locked,
                f"{len(streamer.host_blocks)} buffers, {host_gib:.2f} GiB, moved in "
                f"{pin_s:.1f} s ({pin_s / host_gib:.2f} s/GiB)",
            )
        return dict(pin_s=pin_s, host_blocks_GiB=host_gib, slot_GiB=streamer.slot_bytes / GIB)

    def run_streamed(name: str, model) -> tuple[dict, torch.Tensor]:
        """Eager passes (the blocks may still hold another placement's compiled wrappers), then compiled ones."""
        with torch.compiler.set_stance("force_eager"):
            eager = run_plan(f"{name} eager", model, {})
        eager_out = eager.pop("out")
        if not compile_blocks:
            return eager, eager_out
        recompile(model)
        compiled = run_plan(f"{name} compiled", model, {})
        compiled["eager_s_per_pass"] = eager["s_per_pass"]
        out = compiled.pop("out")
        # Compiled and eager kernels round differently (fp8 rows amplify it): recorded, not a check.
        compiled["compiled_vs_eager"] = relative_error(out, eager_out)
        return compiled, out

    # 1. Resident bf16: the reference output. The whole card.
    results["host_peak_reset"] = reset_peak_rss()  # False: VmHWM is the peak since start
    started = time.perf_counter()
    model = build()
    print(
        f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters in "
        f"{time.perf_counter() - started:.1f} s; self-attention {model.blocks[0].self_attn.attend.__name__}",
        flush=True,
    )
    recompile(model)
    first_weights = weight_sums(model)
    bf16 = run_plan("resident bf16", model, {})
    reference = bf16.pop("out")
    results["plans"]["resident_bf16"] = bf16

    # 2. Streamed bf16, as a card without fp8 runs it (Ampere): the bf16 blocks in page-locked host memory. Under the
    # 24 GiB cap; then the model is built again on the GPU for the fp8 plans.
    if device.type == "cuda":
        ampere = Card("Ampere stand-in", (8, 6), CAPS_GIB["streamed_bf16"], host_gib=None, fp8_linears=False)
        check("plan choice (24 GiB, no fp8)", plan_for_card(ampere).name == "streamed_bf16", "")
    torch._dynamo.reset()
    results["host_peak_reset"] = reset_peak_rss()
    moved = stream(model, STREAMED_BF16)
    set_cap(device, None if args.tiny else CAPS_GIB["streamed_bf16"])
    streamed_bf16, streamed_bf16_out = run_streamed("streamed bf16 (24 GiB)", model)
    streamed_bf16.update(moved, cap_GiB=CAPS_GIB["streamed_bf16"])
    streamed_bf16["vs_bf16"] = relative_error(streamed_bf16_out, reference)
    results["plans"]["streamed_bf16"] = streamed_bf16
    check(
        "streamed bf16 output == resident bf16 output",
        streamed_bf16["vs_bf16"]["rel"] < 1e-3,
        f"rel {streamed_bf16['vs_bf16']['rel']:.2e}",
    )
    del model
    torch._dynamo.reset()
    set_cap(device, None)
    model = build()
    rebuilt = weight_sums(model)
    check("the same weights again", torch.equal(rebuilt, first_weights), f"{len(rebuilt)} tensors' sums")

    # 3. fp8 resident: quantised in place; the text encoder parked in host memory. Under the 46 GiB cap.
    started = time.perf_counter()
    place_dit(model, FP8, device)
    quantise_s = time.perf_counter() - started
    free_gpu(device)
    results["host_peak_reset"] = reset_peak_rss()
    started = time.perf_counter()
    text_encoder = text_encoder_stand_in(text_shapes, device, dtype)
    parked = streaming.ParkedWeights(text_encoder, device)
    park_s = time.perf_counter() - started
    pinned = all(group.buffer.is_pinned() for group in parked.groups) if device.type == "cuda" else None
    recompile(model)
    set_cap(device, None if args.tiny else CAPS_GIB["fp8"])
    if device.type == "cuda":
        check("plan choice (46 GiB)", choose_memory_plan(int(CAPS_GIB["fp8"] * GIB)).name == "fp8", "")
    fp8 = run_plan("fp8 (46 GiB)", model, dict(quantise_s=quantise_s, cap_GiB=CAPS_GIB["fp8"]))
    fp8["text_encoder"] = time_round_trip(parked, device) | dict(park_s=park_s, page_locked=pinned)
    fp8_out = fp8.pop("out")
    fp8["vs_bf16"] = relative_error(fp8_out, reference)
    results["plans"]["fp8"] = fp8

    # 4. Streamed: every block moved to page-locked host memory. Under the 24 GiB cap.
    set_cap(device, None)
    results["host_peak_reset"] = reset_peak_rss()
    moved = stream(model, STREAMED)  # the blocks are fp8 already: this only moves them
    set_cap(device, None if args.tiny else CAPS_GIB["streamed"])
    if device.type == "cuda":
        check("plan choice (24 GiB)", choose_memory_plan(int(CAPS_GIB["streamed"] * GIB)).name == "streamed", "")
    streamed, streamed_out = run_streamed("streamed (24 GiB)", model)
    streamed.update(moved, cap_GiB=CAPS_GIB["streamed"])
    streamed["text_encoder"] = time_round_trip(parked, device)
    streamed["vs_bf16"] = relative_error(streamed_out, reference)
    streamed["vs_fp8"] = relative_error(streamed_out, fp8_out)
    streamed["bit_equal_to_fp8"] = bool(torch.equal(streamed_out, fp8_out))
    results["plans"]["streamed"] = streamed
    check(
        "streamed output == fp8 resident output",
        streamed["vs_fp8"]["rel"] < 1e-3,
        f"bit-equal {streamed['bit_equal_to_fp8']}, rel {streamed['vs_fp8']['rel']:.2e}",
    )
    plans = (("resident_bf16", bf16), ("streamed_bf16", streamed_bf16), ("fp8", fp8), ("streamed", streamed))
    for name, record in plans:
        check(f"{name} output finite", record["finite"], "")

    # 5. Against the targets: per pass and per fast request (passes + the text encoder's round trip).
    passes = fast_request_passes()
    base = fp8["s_per_pass"] * passes
    summary = {}
    for name, record in plans:
        trip = record.get("text_encoder", {}).get("round_trip_s", 0.0)
        request_s = record["s_per_pass"] * passes + trip
        summary[name] = dict(
            s_per_pass=record["s_per_pass"],
            fast_request_dit_s=request_s,
            pass_ratio=record["s_per_pass"] / fp8["s_per_pass"],
            request_ratio=request_s / base,
            peak_GPU_GiB=max(record["peak_GiB"] or 0, record.get("text_encoder", {}).get("peak_GiB") or 0),
            peak_host_GiB=record["host"]["peak"] / GIB,
            rel_vs_bf16=record.get("vs_bf16", {}).get("rel", 0.0),
        )
    results["summary"] = dict(fast_request_passes=passes, plans=summary)
    if not args.tiny:
        for name, target in RATIO_TARGETS.items():
            ratio = summary[name]["request_ratio"]
            check(
                f"{name} plan speed",
                ratio <= target,
                f"{ratio:.3f}x the resident fp8 DiT per fast request "
                f"(target <= {target}); {summary[name]['pass_ratio']:.3f}x per pass",
            )
            check(
                f"{name} plan fits its cap",
                summary[name]["peak_GPU_GiB"] <= CAPS_GIB[name],
                f"peak {summary[name]['peak_GPU_GiB']:.1f} GiB of {CAPS_GIB[name]:.0f}",
            )
        ratio = streamed_bf16["s_per_pass"] / bf16["s_per_pass"]
        check(
            "streamed_bf16 plan speed",
            ratio <= BF16_STREAMED_TARGET,
            f"{ratio:.3f}x the resident bf16 pass (target <= {BF16_STREAMED_TARGET})",
        )
        check(
            "streamed_bf16 plan fits its cap",
            summary["streamed_bf16"]["peak_GPU_GiB"] <= CAPS_GIB["streamed_bf16"],
            f"peak {summary['streamed_bf16']['peak_GPU_GiB']:.1f} GiB of {CAPS_GIB['streamed_bf16']:.0f}",
        )
        check(
            "streamed plan host RSS",
            streamed["host"]["peak"] <= HOST_RSS_TARGET_BYTES,
            f"{streamed['host']['peak'] / 1e9:.1f} GB (target <= 40 GB; DiT blocks + text encoder stand-in + "
            f"the process)",
        )

    results["checks"] = [dict(name=n, ok=ok, detail=d) for n, ok, d in checks]
    results["total_s"] = time.perf_counter() - started_all
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{env['device_name']} | fast request = {passes} passes | total {results['total_s']:.0f} s")
    print(
        f"{'plan':<14} {'s/pass':>7} {'x fp8':>6} {'request_s':>9} {'x fp8':>6} {'GPU GiB':>8} {'host GiB':>8} "
        f"{'rel vs bf16':>11}"
    )
    for name, row in summary.items():
        print(
            f"{name:<14} {row['s_per_pass']:>7.3f} {row['pass_ratio']:>6.3f} {row['fast_request_dit_s']:>9.1f} "
            f"{row['request_ratio']:>6.3f} {row['peak_GPU_GiB']:>8.1f} {row['peak_host_GiB']:>8.1f} "
            f"{row['rel_vs_bf16']:>11.4f}"
        )
    print(json.dumps(dict(summary=results["summary"], checks=results["checks"]), indent=1))
    raise SystemExit(0 if all(ok for _, ok, _ in checks) else 1)


if __name__ == "__main__":
    main()
