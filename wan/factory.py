"""`load_pipeline`: the published checkpoint files in, a ready `Pipeline` out (weights placed by a memory plan,
kernels, compile)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .compile_cache import load_compile_cache, traced_cache_file
from .configs import DEFAULT_NEGATIVE_PROMPT, DiTConfig
from .encoders.image import ImageEncoder
from .encoders.text import TextEncoder
from .encoders.vae import VideoVAE
from .generation.pipeline import Pipeline
from .loading.audio_layers import AudioLayers, audio_layer_sets
from .loading.checkpoints import WanFiles, check_files, dit_tensor_reader
from .loading.dit_weights import DiTWeights
from .loading.lora import LoraSet
from .memory import FP8, RESIDENT, MemoryPlan, load_dit_for_plan, place_text_encoder, place_vae, text_encoder_device

log = logging.getLogger(__name__)


def load_pipeline(
    checkpoint_dir: str | Path,
    multitalk_dir: str | Path | None = None,
    infinitetalk_dir: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    compile: bool = False,
    fp8: bool = False,
    memory_plan: MemoryPlan | None = None,
    gpus: int = 1,
    loras: Sequence[tuple[str | Path, float]] = (),
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    compile_cache: Path | None = None,
) -> Pipeline:
    """A pipeline over the published files (`checkpoint_dir`: the Wan2.1-I2V-14B-480P dir; `multitalk_dir`: the
    MeiGen-MultiTalk dir unless the Wan dir holds the merged index; `infinitetalk_dir`, optional: the InfiniteTalk
    dir, whose audio layers `Pipeline.set_weights` swaps in).

    `memory_plan` (default: every model resident; `fp8=True`: `wan.memory.FP8`) says where the weights live: the DiT
    in bf16 or fp8, on the GPU or streamed block by block from pinned host memory, the text encoder on the GPU for
    good, only while it encodes, or on the CPU. The DiT streams from the shards tensor by tensor, each block made
    ready for the plan as it arrives. `loras` are merged after that and stay undoable exactly (re-read from the shards,
    no copies kept). `compile` compiles every block (regionally; the graphs are built on the first call, e.g.
    `Pipeline.warm_up`). `gpus` > 1: the DiT runs in one worker process per GPU (`wan.parallel`: sequence parallel
    and the guidance passes on different GPUs), each streaming the weights from the same files; the text and image
    encoders stay here, on `device`, and the VAE splits each frame into bands of rows over the GPUs (untiled plans;
    `wan.parallel.vae_bands`). With `compile` the blocks' kernels and graphs of an earlier start are loaded first
    from the file next to `compile_cache` for these blocks (in each worker: its own file; see `wan.compile_cache`).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = memory_plan or (FP8 if fp8 else RESIDENT)
    check_files(checkpoint_dir, multitalk_dir, infinitetalk_dir=infinitetalk_dir)
    files = WanFiles(Path(checkpoint_dir))
    # The text encoder first: its memory-mapped file is released before the DiT's blocks fill host memory.
    text_encoder = TextEncoder.from_checkpoint(
        files.t5, files.t5_tokenizer, text_len=DiTConfig.from_json(files.config).text_len, dtype=dtype,
        device=text_encoder_device(plan, device),
    )
    dit, weights, workers = None, None, None
    if gpus > 1:
        workers = start_workers(files, multitalk_dir, infinitetalk_dir, plan, dtype, compile, gpus, loras, compile_cache)
        dit = DiTShape(DiTConfig.from_json(files.config), dtype)
    else:
        dit = load_dit_for_plan(files.root, multitalk_dir, plan, dtype=dtype, device=device)
        weights = DiTWeights(
            LoraSet(dit, reload=dit_tensor_reader(files.root, multitalk_dir, dtype=dtype, device=device)),
            AudioLayers(dit, audio_layer_sets(files.root, multitalk_dir, infinitetalk_dir)),
        )
        weights.set_weights(None, loras)
        log.info("DiT self-attention: %s", dit.blocks[0].self_attn.attend.__name__)
        if compile:  # an earlier start's graphs and kernels for these blocks first (`wan.compile_cache`)
            load_compile_cache(traced_cache_file(compile_cache, dit))
            dit.compile_blocks()
    image_encoder = ImageEncoder.from_checkpoint(
        files.clip, dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device
    )
    vae = VideoVAE.from_checkpoint(files.vae, device=device)
    place_vae(vae, plan)
    if workers is not None and not plan.vae_tiled:
        from .parallel.vae_bands import BandedVAE

        vae = BandedVAE.over(vae, workers.devices)  # each frame in bands of rows, one per GPU
    return Pipeline(
        dit,
        place_text_encoder(text_encoder, plan, device),
        image_encoder,
        vae,
        device=device,
        negative_prompt=negative_prompt,
        weights=weights,
        workers=workers,
    )


@dataclass(frozen=True)
class DiTShape:
    """What the pipeline reads of a DiT that lives in worker processes."""

    config: DiTConfig
    dtype: torch.dtype


def start_workers(
    files: WanFiles, multitalk_dir, infinitetalk_dir, plan: MemoryPlan, dtype: torch.dtype, compile: bool, gpus: int,
    loras: Sequence[tuple[str | Path, float]], compile_cache: Path | None = None,
):
    """One DiT worker process per GPU (cuda:0 .. cuda:gpus-1), each streaming the weights from the same files."""
    from .parallel.workers import CheckpointSource, WorkerGroup, WorkerOptions, visible_devices

    if len(visible_devices()) < gpus:
        raise ValueError(f"gpus={gpus}, but only {len(visible_devices())} GPUs are visible")
    source = CheckpointSource(files.root, multitalk_dir, infinitetalk_dir, dtype)
    options = WorkerOptions(compile=compile, memory_plan=plan, compile_cache=compile_cache)
    workers = WorkerGroup(source, visible_devices()[:gpus], options)
    workers.set_weights(None, loras)
    workers.start()
    return workers
