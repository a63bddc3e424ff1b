"""Weights kept in page-locked host memory and brought to the GPU only while they are used.

`HostWeights` moves a set of tensors (one DiT block's parameters and buffers) into one host buffer: each tensor's
`.data` becomes a view of it, so the module keeps its parameters, names and state dict. `BlockStreamer` runs the
block stack from such buffers: block i+1 is copied into one of two GPU slots on a side stream while block i computes
from the other; CUDA events order the copy after the slot's previous reader and the compute after its copy. Without
CUDA the same code copies host to host, synchronously. `ParkedWeights` does the same for a whole module (the text
encoder), all at once, for the duration of a `with`.

Page-locking is done with `cudaHostRegister` on an ordinary allocation of exactly the needed size: torch's pinned
allocator rounds every request up to a power of two (0.44 GiB blocks would take 0.5 GiB, the text encoder's FFN
weights 128 MiB instead of 80).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

ALIGNMENT = 256  # bytes; every view starts at a multiple (GEMM and TMA want 16; cudaMalloc gives 256)


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """`nbytes` of uninitialised host memory (uint8), page-locked for asynchronous copies when `pin`."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if pin and nbytes:
        cudart = torch.cuda.cudart()
        pointer = buffer.data_ptr()
        error = int(cudart.cudaHostRegister(pointer, nbytes, 0))
        if error:
            raise RuntimeError(
                f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed (CUDA error {error}); the "
                f"host may be out of lockable memory (ulimit -l, container memory limit)"
            )
        # Unregister when the buffer tensor goes (the blocks' views die with it); not at exit, when CUDA may be gone.
        weakref.finalize(buffer, cudart.cudaHostUnregister, pointer).atexit = False
    return buffer


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `module`, each once (tied weights are one tensor)."""
    found: dict[int, torch.Tensor] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        found.setdefault(id(tensor), tensor)
    return list(found.values())


class HostWeights:
    """A set of tensors moved into one host buffer; `bind(views)` points them at another copy of that buffer (a GPU
    slot), `unbind()` back at the host one. Each tensor is copied in and its old storage released before the next,
    so moving never holds a second copy of more than one tensor."""

    def __init__(self, tensors: Iterable[torch.Tensor], pin: bool):
        self.tensors = list(tensors)
        self.offsets = []
        offset = 0
        for tensor in self.tensors:
            if tensor.is_meta:
                raise ValueError("HostWeights: a tensor is still on the meta device (load the weights first)")
            if not tensor.is_contiguous():
                raise ValueError(f"HostWeights: tensors must be contiguous, got strides {tensor.stride()}")
            offset = _aligned(offset)
            self.offsets.append(offset)
            offset += tensor.nbytes
        self.nbytes = offset
        self.buffer = host_buffer(self.nbytes, pin)
        self.host_views = self.views_in(self.buffer)
        with torch.no_grad():
            for tensor, view in zip(self.tensors, self.host_views, strict=True):
                view.copy_(tensor.detach())
                tensor.data = view

    def views_in(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's view inside `buffer` (uint8, at least `nbytes`), at the host buffer's offsets."""
        return [
            buffer[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            for tensor, offset in zip(self.tensors, self.offsets, strict=True)
        ]

    def bind(self, views: list[torch.Tensor]) -> None:
        for tensor, view in zip(self.tensors, views, strict=True):
            tensor.data = view

    def unbind(self) -> None:
        self.bind(self.host_views)


class BlockStreamer:
    """Runs `MultiTalkDiT.blocks` with each block's weights copied from its `HostWeights` just in time; set it with
    `model.set_block_runner(streamer)`. Two GPU slots, each the size of the largest block."""

    def __init__(self, host_blocks: list[HostWeights], device: str | torch.device):
        self.device = torch.device(device)
        self.host_blocks = host_blocks
        size = max(host.nbytes for host in host_blocks)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        # Views made once, here: made inside inference_mode they would be inference tensors.
        self.slot_views = [[host.views_in(slot) for slot in self.slots] for host in host_blocks]
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event(), torch.cuda.Event()]  # slot holds the next block
            self.released = [torch.cuda.Event(), torch.cuda.Event()]  # slot's last reader has finished

    @property
    def slot_bytes(self) -> int:
        return self.slots[0].numel()

    def _copy_in(self, index: int) -> None:
        slot = index % 2
        source = self.host_blocks[index].buffer
        target = self.slots[slot][: source.numel()]
        if not self.cuda:
            target.copy_(source)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[slot])
            target.copy_(source, non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def __call__(self, blocks: nn.ModuleList, tokens: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        if len(blocks) != len(self.host_blocks):
            raise ValueError(f"BlockStreamer holds {len(self.host_blocks)} blocks, the model has {len(blocks)}")
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        self._copy_in(0)
        for index, block in enumerate(blocks):
            if index + 1 < len(blocks):
                self._copy_in(index + 1)  # queued before this block's kernels, so the two overlap
            slot = index % 2
            if self.cuda:
                compute.wait_event(self.copied[slot])
            host = self.host_blocks[index]
            host.bind(self.slot_views[index][slot])
            try:
                tokens = block(tokens, **block_kwargs)
            finally:
                host.unbind()  # the queued kernels keep the slot's addresses; the module points home again
            if self.cuda:
                self.released[slot].record(compute)
        return tokens


def stream_blocks(model: nn.Module, device: str | torch.device) -> BlockStreamer:
    """Move every block of `model` (a MultiTalkDiT, quantised or not) into page-locked host memory, block by block,
    and make the model stream them; everything outside the blocks goes to `device`. Pinned only on CUDA."""
    device = torch.device(device)
    pin = device.type == "cuda"
    host_blocks = [HostWeights(module_tensors(block), pin) for block in model.blocks]
    return attach_streamer(model, host_blocks, device)


def attach_streamer(model: nn.Module, host_blocks: list[HostWeights], device: str | torch.device) -> BlockStreamer:
    """Make `model` stream its blocks from `host_blocks` (one per block, in order); the rest goes to `device`."""
    in_blocks = {id(tensor) for host in host_blocks for tensor in host.tensors}
    with torch.no_grad():
        for tensor in module_tensors(model):
            if id(tensor) not in in_blocks:
                tensor.data = tensor.data.to(device)
    streamer = BlockStreamer(host_blocks, device)
    model.set_block_runner(streamer)
    return streamer


class ParkedWeights:
    """A module whose weights wait in page-locked host memory and come to `device` inside `with parked.on_device()`.

    The tensors go into host buffers of about `group_bytes` each (so parking holds at most one group twice);
    on entry each group is copied into a fresh device buffer, on exit the module points back at the host buffers and
    the device memory returns to the allocator. The host copy is never written, so nothing is copied back.
    """

    def __init__(self, module: nn.Module, device: str | torch.device, group_bytes: int = 512 * 2**20):
        self.module = module
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.groups: list[HostWeights] = []
        group: list[torch.Tensor] = []
        size = 0
        for tensor in module_tensors(module):
            if group and size + tensor.nbytes > group_bytes:
                self.groups.append(HostWeights(group, pin))
                group, size = [], 0
            group.append(tensor)
            size += _aligned(tensor.nbytes)
        if group:
            self.groups.append(HostWeights(group, pin))

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        copies = []
        for group in self.groups:
            copy = torch.empty(group.nbytes, dtype=torch.uint8, device=self.device)
            copy.copy_(group.buffer, non_blocking=True)
            copies.append(copy)
            group.bind(group.views_in(copy))
        try:
            yield self.module
        finally:
            for group in self.groups:
                group.unbind()
