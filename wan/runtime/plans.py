"""Memory plans: where the model's weights live, chosen once from what the GPU can compute and its free memory.
Pure arithmetic (no torch): `wan.runtime.placement` reads the card and puts a plan in place.

    resident        everything on the GPU in the published precision (80 GB cards)
    fp8             DiT blocks in e4m3 on the GPU; the text encoder comes onto the GPU only while it encodes
                    (40-48 GB cards that compute fp8: Ada, Hopper, Blackwell)
    streamed        fp8 DiT blocks in pinned host memory, each copied to the GPU just before it runs; text encoder
                    as in fp8; tiled VAE (24 GB fp8 cards)
    streamed_bf16   the same with the blocks in bf16, for cards without fp8 (Ampere: 24-48 GB)

A named plan overrides the choice. The arithmetic behind the thresholds is below; every figure is a measured or
counted size, in GiB. A card that cannot serve the model at all (no bfloat16, or too little memory for every plan it
can compute) is refused with what it lacks and the smallest card that works.
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
DIT_BF16_BLOCK_GIB = round((DIT_BF16_GIB - DIT_OUTSIDE_BLOCKS_GIB) / 40, 3)  # 0.865: one block in bf16
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

PlanName = Literal["resident", "fp8", "streamed", "streamed_bf16"]


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
# Streamed bf16: 0.59 + 2 x 0.865 + 2.24 = 4.56 stay; phases as streamed: 4.56 + 10.58 + 2.0 = 17.14 GiB. Host: the
# 40 blocks in bf16 (34.58) and the text encoder.
STREAMED_BF16 = MemoryPlan(
    name="streamed_bf16",
    dit_weights="bf16",
    dit_placement="streamed",
    text_encoder="while_encoding",
    vae_tiled=True,
    gpu_gib=_needs(
        DIT_OUTSIDE_BLOCKS_GIB + STREAMING_SLOTS * DIT_BF16_BLOCK_GIB + _ALWAYS,
        (TEXT_ENCODER_GIB, DIT_PASS_GIB, VAE_TILED_DECODE_GIB),
    ),
    host_gib=round(DIT_BF16_GIB - DIT_OUTSIDE_BLOCKS_GIB + TEXT_ENCODER_GIB, 2),
)
PLANS: dict[str, MemoryPlan] = {plan.name: plan for plan in (RESIDENT, FP8, STREAMED, STREAMED_BF16)}
# The smallest card that serves the model: what the smallest plan needs on each side.
SMALLEST_CARD = (
    f"a card of compute capability 8.0+ (Ampere or newer: e.g. RTX 3090, A10, L4) with {STREAMED_BF16.gpu_gib:.0f} "
    f"GiB free ({STREAMED.gpu_gib:.0f} with fp8: Ada or newer) and {STREAMED_BF16.host_gib:.0f} GiB of host memory "
    f"({STREAMED.host_gib:.0f} with fp8)"
)


class UnsupportedCard(ValueError):
    """A card that cannot serve the model; the message names the card, what it lacks and the smallest card that
    works."""


@dataclasses.dataclass(frozen=True)
class Card:
    """What the plan depends on: the card's compute capability and the memory free for the model (GPU and host)."""

    name: str
    capability: tuple[int, int]
    gpu_gib: float  # GPU memory free for the model
    host_gib: float | None = None  # host memory available (None: not checked)
    fp8_linears: bool | None = None  # whether fp8 matrix products run (None: by the capability, 8.9+)

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def fp8(self) -> bool:
        return self.capability >= (8, 9) if self.fp8_linears is None else self.fp8_linears

    @property
    def family(self) -> str:
        major, minor = self.capability
        if major >= 10:
            return "Blackwell"
        return {9: "Hopper", 8: "Ada" if minor >= 9 else "Ampere", 7: "Volta/Turing"}.get(major, "pre-Volta")


def plan_for_card(card: Card, override: str | None = None, setting: str = "memory_plan") -> MemoryPlan:
    """The fastest plan the card can compute and hold, or the plan `override` names (checked against what the card
    computes). Raises `UnsupportedCard` for a card that cannot serve the model, ValueError for a bad override;
    `setting` names where the user sets the override, for the messages."""
    described = f"{card.name} ({card.family}, compute capability {card.capability[0]}.{card.capability[1]})"
    if not card.bf16:
        raise UnsupportedCard(
            f"{described} cannot serve this model: it has no bfloat16 arithmetic, which the weights need; the "
            f"smallest card that works is {SMALLEST_CARD}"
        )
    computable = [plan for plan in PLANS.values() if plan.dit_weights == "bf16" or card.fp8]
    if override is not None and override.strip():
        name = override.strip().lower()
        if name not in PLANS:
            raise ValueError(
                f"{setting}={override!r} is not a memory plan; use one of {', '.join(PLANS)}, or unset it to choose "
                f"from the free GPU memory"
            )
        if PLANS[name] not in computable:
            raise ValueError(
                f"{setting}={name}: memory plan {name!r} keeps the DiT in fp8, which {described} cannot compute "
                "(needs compute capability 8.9+, e.g. L4, L40S, RTX 4090, H100); use streamed_bf16 or resident"
            )
        return PLANS[name]
    order = [RESIDENT, FP8, STREAMED] if card.fp8 else [RESIDENT, STREAMED_BF16]
    fitting = [plan for plan in order if card.gpu_gib >= plan.gpu_gib]
    if not fitting:
        smallest = order[-1]
        raise UnsupportedCard(
            f"{described} has {card.gpu_gib:.1f} GiB of free GPU memory, less than the smallest memory plan it can "
            f"compute needs ({smallest.gpu_gib:.2f} GiB, plan {smallest.name!r}); free the GPU, or set "
            f"{setting}={smallest.name} to try anyway; the smallest card that works is {SMALLEST_CARD}"
        )
    plan = fitting[0]
    if card.host_gib is not None and card.host_gib < plan.host_gib:
        raise UnsupportedCard(
            f"{described}: memory plan {plan.name!r} keeps {plan.host_gib:.1f} GiB of weights in host memory, and "
            f"{card.host_gib:.1f} GiB are available; give the container more memory (the smallest card that works "
            f"is {SMALLEST_CARD})"
        )
    return plan


def choose_memory_plan(free_bytes: int, override: str | None = None, setting: str = "memory_plan") -> MemoryPlan:
    """The fastest plan that fits `free_bytes` of free GPU memory on a card that computes fp8, or the plan `override`
    names (empty or None means choose); see `plan_for_card`."""
    card = Card("this GPU", (9, 0), free_bytes / GIB)
    try:
        return plan_for_card(card, override, setting)
    except UnsupportedCard:
        raise ValueError(
            f"{free_bytes / GIB:.1f} GiB of free GPU memory is less than the smallest memory plan needs "
            f"({STREAMED.gpu_gib:.2f} GiB, plan 'streamed'); free the GPU, or set {setting}=streamed to try anyway"
        ) from None
