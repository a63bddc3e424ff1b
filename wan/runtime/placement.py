"""Putting a memory plan in place (`wan.runtime.plans`): the DiT's blocks quantised and streamed or resident, the
text encoder resident or parked, the VAE tiled or whole; and the plan for a device's free memory."""

from __future__ import annotations

import functools
import logging
import math

import psutil
import torch

from ..loading.checkpoints import load_dit
from ..model.dit import MultiTalkDiT
from .kernels import self_attention_kernel
from .plans import (
    GIB,
    RESIDENT,
    VAE_TILE_PX,
    VAE_TILE_STRIDE_PX,
    Card,
    MemoryPlan,
    choose_memory_plan,
    plan_for_card,
)
from .streaming import HostWeights, ParkedWeights, attach_streamer, module_tensors

log = logging.getLogger(__name__)


def free_gpu_bytes(device: str | torch.device) -> int:
    """Free memory on a CUDA device as this process may use it: the driver's figure, lowered to what a
    `torch.cuda.set_per_process_memory_fraction` cap still allows."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = torch.cuda.get_per_process_memory_fraction(index)
    return min(free, int(fraction * total) - torch.cuda.memory_reserved(index))


def card_of(device: str | torch.device) -> Card:
    """What the plan depends on for a CUDA `device`: its name, compute capability, free memory (and the host's)
    and whether fp8 matrix products run on it (a probe, once per device)."""
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device)
    return Card(
        name=torch.cuda.get_device_name(device),
        capability=capability,
        gpu_gib=free_gpu_bytes(device) / GIB,
        host_gib=available_host_gib(),
        fp8_linears=capability >= (8, 9) and fp8_linears_work(device.index or 0),
    )


def available_host_gib() -> float:
    """Host memory available to this process now (the kernel's MemAvailable), in GiB."""
    return psutil.virtual_memory().available / GIB


@functools.cache
def fp8_linears_work(device_index: int) -> bool:
    """Whether the fp8 linear layers (`Fp8Linear`: row-scaled `torch._scaled_mm`) run on this card, correctly: a
    card or a torch build without them must leave the service its bf16 plans, not fail a request."""
    from ..model.fp8 import Fp8Linear  # imports Triton

    generator = torch.Generator(f"cuda:{device_index}").manual_seed(0)
    linear = torch.nn.Linear(64, 32, device=generator.device, dtype=torch.bfloat16)
    x = torch.randn(16, 64, generator=generator, device=generator.device, dtype=torch.bfloat16)
    try:
        with torch.no_grad():
            error = (Fp8Linear(linear)(x).float() - linear(x).float()).norm() / linear(x).float().norm()
    except Exception as exception:  # an unsupported scaling mode or kernel on this card
        log.warning("fp8 linear layers do not run on cuda:%d (%s); the bf16 plans serve", device_index, exception)
        return False
    if not error < 0.1:  # e4m3 keeps 3 mantissa bits: a few percent
        log.warning("fp8 linear layers are %.2f from bf16 on cuda:%d; the bf16 plans serve", error, device_index)
        return False
    return True


def plan_for_device(
    device: str | torch.device, override: str | None = None, setting: str = "memory_plan"
) -> MemoryPlan:
    """The plan for `device`, from what its card computes and its free memory, or the plan `override` names
    (`setting`: where the user named it), logged once here; a CPU runs `resident` unless told otherwise. Raises
    `UnsupportedCard` for a card that cannot serve the model."""
    device = torch.device(device)
    if device.type != "cuda":
        plan = choose_memory_plan(0, override, setting) if override else RESIDENT
        log.info("%s", plan.describe("CPU"))
        return plan
    card = card_of(device)
    plan = plan_for_card(card, override, setting)
    source = f"{setting}={override}" if override else "chosen"
    log.info("%s; %s for %s with %.1f GiB free", plan.describe(), source, card.name, card.gpu_gib)
    if card.gpu_gib < plan.gpu_gib:
        log.warning("plan %r needs %.1f GiB but only %.1f GiB are free", plan.name, plan.gpu_gib, card.gpu_gib)
    return plan


def check_device_supports(plan: MemoryPlan, device) -> None:
    """A ValueError unless the card computes what `plan` keeps the DiT in (fp8 needs compute capability 8.9+), as
    `plan_for_card` checks a named plan; a CPU computes every plan."""
    device = torch.device(device)
    if device.type == "cuda":
        card = Card(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), math.inf)
        plan_for_card(card, plan.name)


def prepare_dit_block(block, plan: MemoryPlan, device):
    """One loaded block made ready for `plan`: quantised for fp8, moved into page-locked host memory when streamed
    (returns its `HostWeights` then, else None)."""
    if plan.dit_weights == "fp8":
        from ..model.fp8 import quantize_block  # imports Triton

        quantize_block(block)
    if plan.dit_placement == "streamed":
        return HostWeights(module_tensors(block), pin=torch.device(device).type == "cuda")
    return None


def finish_dit(dit: MultiTalkDiT, plan: MemoryPlan, device, host_blocks: list | None = None) -> None:
    """After every block went through `prepare_dit_block`: the self-attention kernel (`wan.runtime.kernels`), and the
    streamer when the blocks stream (`host_blocks`: what `prepare_dit_block` returned, in block order)."""
    dit.set_self_attention(self_attention_kernel(plan, device))
    if plan.dit_placement == "streamed":
        attach_streamer(dit, host_blocks, device)


def load_dit_for_plan(checkpoint_dir, multitalk_dir, plan: MemoryPlan, *, dtype, device):
    """`load_dit` that prepares each block as it arrives: the bf16 DiT never sits whole on the GPU (fp8) or at all
    (streamed: each block is read onto `device`, quantised there, then moved to page-locked host memory)."""
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
