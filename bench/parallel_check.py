"""The DiT over several GPUs (`wan.parallel`): correctness against one GPU, and the time of a step for every schedule.

    python -m bench.parallel_check --out $OUT/parallel.json            # every visible GPU (at least 2)
    python -m bench.parallel_check --cpu 2 --tiny-only --out /tmp/p.json  # CPU smoke test: 2 gloo workers

One worker process per GPU, as the predictor runs them (`wan.runtime.workers.WorkerGroup`); the DiT has random
weights built on the meta device and filled on each GPU from the same seed, so every GPU holds the same model. A
split GxD runs G passes of a step at once on G guidance groups of D GPUs each (sequence parallel inside a group); a
schedule runs a step as rounds of splits ("2x1 then 1x2"); 1x1 is the plain single-GPU path (in worker 0) that every
schedule is compared with.

(a) tiny DiT (2 blocks, 40 heads of 8 dims, so every sequence degree of the 14B model exists), float32: the velocity
    of every branch of a 3-pass step, 1 and 2 speakers, each split (every round the same) and each two-round
    schedule against 1x1 at rel < 1e-5 (float32 noise).
(b) 14B config (40 blocks, dim 5120), bf16, the 81-frame 448x896 clip (32928 tokens): one pass timed per sequence
    degree (what the predictor measures to choose its schedule); then the 3-pass (quality/turbo) and the 2-pass (fast)
    step timed for every split and the chosen schedule (warm-up, median of --repeats), two speakers; the schedule
    `choose_schedule` picks from the pass times against the fastest measured one; each one's velocities against 1x1
    at the bf16 bar of gpu_check (rel < 2e-2 one speaker, < 5e-2 two: near-tie speaker routing may flip a few
    tokens). With 1 speaker, one 3-pass step per schedule for accuracy only.
Self-attention runs through our Ulysses exchange (torch.distributed all-to-all over NCCL) around the local kernel the
workers choose (FA4 where installed, else SDPA); xfuser is not used. Peak host memory (VmHWM) of each worker is
reported. Prints PASS/FAIL lines and writes JSON; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from wan import configs
from wan.generation.denoise import ClipInputs, guidance_branches
from wan.runtime.schedule import Schedule, Split, candidate_schedules, choose_schedule, describe, valid_splits
from wan.runtime.workers import WorkerGroup, WorkerOptions

from . import RandomSource, environment, full_config, relative_error, tiny_config
from .bench_dit import FULL_CLIP, TINY_CLIP, ClipShape, dit_inputs
from .gpu_check import BF16_REL_TOL, Report

FP32_REL_TOL = 1e-5
SEED = 1234
# 40 heads as the 14B model, so that every sequence degree of the real model exists.
TINY_40_HEADS = dataclasses.replace(tiny_config(), dim=320, num_heads=40)
TIMESTEP = torch.tensor([992.0])  # exact in bf16
TEXT_SCALE = {3: 5.0, 2: 1.0}  # a text scale that gives that many passes


def conditioning(config: configs.DiTConfig, clip: ClipShape, speakers: int) -> tuple[ClipInputs, torch.Tensor]:
    generator = torch.Generator().manual_seed(speakers)
    inputs = dit_inputs(config, clip, speakers, torch.device("cpu"), generator)
    null = torch.randn(inputs["context"].shape, generator=generator)
    cond = ClipInputs(
        inputs["context"], null, inputs["clip_fea"], inputs["y"], inputs["audio"], inputs["ref_target_masks"]
    )
    return cond, inputs["x"]


def step_velocities(group: WorkerGroup, schedule: Schedule, cond: ClipInputs, latent, passes: int) -> dict:
    group.use_schedule(schedule)
    return group.velocities(latent, TIMESTEP, guidance_branches(TEXT_SCALE[passes]))


def compare(report: Report, name: str, velocities: dict, truth: dict, tolerance: float) -> dict:
    errors = {branch: relative_error(velocities[branch], truth[branch]) for branch in truth}
    worst = max(e["rel"] for e in errors.values())
    detail = ", ".join(f"{b} rel {e['rel']:.2g} max_abs {e['max_abs']:.2g}" for b, e in errors.items())
    report.add(name, worst < tolerance, f"{detail} (< {tolerance})", errors=errors)
    return errors


def host_memory_gib(pids: list[int]) -> list[float | None]:
    """Peak resident memory (VmHWM) of each process, GiB; None where /proc does not say."""
    peaks = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            peaks.append(int(next(row for row in status if row.startswith("VmHWM")).split()[1]) / 1024**2)
        except (OSError, StopIteration):
            peaks.append(None)
    return peaks


def check_tiny(devices: list[str], report: Report) -> dict:
    source = RandomSource(TINY_40_HEADS, torch.float32, SEED)
    group = WorkerGroup(source, devices)
    results = {}
    try:
        group.start()
        for speakers in (1, 2):
            cond, latent = conditioning(source.config, TINY_CLIP, speakers)
            group.begin_clip(cond)
            truth = step_velocities(group, (Split(1, 1),), cond, latent, 3)
            for schedule in every_schedule(len(devices), source.config.num_heads):
                if schedule != (Split(1, 1),):
                    velocities = step_velocities(group, schedule, cond, latent, 3)
                    name = f"tiny fp32 {speakers}p {describe(schedule)}"
                    results[f"{speakers}p {describe(schedule)}"] = compare(report, name, velocities, truth, FP32_REL_TOL)
            group.end_clip()
    finally:
        group.close()
    return results


def every_schedule(gpus: int, heads: int) -> list[Schedule]:
    """Each split for every round of a 3-pass step, and each schedule of two different rounds."""
    uniform = [(split,) for split in valid_splits(gpus, 3, heads)]
    return uniform + [s for s in candidate_schedules(gpus, 3, heads, set(range(1, gpus + 1))) if len(set(s)) > 1
                      and len(s) == 2]


def time_step(group: WorkerGroup, schedule: Schedule, cond, latent, passes: int, repeats: int) -> tuple[list[float], dict]:
    step_velocities(group, schedule, cond, latent, passes)  # warm-up
    times, velocities = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        velocities = step_velocities(group, schedule, cond, latent, passes)
        times.append(time.perf_counter() - started)
    return times, velocities


def check_full(devices: list[str], repeats: int, report: Report, smoke: bool = False, compile: bool = False) -> dict:
    """Part (b); `smoke` runs its code on the tiny float32 DiT instead (CPU check of this script); `compile`: the
    workers' blocks compiled, as the predictor runs them."""
    source = RandomSource(TINY_40_HEADS, torch.float32, SEED) if smoke else RandomSource(full_config(), torch.bfloat16, SEED)
    clip = TINY_CLIP if smoke else FULL_CLIP
    heads, gpus = source.config.num_heads, len(devices)
    group = WorkerGroup(source, devices, WorkerOptions(compile=compile))
    results: dict = dict(steps={}, compiled=compile)
    try:
        started = time.perf_counter()
        group.start()
        results["start_s"] = time.perf_counter() - started
        results["workers"] = group.worker_info
        print(f"14B workers up in {results['start_s']:.0f} s: {group.worker_info}", flush=True)

        cond, latent = conditioning(source.config, clip, 2)
        degrees = sorted({s.degree for s in valid_splits(gpus, 1, heads)})
        pass_seconds = group.time_passes(cond, latent, TIMESTEP, degrees, repeats=repeats)
        results["pass_seconds"] = pass_seconds
        print(f"one 2-speaker pass by sequence degree: {pass_seconds}", flush=True)

        group.begin_clip(cond)
        for passes in (3, 2):
            measured, truth = {}, None
            chosen = choose_schedule(gpus, passes, heads, pass_seconds)
            schedules = [(split,) for split in valid_splits(gpus, passes, heads)]  # every round the same split
            for schedule in schedules + ([chosen] if chosen not in schedules else []):
                times, velocities = time_step(group, schedule, cond, latent, passes, repeats)
                measured[schedule] = statistics.median(times)
                name = describe(schedule)
                print(f"{passes}-pass step, schedule {name}: median {measured[schedule]:.3f} s {times}", flush=True)
                results["steps"][f"{passes}pass {name}"] = dict(median_s=measured[schedule], times_s=times)
                if schedule == (Split(1, 1),):
                    truth = velocities
                else:
                    compare(report, f"14B bf16 2p {passes}-pass {name}", velocities, truth, BF16_REL_TOL[2])
            fastest = min(measured, key=measured.get)
            one_gpu = measured[(Split(1, 1),)]
            within = measured[chosen] <= measured[fastest] * 1.05
            report.add(
                f"14B {passes}-pass schedule choice",
                within or smoke,  # tiny CPU timings are noise: the smoke run only exercises the code
                f"chosen {describe(chosen)} ({measured[chosen]:.3f} s), fastest measured {describe(fastest)} "
                f"({measured[fastest]:.3f} s), 1x1 {one_gpu:.3f} s: speed-up {one_gpu / measured[chosen]:.2f}x"
                + (" (smoke run: not judged)" if smoke else " (chosen within 5 % of the fastest)"),
                chosen=describe(chosen),
                fastest=describe(fastest),
            )
            results[f"{passes}pass"] = dict(chosen=describe(chosen), fastest=describe(fastest))
        group.end_clip()

        cond, latent = conditioning(source.config, clip, 1)
        group.begin_clip(cond)
        truth = step_velocities(group, (Split(1, 1),), cond, latent, 3)
        for schedule in every_schedule(gpus, heads):
            if schedule != (Split(1, 1),):
                velocities = step_velocities(group, schedule, cond, latent, 3)
                compare(report, f"14B bf16 1p 3-pass {describe(schedule)}", velocities, truth, BF16_REL_TOL[1])
        group.end_clip()
        results["worker_peak_host_gib"] = host_memory_gib(group.pids)
    finally:
        group.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--cpu", type=int, default=0, help="run on this many CPU workers (gloo) instead")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each step (after one warm-up)")
    parser.add_argument("--tiny-only", action="store_true", help="skip the 14B part")
    parser.add_argument("--compile", action="store_true", help="compile the workers' blocks in part (b)")
    parser.add_argument("--smoke", action="store_true", help="run part (b) on the tiny DiT (CPU check of the script)")
    args = parser.parse_args(argv)

    if args.cpu:
        devices = ["cpu"] * args.cpu
    else:
        devices = [f"cuda:{i}" for i in range(args.gpus or torch.cuda.device_count())]
    env = environment(torch.device(devices[0]))
    env.update(
        devices=devices,
        sequence_path="wan.model.sequence_parallel: Ulysses all-to-all (torch.distributed functional collectives)",
        xfuser_installed=importlib.util.find_spec("xfuser") is not None,
        xfuser_used=False,
    )
    print(f"{env['device_name']} x{len(devices)} | torch {env['torch']} | {env['date']} | commit {env['commit']}")
    print(f"sequence parallel: {env['sequence_path']}; xfuser installed: {env['xfuser_installed']} (not used)")
    report = Report()
    results: dict = {}
    if len(devices) < 2:
        report.add("devices", False, f"needs at least 2 devices, found {devices}")
    else:
        started = time.perf_counter()
        results["tiny"] = check_tiny(devices, report)
        print(f"tiny part: {time.perf_counter() - started:.0f} s", flush=True)
        if not args.tiny_only:
            started = time.perf_counter()
            results["full"] = check_full(devices, args.repeats, report, smoke=args.smoke, compile=args.compile)
            print(f"14B part: {time.perf_counter() - started:.0f} s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = dict(env=env, results=results, checks=report.checks, failed=report.failed)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"{len(report.checks) - report.failed}/{len(report.checks)} checks passed; wrote {args.out}", flush=True)
    raise SystemExit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
