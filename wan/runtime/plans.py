"""Memory plans: where the model's weights live, chosen once from the GPU's free memory. Pure arithmetic (no torch):
`wan.runtime.placement` puts a plan in place.

    resident   everything on the GPU in the published precision (80 GB cards)
    fp8        DiT blocks in e4m3 on the GPU; the text encoder comes onto the GPU only while it encodes (40-48 GB)
    streamed   fp8 DiT blocks in pinned host memory, each copied to the GPU just before it runs; text encoder as
               in fp8; tiled VAE (24 GB)

A named plan (resident|fp8|streamed) overrides the choice. The arithmetic behind the thresholds is below; every figure
is a measured or counted size, in GiB.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

GIB = 1024**3

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

# Workspace above the weights (bench/RESULTS.md, H100, 81 frames at 448x896).
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

    def describe(self, device: str = "GPU") -> str:
        """One line for the log; `device` names where the models compute (a CPU run keeps everything in memory)."""
        if device == "CPU":
            return f"memory plan {self.name!r}: every model on the CPU, DiT {self.dit_weights}"
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


def choose_memory_plan(free_bytes: int, override: str | None = None, setting: str = "memory_plan") -> MemoryPlan:
    """The fastest plan that fits `free_bytes` of free GPU memory, or the plan `override` names (resident, fp8 or
    streamed; empty or None means choose). Raises ValueError for an unknown name or too little memory; `setting`
    names where the user sets the override, for those messages."""
    if override is not None and override.strip():
        name = override.strip().lower()
        if name not in PLANS:
            raise ValueError(
                f"{setting}={override!r} is not a memory plan; use one of {', '.join(PLANS)}, or unset it to choose "
                f"from the free GPU memory"
            )
        return PLANS[name]
    for plan in (RESIDENT, FP8, STREAMED):
        if free_bytes >= plan.gpu_gib * GIB:
            return plan
    raise ValueError(
        f"{free_bytes / GIB:.1f} GiB of free GPU memory is less than the smallest memory plan needs "
        f"({STREAMED.gpu_gib:.2f} GiB, plan 'streamed'); free the GPU, or set {setting}=streamed to try anyway"
    )
