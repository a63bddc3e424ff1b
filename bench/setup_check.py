"""`Runner.setup()` from the published files on a local disk, timed as a new container pays it: without and with the
compile cache of an earlier start; then one short `fast` request and one short `turbo` request through `run()`, so
that the LoRA merge and its exact undoing read the files as in production.

    python -m bench.setup_check --out results/setup.json [--dir /tmp] [--gpus 1,2]   # ~70 GB of free disk
    python -m bench.setup_check --tiny --out /tmp/setup.json                   # the script itself on a CPU

The set is the published layout at the published sizes with random weights (the DiT in bf16 shards to fit the
disk; InfiniteTalk's audio-layer files are links to MultiTalk's, which `setup()` only checks for). Each setup runs in
a new process with its own empty inductor cache (a new container), the page cache warm from the writing. Per setup:
the seconds from the process's start (imports included) to the end of `setup()`, and the log's timeline (weights
loaded, warm-up, compile cache loaded or saved).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import environment
from bench.bench_request import EXAMPLE_IMAGE, UMT5_XXL, VIT_H14, WAN_VAE, save, speech
from service.settings import COMPILE_CACHE_ENV, GPUS_ENV
from wan.configs import MULTITALK_14B
from wan.loading.checkpoints import (
    FAST_LORA_DIR_NAME, FAST_LORA_NAME, INFINITETALK_DIR_NAME, INFINITETALK_FILES, MULTITALK_DIR_NAME,
    MULTITALK_WEIGHTS_NAME, WAN_DIR_NAME, WAV2VEC_DIR_NAME, WanFiles,
)  # fmt: skip
from src.audio.kokoro_layout import KOKORO_DIR_NAME, TAGGER_DIR_NAME, kokoro_config, write_kokoro
from src.audio.tiny import english_and_mandarin_symbols, write_tiny_speech, write_tiny_tagger
from wan.testing.tiny import (
    clip_shapes, random_weights, t5_shapes, vae_shapes, write_dit, write_fast_lora, write_t5_tokenizer,
    write_tiny_checkpoints, write_wav2vec,
)  # fmt: skip

DIT_SHARDS = 7  # as published (there in float32, ~10 GB each)
LORA_RANK = 32

# Runs in the new process: setup, then the requests; prints one JSON line.
SETUP = """
import json, logging, sys, time
started = time.perf_counter()
timeline = []
class Timeline(logging.Handler):
    def emit(self, record):
        timeline.append((round(time.perf_counter() - started, 1), record.getMessage()[:200]))
logging.getLogger().addHandler(Timeline())
logging.getLogger().setLevel(logging.INFO)
from predict import Runner
from bench.bench_request import run_arguments
runner = Runner()
runner.setup(weights=sys.argv[1])
result = dict(setup_s=time.perf_counter() - started, timeline=timeline[:], requests=[])
for inputs in json.loads(sys.argv[2]):
    timeline.clear()
    began = time.perf_counter()
    runner.run(**run_arguments(inputs))
    result["requests"].append(dict(inputs=inputs, total_s=time.perf_counter() - began,
                                   log=[line for line in timeline if not line[1].startswith("step ")]))
print("RESULT " + json.dumps(result))
"""


def write_published_set(root: Path, device: torch.device, tiny: bool) -> float:
    """The published layout with random weights (the tiny set with `tiny`); seconds taken."""
    started = time.perf_counter()
    if tiny:
        write_tiny_checkpoints(root)
        write_tiny_speech(root)
        return time.perf_counter() - started
    generator = torch.Generator(device).manual_seed(0)
    wan = WanFiles(root / WAN_DIR_NAME)
    wan.root.mkdir(parents=True, exist_ok=True)
    write_dit(wan.root, root / MULTITALK_DIR_NAME, MULTITALK_14B, generator, torch.bfloat16, DIT_SHARDS)
    torch.save(on_cpu(random_weights(t5_shapes(UMT5_XXL), generator, torch.bfloat16)), wan.t5)
    torch.save(on_cpu(random_weights(clip_shapes(VIT_H14), generator, torch.float16)), wan.clip)
    torch.save(on_cpu(random_weights(vae_shapes(WAN_VAE), generator)), wan.vae)
    write_t5_tokenizer(wan.t5_tokenizer)
    pretraining = {"architectures": ["Wav2Vec2ForPreTraining"]}
    write_wav2vec(root / WAV2VEC_DIR_NAME, torch.Generator().manual_seed(4), pretraining)
    lora = root / FAST_LORA_DIR_NAME / FAST_LORA_NAME
    write_fast_lora(lora, MULTITALK_14B, torch.Generator().manual_seed(5), LORA_RANK)
    for relative in INFINITETALK_FILES.values():
        (root / INFINITETALK_DIR_NAME / relative).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / MULTITALK_DIR_NAME / MULTITALK_WEIGHTS_NAME, root / INFINITETALK_DIR_NAME / relative)
    # Text to speech: Kokoro at its published size; the tagger's size does not change the start.
    write_kokoro(root / KOKORO_DIR_NAME, kokoro_config(english_and_mandarin_symbols(), published_size=True))
    write_tiny_tagger(root / TAGGER_DIR_NAME)
    return time.perf_counter() - started


def on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.cpu() for key, value in tensors.items()}


def run_setup(weights: Path, requests: list[dict], env: dict[str, str], timeout: float) -> dict:
    """A new process (a new container) that sets the runner up and serves `requests`."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", SETUP, str(weights), json.dumps(requests)], env=os.environ | env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"setup process failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT ")) | dict(process_s=time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the set (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=3.0, help="speech of the short requests (one clip)")
    parser.add_argument(
        "--requests",
        default="fast,turbo",
        help="after the second setup: fast (4 steps), turbo (with 4 steps: the LoRA undone from the files)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny set on the CPU: checks the script")
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds per setup process")
    parser.add_argument(
        "--gpus",
        default="1",
        help="comma list: the DiT on this many GPUs (MULTITALK_GPUS), two "
        "starts each, each count with a compile cache folder of its own",
    )
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    results: dict = dict(environment=environment(device), args=vars(args) | {"out": str(args.out)})
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        work = Path(scratch)
        results["write_s"] = write_published_set(work / "weights", device, args.tiny)
        results["set_GB"] = sum(p.stat().st_size for p in (work / "weights").rglob("*") if p.is_file()) / 1e9
        print(f"wrote {results['set_GB']:.1f} GB in {results['write_s']:.0f} s", flush=True)
        audio = work / "speech.wav"
        import soundfile

        soundfile.write(audio, speech(args.seconds, 130), 16000)
        short = dict(image=str(EXAMPLE_IMAGE), audio=str(audio), seed=1)
        presets = dict(fast=dict(fast=True), turbo=dict(turbo=True, sampling_steps=4))
        requests = [short | presets[name] for name in args.requests.split(",") if name]
        for gpus in args.gpus.split(","):
            env = {GPUS_ENV: gpus, COMPILE_CACHE_ENV: str(work / f"compile-cache-{gpus}")}
            for label, served in (("first start (no compile cache)", []), ("next start (compile cache)", requests)):
                # A new container: its own empty inductor cache; only the compile cache folder outlives it.
                inductor = tempfile.mkdtemp(dir=work, prefix="inductor-")
                record = run_setup(work / "weights", served, env | {"TORCHINDUCTOR_CACHE_DIR": inductor}, args.timeout)
                results.setdefault("starts", []).append(dict(label=f"{gpus} GPU: {label}") | record)
                print(f"{gpus} GPU: {label}: setup {record['setup_s']:.1f} s; requests "
                      f"{[round(r['total_s'], 1) for r in record['requests']]}", flush=True)  # fmt: skip
                save(results, args.out)
    save(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
