"""Memory plans: where the model's weights live, chosen once in setup from the GPU's free memory.

    resident   everything on the GPU in the published precision (80 GB cards)
    fp8        DiT blocks in e4m3 on the GPU; the text encoder comes onto the GPU only while it encodes (40-48 GB)
    streamed   fp8 DiT blocks in pinned host memory, each copied to the GPU just before it runs; text encoder as
               in fp8; tiled VAE (24 GB)

`MULTITALK_MEMORY_PLAN` (resident|fp8|streamed) overrides the choice. The arithmetic behind the thresholds is below;
every figure is a measured or counted size, in GiB.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal

log = logging.getLogger(__name__)

GIB = 1024**3
MEMORY_PLAN_ENV = "MULTITALK_MEMORY_PLAN"

# Weights (counted from the modules at the published sizes).
DIT_BF16_GIB = 35.17  # 18.88 B parameters in bf16
DIT_FP8_GIB = 18.19  # block linears in e4m3 plus float32 row scales; norms, biases, non-block layers stay bf16
DIT_OUTSIDE_BLOCKS_GIB = 0.59  # embeddings, time projection, head, audio projection: always on the GPU
DIT_FP8_BLOCK_GIB = 0.44  # one of the 40 blocks in fp8: the size of a streaming slot
STREAMING_SLOTS = 2  # the block that runs and the one being copied in
TEXT_ENCODER_GIB = 10.58  # umT5-XXL encoder, 5.68 B parameters in bf16
IMAGE_ENCODER_GIB = 1.18  # CLIP ViT-H/14 visual tower in fp16
VAE_GIB = 0.47  # Wan VAE, 0.127 B parameters in float32
VAE_BF16_GIB = 0.24  # its bfloat16 copy, made for the fast and turbo presets (`VideoVAE.cast`)
WAV2VEC_GIB = 0.35  # chinese-wav2vec2-base in float32 (the predictor keeps it on the same GPU)

# Workspace above the weights (bench/NOTES.md, H100, 81 frames at 448x896).
DIT_PASS_GIB = 3.4  # one 2-speaker DiT pass: 38.6 GiB peak with 35.17 of bf16 weights (fp8: 21.5 - 18.19 = 3.3)
VAE_DECODE_GIB = 9.8  # end-to-end peak 57.2 GiB with 47.4 of weights resident; the fp32 VAE decode is that step
# Tiled decode (VAE_TILE_PX tiles): workspace scales with the tile's area, 512 x 512 / (448 x 896) of 9.8. An
# estimate; what tiling buys is that 720p (up to 960 x 960 px, ~2.3x the area) stays at this figure too.
VAE_TILE_PX = 512
VAE_TILE_STRIDE_PX = 448  # 64 px of overlap blended between tiles, as diffusers' default tiles
VAE_TILED_DECODE_GIB = VAE_DECODE_GIB * VAE_TILE_PX**2 / (448 * 896)
MARGIN_GIB = 2.0  # allocator fragmentation, cuBLAS/cuDNN workspaces, the text encoder's own activations (~0.1)

PlanName = Literal["resident", "fp8", "streamed"]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    name: PlanName
    dit_weights: Literal["bf16", "fp8"]
    dit_placement: Literal["resident", "streamed"]  # streamed: blocks in pinned host memory, copied in per pass
    text_encoder: Literal["resident", "while_encoding", "cpu"]  # cpu: encodes on the CPU (the reference's t5_cpu)
    vae_tiled: bool
    gpu_gib: float  # free GPU memory the plan needs (its largest phase plus the margin)
    host_gib: float  # weights the plan keeps in host memory

    def describe(self) -> str:
        dit = f"DiT {self.dit_weights} " + (
            "streamed block by block from pinned host memory" if self.dit_placement == "streamed" else "on the GPU"
        )
        text = {
            "resident": "text encoder on the GPU",
            "while_encoding": "text encoder on the GPU only while encoding",
            "cpu": "text encoder on the CPU",
        }[self.text_encoder]
        vae = "VAE tiled" if self.vae_tiled else "VAE untiled"
        return (
            f"memory plan {self.name!r}: {dit}, {text}, {vae}; needs {self.gpu_gib:.2f} GiB of GPU memory and keeps "
            f"{self.host_gib:.1f} GiB of weights in host memory"
        )


def _needs(resident_gib: float, phases_gib: tuple[float, ...]) -> float:
    """GPU memory of a plan: what stays on the GPU plus the largest thing that comes and goes, plus the margin."""
    return round(resident_gib + max(phases_gib) + MARGIN_GIB, 2)


# Resident: 35.17 + 10.58 + 1.18 + 0.47 + 0.24 + 0.35 = 47.99 of weights; the float32 decode's 9.8 is the largest
# phase: 47.99 + 9.8 + 2.0 = 59.79 GiB.
_ALWAYS = IMAGE_ENCODER_GIB + VAE_GIB + VAE_BF16_GIB + WAV2VEC_GIB  # 2.24
RESIDENT = MemoryPlan(
    name="resident",
    dit_weights="bf16",
    dit_placement="resident",
    text_encoder="resident",
    vae_tiled=False,
    gpu_gib=_needs(DIT_BF16_GIB + TEXT_ENCODER_GIB + _ALWAYS, (DIT_PASS_GIB, VAE_DECODE_GIB)),
    host_gib=0.0,
)
# fp8: 18.19 + 2.24 = 20.43 stay; phases: encoding +10.58, a DiT pass +3.4, the decode +9.8: 20.43 + 10.58 + 2.0 =
# 33.01 GiB. The text encoder waits in pinned host memory.
FP8 = MemoryPlan(
    name="fp8",
    dit_weights="fp8",
    dit_placement="resident",
    text_encoder="while_encoding",
    vae_tiled=False,
    gpu_gib=_needs(DIT_FP8_GIB + _ALWAYS, (TEXT_ENCODER_GIB, DIT_PASS_GIB, VAE_DECODE_GIB)),
    host_gib=TEXT_ENCODER_GIB,
)
# Streamed: 0.59 + 2 x 0.44 + 2.24 = 3.71 stay; phases: encoding +10.58, a pass +3.4, the tiled decode +6.4:
# 3.71 + 10.58 + 2.0 = 16.29 GiB. Host: the 40 blocks (40 x 0.44 = 17.6) and the text encoder.
STREAMED = MemoryPlan(
    name="streamed",
    dit_weights="fp8",
    dit_placement="streamed",
    text_encoder="while_encoding",
    vae_tiled=True,
    gpu_gib=_needs(
        DIT_OUTSIDE_BLOCKS_GIB + STREAMING_SLOTS * DIT_FP8_BLOCK_GIB + _ALWAYS,
        (TEXT_ENCODER_GIB, DIT_PASS_GIB, VAE_TILED_DECODE_GIB),
    ),
    host_gib=round(DIT_FP8_GIB - DIT_OUTSIDE_BLOCKS_GIB + TEXT_ENCODER_GIB, 2),
)
PLANS: dict[str, MemoryPlan] = {plan.name: plan for plan in (RESIDENT, FP8, STREAMED)}


def choose_memory_plan(free_bytes: int, override: str | None = None) -> MemoryPlan:
    """The fastest plan that fits `free_bytes` of free GPU memory, or the plan `override` names (resident, fp8 or
    streamed; empty or None means choose). Raises ValueError for an unknown name or too little memory."""
    if override is not None and override.strip():
        name = override.strip().lower()
        if name not in PLANS:
            raise ValueError(
                f"{MEMORY_PLAN_ENV}={override!r} is not a memory plan; use one of {', '.join(PLANS)}, or unset "
                f"it to choose from the free GPU memory"
            )
        return PLANS[name]
    for plan in (RESIDENT, FP8, STREAMED):
        if free_bytes >= plan.gpu_gib * GIB:
            return plan
    raise ValueError(
        f"{free_bytes / GIB:.1f} GiB of free GPU memory is less than the smallest memory plan needs "
        f"({STREAMED.gpu_gib:.2f} GiB, plan 'streamed'); free the GPU, or set {MEMORY_PLAN_ENV}=streamed to try anyway"
    )


def free_gpu_bytes(device) -> int:
    """Free memory on a CUDA device as this process may use it: the driver's figure, lowered to what a
    `torch.cuda.set_per_process_memory_fraction` cap still allows."""
    import torch

    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)  # torch >= 2.8
    return min(free, int(fraction * total) - torch.cuda.memory_reserved(index))


def plan_for_device(device) -> MemoryPlan:
    """The plan for `device` (`MULTITALK_MEMORY_PLAN` or the free memory), logged once here; CPUs run resident."""
    import torch

    device = torch.device(device)
    override = os.environ.get(MEMORY_PLAN_ENV, "").strip() or None
    if device.type != "cuda":
        plan = choose_memory_plan(0, override) if override else RESIDENT
        log.info("%s (device %s)", plan.describe(), device)
        return plan
    free = free_gpu_bytes(device)
    plan = choose_memory_plan(free, override)
    source = f"{MEMORY_PLAN_ENV}={override}" if override else "chosen"
    log.info("%s; %s with %.1f GiB free on %s", plan.describe(), source, free / GIB, torch.cuda.get_device_name(device))
    if free < plan.gpu_gib * GIB:
        log.warning("plan %r needs %.1f GiB but only %.1f GiB are free", plan.name, plan.gpu_gib, free / GIB)
    return plan


# --- Putting a plan in place ---------------------------------------------------------------------------------------
# torch, Triton (through wan.fp8) and the loaders are imported inside the functions: choosing a plan needs none.


def check_device_supports(plan: MemoryPlan, device) -> None:
    """fp8 linears need `torch._scaled_mm` on e4m3, i.e. compute capability 8.9 (Ada) or newer."""
    import torch

    device = torch.device(device)
    if plan.dit_weights == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"memory plan {plan.name!r} keeps the DiT in fp8, which {name} cannot compute (needs compute capability "
            f"8.9+, e.g. L4, L40S, RTX 4090, H100); set {MEMORY_PLAN_ENV}=resident on a card with "
            f"{RESIDENT.gpu_gib:.0f} GiB free"
        )


def prepare_dit_block(block, plan: MemoryPlan, device):
    """One loaded block made ready for `plan`: quantised for fp8, moved into page-locked host memory when streamed
    (returns its `HostWeights` then, else None)."""
    import torch

    from .model.offload import HostWeights, module_tensors

    if plan.dit_weights == "fp8":
        from .model.fp8 import quantize_block

        quantize_block(block)
    if plan.dit_placement == "streamed":
        return HostWeights(module_tensors(block), pin=torch.device(device).type == "cuda")
    return None


def finish_dit(dit, plan: MemoryPlan, device, host_blocks: list | None = None) -> None:
    """After every block went through `prepare_dit_block`: the self-attention kernel, and the streamer when the
    blocks stream (`host_blocks`: what `prepare_dit_block` returned, in block order)."""
    import torch

    from .model.attention import fastest_self_attention

    device = torch.device(device)
    if plan.dit_weights == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)):
        from .model.fp8 import fp8_attention

        dit.set_self_attention(fp8_attention)  # cuDNN's fp8 attention: Hopper and newer (CPU: the emulation)
    else:
        dit.set_self_attention(fastest_self_attention(device))
    if plan.dit_placement == "streamed":
        from .model.offload import attach_streamer

        attach_streamer(dit, host_blocks, device)


def load_dit_for_plan(checkpoint_dir, multitalk_dir, plan: MemoryPlan, *, dtype, device):
    """`load_dit` that prepares each block as it arrives: the bf16 DiT never sits whole on the GPU (fp8) or at all
    (streamed: each block is read onto `device`, quantised there, then moved to page-locked host memory)."""
    from .loading.checkpoints import load_dit

    check_device_supports(plan, device)
    host_blocks = []

    def prepare(block) -> None:
        host_blocks.append(prepare_dit_block(block, plan, device))

    dit = load_dit(checkpoint_dir, multitalk_dir, dtype=dtype, device=device, prepare_block=prepare)
    finish_dit(dit, plan, device, host_blocks)
    return dit


def place_dit(dit, plan: MemoryPlan, device) -> None:
    """An already built bf16 DiT (random weights in a benchmark, a test model) rearranged for `plan`, in place."""
    check_device_supports(plan, device)
    host_blocks = [prepare_dit_block(block, plan, device) for block in dit.blocks]
    finish_dit(dit, plan, device, host_blocks)


class EncodeOnDevice:
    """A text encoder whose weights wait in page-locked host memory and come to the GPU for each call (~0.3 s for
    umT5-XXL at PCIe 4/5 speed); the device memory goes back to the allocator when the call returns."""

    def __init__(self, encoder, device):
        from .model.offload import ParkedWeights

        self.encoder = encoder
        self.parked = ParkedWeights(encoder.model, device)

    def __call__(self, prompts: list[str]):
        with self.parked.on_device():
            return self.encoder(prompts)


def text_encoder_device(plan: MemoryPlan, device) -> str:
    """Where to load the text encoder for `plan`: the GPU only when it stays there."""
    return str(device) if plan.text_encoder == "resident" else "cpu"


def place_text_encoder(encoder, plan: MemoryPlan, device):
    """The text encoder (a `TextEncoder` loaded at `text_encoder_device`) as the pipeline should call it."""
    if plan.text_encoder == "while_encoding":
        return EncodeOnDevice(encoder, device)
    return encoder


def place_vae(vae, plan: MemoryPlan) -> None:
    """A `VideoVAE` set up for its device: channels-last convolutions on a GPU (faster, see
    `VideoVAE.channels_last`); tiled encode and decode for plans that cannot afford the full frame's workspace."""
    if vae.device.type == "cuda":
        vae.channels_last()
    if plan.vae_tiled:
        vae.model.enable_tiling(
            tile_sample_min_height=VAE_TILE_PX,
            tile_sample_min_width=VAE_TILE_PX,
            tile_sample_stride_height=VAE_TILE_STRIDE_PX,
            tile_sample_stride_width=VAE_TILE_STRIDE_PX,
        )
