"""Where the VAE in bands spends its time on N GPUs: one 81-frame 448x896 decode in bfloat16, channels-last.

    python -m bench.vae_bands_check --out results/bands.json [--bands 2]   # N GPUs

Rows (median of `--repeats` after a warm-up, host clock after synchronising every GPU):
- one GPU, the whole frame (`VideoVAE.decode`);
- `BandedVAE` over N GPUs;
- N threads, each decoding its band alone on its GPU (no exchange: wrong at the band edges, the bound on overlap);
- the same N band decodes one after another (the GPU work without any overlap);
- `BandedVAE` under the profiler: busy time of each GPU's kernels, host time per band thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench import environment
from bench.vae_check import WAN_VAE, build_vae
from wan.runtime import vae_bands
from wan.runtime.vae_bands import BandedVAE, band_rows


def timed(fn, devices: list[str], warmup: int, repeats: int) -> float:
    def sync() -> None:
        for device in devices:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bands", type=int, default=2)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    devices = [f"cuda:{i}" for i in range(args.bands)]
    generator = torch.Generator(devices[0]).manual_seed(0)
    base = build_vae(torch.device(devices[0]), WAN_VAE, generator).channels_last()
    banded = BandedVAE.over(base, devices).cast(torch.bfloat16)
    one = banded.replicas[0]
    latent = torch.randn(16, 1 + (args.frames - 1) // 4, 56, 112, device=devices[0], generator=generator)
    parts = latent.split(band_rows(latent.shape[-2], args.bands), dim=-2)
    rows: dict[str, object] = {}
    with torch.inference_mode():
        rows["one_gpu_s"] = timed(lambda: one.decode(latent), devices, 1, args.repeats)
        rows["banded_s"] = timed(lambda: banded.decode(latent), devices, 1, args.repeats)

        def alone() -> None:
            def run(index: int) -> torch.Tensor:
                with torch.cuda.device(devices[index]), torch.inference_mode():
                    return banded.replicas[index].decode(parts[index].to(devices[index]))

            with ThreadPoolExecutor(args.bands) as pool:
                list(pool.map(run, range(args.bands)))

        rows["bands_alone_threads_s"] = timed(alone, devices, 1, args.repeats)
        rows["bands_one_after_another_s"] = timed(
            lambda: [banded.replicas[i].decode(parts[i].to(devices[i])) for i in range(args.bands)],
            devices,
            1,
            args.repeats,
        )
        thread_cpu: dict[str, float] = {}
        original = vae_bands.VideoVAE.decode

        def counted(vae, latent_part):
            start = time.thread_time()
            try:
                return original(vae, latent_part)
            finally:
                thread_cpu[threading.current_thread().name] = time.thread_time() - start

        vae_bands.VideoVAE.decode = counted
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                banded.decode(latent)
                for device in devices:
                    torch.cuda.synchronize(device)
        finally:
            vae_bands.VideoVAE.decode = original
        rows["banded_thread_cpu_s"] = thread_cpu
        busy: dict[int, float] = {}
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                busy[event.device_index] = busy.get(event.device_index, 0.0) + event.device_time / 1e6
        rows["banded_gpu_busy_s"] = busy
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12)
        print(table)
    for key, value in rows.items():
        print(f"{key:32s} {value}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            dict(
                environment=environment(torch.device(devices[0])),
                args=vars(args) | {"out": str(args.out)},
                rows=rows,
                table=table,
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
