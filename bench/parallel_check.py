"""The DiT over several GPUs (`wan.runtime.workers`): the time of a pass per sequence degree and of a step for every
schedule, and the schedule the predictor would choose against the fastest measured one.

    python -m bench.parallel_check --out results/parallel.json [--compile]   # every visible GPU (at least 2)
    python -m bench.parallel_check --cpu 2 --smoke --repeats 1 --out /tmp/p.json   # the script itself: 2 CPU workers

One worker process per GPU, as the predictor runs them (`wan.runtime.workers.WorkerGroup`); the 14B DiT has random
bf16 weights built on the meta device and filled on each GPU from the same seed, so every GPU holds the same model.
A split GxD runs G passes of a step at once on G guidance groups of D GPUs each (sequence parallel inside a group); a
schedule runs a step as rounds of splits ("2x1 then 1x2"); 1x1 is the plain single-GPU path (in worker 0).

On the 81-frame 448x896 clip (32928 tokens), two speakers: one pass timed per sequence degree (what the predictor
measures to choose its schedule); then the 3-pass (quality, turbo) and the 2-pass (fast) step for every split and the
chosen schedule (one warm-up, median of --repeats); each schedule's velocities are compared with 1x1 and the largest
relative difference recorded (the assertions are in tests/gpu/test_gpu_parallel.py). Self-attention runs through
our Ulysses exchange (torch.distributed all-to-all over NCCL) around the kernel the workers choose (FA4 where
installed, else SDPA). Peak host memory (VmHWM) of each worker is recorded. Writes JSON.
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
from wan.generation.backend import ClipInputs
from wan.generation.sampling import guidance_branches
from wan.runtime.schedule import Schedule, Split, choose_schedule, describe, valid_splits
from wan.runtime.workers import WorkerGroup, WorkerOptions

from . import RandomSource, environment, full_config, relative_error, tiny_config
from .bench_dit import FULL_CLIP, TINY_CLIP, ClipShape, dit_inputs

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
    return group.velocities(latent, TIMESTEP, guidance_branches(TEXT_SCALE[passes], 4.0))


def largest_difference(velocities: dict, truth: dict) -> float:
    """The largest relative difference (2-norms) of any branch's velocity from the 1x1 run's."""
    return max(relative_error(velocities[branch], truth[branch])["rel"] for branch in truth)


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


def time_step(
    group: WorkerGroup, schedule: Schedule, cond: ClipInputs, latent: torch.Tensor, passes: int, repeats: int
) -> tuple[list[float], dict]:
    step_velocities(group, schedule, cond, latent, passes)  # warm-up
    times, velocities = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        velocities = step_velocities(group, schedule, cond, latent, passes)
        times.append(time.perf_counter() - started)
    return times, velocities


def time_schedules(devices: list[str], repeats: int, smoke: bool = False, compile: bool = False) -> dict:
    """Pass and step times for every schedule; `smoke` runs it on the tiny float32 DiT (CPU check of this script);
    `compile`: the workers' blocks compiled, as the predictor runs them."""
    if smoke:
        source = RandomSource(TINY_40_HEADS, torch.float32, SEED)
    else:
        source = RandomSource(full_config(), torch.bfloat16, SEED)
    clip = TINY_CLIP if smoke else FULL_CLIP
    heads, gpus = source.config.num_heads, len(devices)
    group = WorkerGroup(source, devices, WorkerOptions(compile=compile))
    results: dict = dict(steps={}, compiled=compile)
    try:
        started = time.perf_counter()
        group.start()
        results["start_s"] = time.perf_counter() - started
        results["workers"] = group.worker_info
        print(f"workers up in {results['start_s']:.0f} s: {group.worker_info}", flush=True)

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
                truth = velocities if schedule == (Split(1, 1),) else truth
                difference = largest_difference(velocities, truth)
                name = describe(schedule)
                print(f"{passes}-pass step, schedule {name}: median {measured[schedule]:.3f} s {times}; "
                      f"rel vs 1x1 {difference:.2g}", flush=True)  # fmt: skip
                results["steps"][f"{passes}pass {name}"] = dict(
                    median_s=measured[schedule], times_s=times, rel_vs_1x1=difference
                )
            fastest = min(measured, key=measured.get)
            one_gpu = measured[(Split(1, 1),)]
            print(f"{passes}-pass step: chosen {describe(chosen)} ({measured[chosen]:.3f} s), fastest measured "
                  f"{describe(fastest)} ({measured[fastest]:.3f} s), 1x1 {one_gpu:.3f} s: speed-up "
                  f"{one_gpu / measured[chosen]:.2f}x", flush=True)  # fmt: skip
            results[f"{passes}pass"] = dict(
                chosen=describe(chosen),
                fastest=describe(fastest),
                chosen_over_fastest=measured[chosen] / measured[fastest],
                speed_up=one_gpu / measured[chosen],
            )
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
    parser.add_argument("--compile", action="store_true", help="compile the workers' blocks")
    parser.add_argument("--smoke", action="store_true", help="the tiny DiT instead of the 14B (checks the script)")
    args = parser.parse_args(argv)

    if args.cpu:
        devices = ["cpu"] * args.cpu
    else:
        devices = [f"cuda:{i}" for i in range(args.gpus or torch.cuda.device_count())]
    if len(devices) < 2:
        parser.error(f"needs at least 2 devices, found {devices}")
    env = environment(torch.device(devices[0]))
    env.update(
        devices=devices,
        sequence_path="wan.model.sequence_parallel: Ulysses all-to-all (torch.distributed functional collectives)",
        xfuser_installed=importlib.util.find_spec("xfuser") is not None,
        xfuser_used=False,
    )
    print(f"{env['device_name']} x{len(devices)} | torch {env['torch']} | {env['date']} | commit {env['commit']}")
    print(f"sequence parallel: {env['sequence_path']}; xfuser installed: {env['xfuser_installed']} (not used)")
    started = time.perf_counter()
    results = time_schedules(devices, args.repeats, smoke=args.smoke, compile=args.compile)
    print(f"{time.perf_counter() - started:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(env=env, results=results), indent=1))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
