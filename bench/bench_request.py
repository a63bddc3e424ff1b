"""A request exactly as Cog runs it, on the GPU: `Runner.setup()`, then `run()` unchanged, at full size.

    python -m bench.bench_request --out results/request.json [--presets fast] [--fp8 off,on] [--seconds 10]
    python -m bench.bench_request --out results/request.json --gpus 2 [--fp8 on] [--vae-bands on,off]
    python -m bench.bench_request --out results/example.json --example   # the reference's own example's inputs
    python -m bench.bench_request --tiny --out /tmp/request.json         # the script itself on a CPU, seconds

The runner is set up on the tiny set (`python -m wan.testing.tiny`), then its components become the published sizes with
random weights built on the GPU (the same classes the loaders build: the 14B DiT, umT5-XXL, CLIP ViT-H/14, the Wan
VAE, wav2vec2-base; a rank-32 LoRA on every block linear stands in for lightx2v's), compiled and warmed up as
`setup()` does it; `run()` then serves each request as in production: two speakers (`para`, two tracks of
`--seconds` of synthetic speech) on the reference example's 16:9 picture (the 448x896 bucket). Per request: the
stage table the runner logs (audio decode, wav2vec2, T5, CLIP, VAE encode, DiT passes, VAE decode, colour
correction, mp4), the total, the runner's own time estimate, peak GPU memory, seconds of compute per second of video.
`--fp8 on` quantises the DiT after the bf16 requests (the fast LoRA stays merged), recompiles and warms up again;
with `--gpus 2` the workers start on the fp8 memory plan instead; `--fused-norms` (one GPU) quantises with the
LayerNorms that quantise their own output (`quantize_blocks(fused_norms=True)`). With `--gpus 2`, `--vae-bands on,off`
serves the requests with the VAE in bands over the GPUs (as `setup()` places it), then again with the VAE on the first
GPU alone (as before the bands).
`--dub` serves InfiniteTalk dubbing requests instead: `model=infinitetalk` and a `--seconds` long source video (H.264
at 450x800, its own soundtrack the one speaker's speech), no image or audio input; the DiT gets three random
audio-layer sets on disk (MultiTalk's and InfiniteTalk's two), so each request pays the switch as in production.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from bench import RandomSource, environment
from wan.configs import FPS, MULTITALK_14B
from wan.encoders.image import clip_vision_config
from wan.encoders.text import umt5_config
from wan.encoders.vae import VideoVAE, vae_config
from service.settings import GPUS_ENV
from src.video.mp4 import write_mp4
from wan.loading.audio_layers import AudioLayers, AudioLayerSet
from wan.loading.checkpoints import is_multitalk_key
from wan.loading.dit_weights import DiTWeights
from wan.loading.lora import LoraSet
from wan.model.dit import MultiTalkDiT
from wan.model.fp8 import quantize_blocks
from wan.runtime.local import LocalDiT
from wan.runtime.placement import place_vae, plan_for_device
from wan.runtime.plans import FP8
from wan.runtime.vae_bands import BandedVAE
from wan.runtime.workers import WorkerGroup, WorkerOptions, visible_devices
from src.audio.tiny import write_tiny_speech
from wan.testing.tiny import (
    TINY_DIT, ClipDims, T5Dims, VaeDims, clip_shapes, t5_shapes, vae_shapes, write_tiny_checkpoints,
)  # fmt: skip

UMT5_XXL = T5Dims(vocab_size=256384, dim=4096, ffn_dim=10240, num_heads=64, num_layers=24)
VIT_H14 = ClipDims(
    vision_dim=1280,
    vision_layers=32,
    embed_dim=1024,
    text_vocab_size=250002,
    text_dim=1024,
    text_layers=24,
    text_max_len=514,
)
WAN_VAE = VaeDims(dim=96)
EXAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "examples"
EXAMPLE_IMAGE = EXAMPLES / "multi" / "1" / "multi1.png"
STAGES = re.compile(r"^wrote (\d+) frames (\d+)x(\d+) in ([\d.]+)s \((.*)\)$")
ESTIMATE = re.compile(r"^estimate: ([\d.]+) s")


class Log(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def speech(seconds: float, pitch: float, sample_rate: int = 16000) -> np.ndarray:
    """A voiced, vowel-like tone with a syllable envelope (as the HTTP tests' speech)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    voice = sum(np.sin(2 * np.pi * k * pitch * t) / k for k in range(1, 12))
    return (0.3 * voice / np.abs(voice).max() * np.sin(np.pi * 4 * t) ** 2).astype(np.float32)


def meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def full_size(
    service, device: torch.device, generator: torch.Generator, work: Path, tiny: bool, gpus: int, fp8: bool = False
) -> float:
    """Give the runner's pipeline published-size components with random weights; seconds taken. The DiT's weights
    come from a `RandomSource`, which draws any tensor again on demand as the checkpoint reader reads it back (LoRA
    merges undone and merged into fp8 weights as in production). With `gpus` > 1 the DiT lives in one worker process
    per GPU as `setup()` starts them, each building the random DiT on its GPU (`fp8`: by the fp8 memory plan, as
    `MULTITALK_MEMORY_PLAN=fp8` places it), and the VAE runs in bands over the GPUs."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    started = time.perf_counter()
    pipeline = service.pipeline
    config = TINY_DIT if tiny else MULTITALK_14B
    dtype = torch.float32 if tiny else torch.bfloat16
    if not tiny:
        with torch.device(device):
            pipeline.text_encoder.model = UMT5EncoderModel(umt5_config(meta(t5_shapes(UMT5_XXL)))).to(dtype).eval()
            pipeline.image_encoder.model = CLIPVisionModel(clip_vision_config(meta(clip_shapes(VIT_H14)))).half().eval()
            pipeline.vae = VideoVAE(AutoencoderKLWan(**vae_config(meta(vae_shapes(WAN_VAE)))))
            # chinese-wav2vec2-base: the base config
            service.wav2vec = Wav2Vec2Model(Wav2Vec2Config()).to(device).eval()
        pipeline.text_encoder.text_len = config.text_len
        place_vae(pipeline.vae, plan_for_device(device))
    if gpus > 1:
        pipeline.close()
        options = WorkerOptions(compile=device.type == "cuda", memory_plan=FP8 if fp8 else plan_for_device(device))
        devices = ["cpu"] * gpus if device.type == "cpu" else visible_devices()[:gpus]
        pipeline.dit = WorkerGroup(RandomSource(config, dtype), devices, options)
        pipeline.dit.start()
        pipeline.vae = BandedVAE.over(pipeline.vae, devices)  # as `load_pipeline` on GPUs (on the CPU: the script)
    else:
        source = RandomSource(config, dtype)
        dit = source.build(device)  # placed for the resident plan: the fastest self-attention kernel
        if device.type == "cuda":
            dit.compile_blocks()
        # LoRAs undone by drawing the tensors again, as production re-reads them; audio-layer sets not benchmarked.
        pipeline.dit = LocalDiT(dit, DiTWeights(LoraSet(dit, reload=source.tensor_reader(device))))
    if not tiny:
        service.size_buckets = {}  # the published bucket tables (the tiny set's thumbnails otherwise)
    lora = {}
    with torch.device("meta"):
        linears = MultiTalkDiT(config).named_modules()
    for name, module in linears:
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
            key = f"diffusion_model.{name}"
            lora[f"{key}.lora_down.weight"] = 0.01 * torch.randn(
                32, module.in_features, generator=generator, device=device
            ).to(dtype)
            lora[f"{key}.lora_up.weight"] = 0.01 * torch.randn(
                module.out_features, 32, generator=generator, device=device
            ).to(dtype)
    from safetensors.torch import save_file

    service.fast_lora = work / "fast_lora.safetensors"
    save_file({k: v.cpu().contiguous() for k, v in lora.items()}, service.fast_lora)
    return time.perf_counter() - started


def random_audio_sets(service, work: Path, generator: torch.Generator) -> None:
    """MultiTalk's audio layers (the random ones the DiT holds) and two InfiniteTalk sets (those plus noise) as
    files, switched by `AudioLayers` as the loader's sets are."""
    from safetensors.torch import save_file

    dit = service.pipeline.dit.module
    audio = {key: value.detach().cpu().contiguous() for key, value in dit.state_dict().items() if is_multitalk_key(key)}
    sets = {}
    for name in ("multitalk", "infinitetalk-single", "infinitetalk-multi"):
        noisy = name != "multitalk"
        tensors = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator, device=generator.device).cpu().to(v.dtype)
            if noisy
            else v
            for k, v in audio.items()
        }
        save_file(tensors, work / f"{name}.safetensors")
        sets[name] = AudioLayerSet(name, work / f"{name}.safetensors", float32_norm=noisy)
    weights = service.pipeline.dit.weights
    service.pipeline.dit.weights = DiTWeights(weights.loras, AudioLayers(dit, sets))


def reference_example() -> dict:
    """`run()`'s inputs for the reference's `multitalk_example_1.json` (its boxes are [row_min, col_min, row_max,
    col_max]; ours x1,y1,x2,y2)."""
    spec = json.loads((EXAMPLES / "multitalk_example_1.json").read_text())
    folder = EXAMPLES.parent  # the json's paths start with "examples/"
    boxes = {k: f"{b[1]},{b[0]},{b[3]},{b[2]}" for k, b in spec["bbox"].items()}
    return dict(
        image=str(folder / spec["cond_image"]),
        audio=str(folder / spec["cond_audio"]["person1"]),
        second_audio=str(folder / spec["cond_audio"]["person2"]),
        prompt=spec["prompt"],
        audio_type=spec["audio_type"],
        person1_bbox=boxes["person1"],
        person2_bbox=boxes["person2"],
        seed=1,
    )


def source_video(path: Path, soundtrack: Path, seconds: float) -> Path:
    """A moving colour field with the speech as its soundtrack, H.264 + AAC as a phone would record it."""
    frames = round(seconds * FPS)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 450), torch.linspace(-1, 1, 800), indexing="ij")
    phase = torch.arange(frames).view(-1, 1, 1) / FPS
    video = torch.stack([torch.sin(3 * x + phase), torch.cos(2 * y - phase), torch.sin(x * y + 0.5 * phase)])
    return write_mp4(0.8 * video, path, soundtrack, fps=FPS)


def run_arguments(inputs: dict) -> dict:
    """`run()`'s keyword arguments for these inputs, checked and completed with the defaults as cog does it."""
    from cog import _inspector

    return _inspector.check_input(_inspector.create_predictor("predict", "Runner").inputs, inputs)


def request(runner, log: Log, inputs: dict, label: str, device: torch.device) -> dict:
    kwargs = run_arguments(inputs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.lines.clear()
    started = time.perf_counter()
    runner.run(**kwargs)
    total = time.perf_counter() - started
    wrote = next(STAGES.match(line) for line in log.lines if STAGES.match(line))
    frames = int(wrote.group(1))
    parts = (part.rsplit(" ", 1) for part in wrote.group(5).split(", "))
    stages = {name: float(seconds.rstrip("s")) for name, seconds in parts}
    estimate = next((float(m.group(1)) for m in map(ESTIMATE.match, log.lines) if m), None)
    record = dict(
        label=label,
        total_s=total,
        frames=frames,
        video_s=frames / FPS,
        size=f"{wrote.group(2)}x{wrote.group(3)}",
        stages=stages,
        estimate_s=estimate,
        model_s=sum(v for k, v in stages.items() if k not in ("decode", "mp4")),
        peak_GiB=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        audio_layers=runner.service.pipeline.dit.active_audio_layers,
    )
    record["compute_s_per_video_s"] = total / record["video_s"]
    record["estimate_error"] = None if estimate is None else estimate / record["model_s"] - 1
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", default="fast", help="comma list of fast, turbo, quality")
    parser.add_argument("--fp8", default="off", help="off, on, or off,on (fp8 runs after the bf16 ones)")
    parser.add_argument(
        "--fused-norms", action="store_true", help="--fp8 on, one GPU: LayerNorms that quantise their own output"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="speech per speaker")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="requests per preset: the first pays one-off costs (LoRA merge), the others show a warm container",
    )
    parser.add_argument("--sampling-steps", type=int, default=None, help="override the presets' steps (short runs)")
    parser.add_argument("--image", type=Path, default=EXAMPLE_IMAGE,
                        help="the picture (default: the reference's example)")  # fmt: skip
    parser.add_argument(
        "--example",
        action="store_true",
        help="the reference's two-speaker example as it is (its picture, 1.8 s + 3.1 s of speech "
        "one after the other, boxes, prompt) instead of synthetic speech",
    )
    parser.add_argument("--dub", action="store_true", help="InfiniteTalk dubbing of a source video instead")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs for the DiT (> 1: one worker process per GPU)")
    parser.add_argument(
        "--vae-bands",
        default="on",
        choices=["on", "off", "on,off"],
        help="--gpus > 1: the VAE in bands over the GPUs (as setup), on one GPU (as before), or both",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: checks the script, times nothing")
    args = parser.parse_args()
    if args.example and args.dub:
        parser.error("--example is a MultiTalk request; --dub an InfiniteTalk one")
    if args.gpus > 1 and (args.dub or args.fp8 == "off,on"):
        parser.error("--gpus > 1 runs MultiTalk requests, --fp8 off or on (the workers start on one memory plan)")
    if args.fused_norms and (args.gpus > 1 or "on" not in args.fp8.split(",")):
        parser.error("--fused-norms: fp8 on one GPU (--fp8 on)")
    if args.vae_bands != "on" and args.gpus == 1:
        parser.error("--vae-bands: the VAE runs in bands with --gpus > 1 only")

    from predict import Runner

    device = torch.device("cpu" if args.tiny else "cuda")
    log = Log()
    logging.getLogger().addHandler(log)
    results = dict(environment=environment(device), args=vars(args) | {"out": str(args.out)}, requests=[])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        started = time.perf_counter()
        runner = Runner()
        os.environ[GPUS_ENV] = "1"  # the tiny set in-process; the full-size DiT's workers are started below
        tiny = write_tiny_checkpoints(work / "tiny")
        write_tiny_speech(tiny)  # Kokoro too: setup() fetches what is missing
        runner.setup(weights=str(tiny))
        results["tiny_setup_s"] = time.perf_counter() - started
        generator = torch.Generator(device).manual_seed(0)
        fp8_workers = args.gpus > 1 and args.fp8 == "on"
        service = runner.service
        results["build_s"] = full_size(service, device, generator, work, args.tiny, args.gpus, fp8_workers)
        pipeline = service.pipeline
        vaes = {"on": pipeline.vae, "off": pipeline.vae.replicas[0]} if args.gpus > 1 else {}  # in bands, or one GPU
        started = time.perf_counter()
        service.warm_up(None if not args.tiny else {"0.50": [32, 64]})
        results["warm_up_s"] = time.perf_counter() - started  # compile (first generation) + the measured one
        results["costs"] = vars(service.costs)
        save(results, args.out)
        print(
            f"built {results['build_s']:.0f} s, warm-up {results['warm_up_s']:.0f} s: {service.costs.describe()}",
            flush=True,
        )

        for k, pitch in enumerate((130, 220)):
            soundfile.write(work / f"speaker{k + 1}.wav", speech(args.seconds, pitch), 16000)
        inputs = dict(
            image=str(args.image),
            audio=str(work / "speaker1.wav"),
            second_audio=str(work / "speaker2.wav"),
            audio_type="para",
            seed=1,
        )
        if args.example:
            inputs = reference_example()
        if args.dub:
            random_audio_sets(service, work, generator)
            source = source_video(work / "source.mp4", work / "speaker1.wav", args.seconds)
            inputs = dict(video=str(source), model="infinitetalk", seed=1)
        if args.sampling_steps:
            inputs["sampling_steps"] = args.sampling_steps
        for fp8 in args.fp8.split(","):
            if fp8 == "on" and not fp8_workers:
                started = time.perf_counter()
                if "fast" in args.presets.split(","):  # merged in bf16 first, as a request does before quantising
                    pipeline.set_weights("multitalk", [(service.fast_lora, 1.0)])
                quantize_blocks(pipeline.dit.module, fused_norms=args.fused_norms)
                torch._dynamo.reset()
                if device.type == "cuda":
                    pipeline.dit.module.compile_blocks()
                service.warm_up(None if not args.tiny else {"0.50": [32, 64]})
                results["fp8_warm_up_s"] = time.perf_counter() - started
            for bands in args.vae_bands.split(",") if args.gpus > 1 else ["-"]:
                if args.gpus > 1:
                    pipeline.vae = vaes[bands]
                for preset in args.presets.split(","):
                    flags = dict(fast=preset == "fast", turbo=preset == "turbo")
                    for repeat in range(args.repeats):
                        kind = "dub " if args.dub else "example " if args.example else ""
                        vae = f" vae bands {bands}" if args.gpus > 1 else ""
                        label = f"{kind}{preset} fp8 {fp8}{vae}{' again' if repeat else ''}"
                        results["requests"].append(request(runner, log, inputs | flags, label, device))
                        save(results, args.out)  # what is done survives a run cut short
    save(results, args.out)
    print(f"wrote {args.out}")


def save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
