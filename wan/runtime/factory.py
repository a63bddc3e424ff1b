"""`load_pipeline`: the published checkpoint files in, a ready `Pipeline` out: weights placed by a memory plan, the
DiT in this process or in one worker per GPU, kernels chosen, blocks compiled."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ..configs import DEFAULT_NEGATIVE_PROMPT, DiTConfig
from ..encoders.image import ImageEncoder
from ..encoders.text import TextEncoder
from ..encoders.vae import VideoVAE
from ..generation.backend import DiTBackend
from ..generation.pipeline import Pipeline
from ..loading.audio_layers import AudioLayers, audio_layer_sets
from ..loading.checkpoints import WanFiles, check_files, dit_tensor_reader
from ..loading.dit_weights import DiTWeights
from ..loading.lora import LoraSet
from .compile_cache import load_compile_cache, traced_cache_file
from .kernels import kernel_name
from .local import LocalDiT
from .placement import load_dit_for_plan, place_text_encoder, place_vae, text_encoder_device
from .plans import FP8, RESIDENT, MemoryPlan
from .vae_bands import BandedVAE
from .workers import CheckpointSource, WorkerGroup, WorkerOptions, visible_devices

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
    worker_plan: MemoryPlan | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    compile_cache: Path | None = None,
) -> Pipeline:
    """A pipeline over the published files (`checkpoint_dir`: the Wan2.1-I2V-14B-480P dir; `multitalk_dir`: the
    MeiGen-MultiTalk dir unless the Wan dir holds the merged index; `infinitetalk_dir`, optional: the InfiniteTalk
    dir, whose audio layers `Pipeline.set_weights` swaps in).

    `memory_plan` (default: every model resident; `fp8=True`: `wan.runtime.plans.FP8`) says where the weights live: the DiT
    in bf16 or fp8, on the GPU or streamed block by block from pinned host memory, the text encoder on the GPU for
    good, only while it encodes, or on the CPU. The DiT streams from the shards tensor by tensor, each block made
    ready for the plan as it arrives. `loras` are merged after that and stay undoable exactly (re-read from the shards,
    no copies kept). `compile` compiles every block (regionally; the graphs are built on the first call, e.g.
    `Pipeline.warm_up`); with `compile_cache`, an earlier start's kernels and graphs for these blocks are loaded
    first (`wan.runtime.compile_cache`).

    `gpus` > 1: the DiT runs in one worker process per GPU (`wan.runtime.workers`), each streaming the weights from
    the same files and placing them by `worker_plan` (None: the plan for its own card); the text and image encoders
    stay here, on `device`, and the VAE splits each frame into bands of rows over the GPUs (untiled plans;
    `wan.runtime.vae_bands`).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = memory_plan or (FP8 if fp8 else RESIDENT)
    check_files(checkpoint_dir, multitalk_dir, infinitetalk_dir=infinitetalk_dir)
    files = WanFiles(Path(checkpoint_dir))
    # The text encoder first: its memory-mapped file is released before the DiT's blocks fill host memory.
    text_encoder = TextEncoder.from_checkpoint(
        files.t5,
        files.t5_tokenizer,
        text_len=DiTConfig.from_json(files.config).text_len,
        dtype=dtype,
        device=text_encoder_device(plan, device),
    )
    if gpus > 1:
        dit: DiTBackend = start_workers(
            files, multitalk_dir, infinitetalk_dir, worker_plan, dtype, compile, gpus, loras, compile_cache
        )
    else:
        dit = load_local_dit(files, multitalk_dir, infinitetalk_dir, plan, dtype, device, compile, loras, compile_cache)
    image_encoder = ImageEncoder.from_checkpoint(
        files.clip, dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device
    )
    vae = VideoVAE.from_checkpoint(files.vae, device=device)
    place_vae(vae, plan)
    if gpus > 1 and not plan.vae_tiled:
        vae = BandedVAE.over(vae, dit.devices)  # each frame in bands of rows, one per GPU
    return Pipeline(
        dit,
        place_text_encoder(text_encoder, plan, device),
        image_encoder,
        vae,
        device=device,
        negative_prompt=negative_prompt,
    )


def load_local_dit(
    files: WanFiles,
    multitalk_dir,
    infinitetalk_dir,
    plan: MemoryPlan,
    dtype: torch.dtype,
    device: torch.device,
    compile: bool,
    loras: Sequence[tuple[str | Path, float]],
    compile_cache: Path | None = None,
) -> LocalDiT:
    """The DiT in this process, streamed from the shards and placed by `plan`, LoRAs merged, blocks compiled."""
    module = load_dit_for_plan(files.root, multitalk_dir, plan, dtype=dtype, device=device)
    weights = DiTWeights(
        LoraSet(module, reload=dit_tensor_reader(files.root, multitalk_dir, dtype=dtype, device=device)),
        AudioLayers(module, audio_layer_sets(files.root, multitalk_dir, infinitetalk_dir)),
    )
    weights.set_weights(None, loras)
    log.info("DiT self-attention: %s", kernel_name(module.blocks[0].self_attn.attend))
    if compile:  # an earlier start's graphs and kernels for these blocks first
        load_compile_cache(traced_cache_file(compile_cache, module))
        module.compile_blocks()
    return LocalDiT(module, weights, compile_cache)


def start_workers(
    files: WanFiles,
    multitalk_dir,
    infinitetalk_dir,
    worker_plan: MemoryPlan | None,
    dtype: torch.dtype,
    compile: bool,
    gpus: int,
    loras: Sequence[tuple[str | Path, float]],
    compile_cache: Path | None = None,
) -> WorkerGroup:
    """One DiT worker process per GPU (cuda:0 .. cuda:gpus-1), each streaming the weights from the same files and
    placing them by `worker_plan` (None: the plan for its own card)."""
    if len(visible_devices()) < gpus:
        raise ValueError(f"gpus={gpus}, but only {len(visible_devices())} GPUs are visible")
    source = CheckpointSource(files.root, multitalk_dir, infinitetalk_dir, dtype)
    options = WorkerOptions(compile=compile, memory_plan=worker_plan, compile_cache=compile_cache)
    workers = WorkerGroup(source, visible_devices()[:gpus], options)
    workers.set_weights(None, loras)
    workers.start()
    return workers
