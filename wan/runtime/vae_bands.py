"""The VAE over several GPUs: every frame cut into horizontal bands of latent rows, one band per GPU, run at once.

Why: with DiT workers the VAE was the one stage of a request that ran on one GPU while the others waited (encode and
decode: ~13 s of a 10 s `fast` request on two H200s, bench/RESULTS.md).

Exact, not tiled. The Wan 2.1 VAE's layers act on each pixel row alone except three kinds, and each band gets what
those need from its neighbours when it needs it:
- the 3x3 convolutions (the causal 3-D ones; the 2-D one after each upsample): the row above and the row below the
  band, taken after the time cache is put in front (so the neighbours' cached frames come too), zero rows at the
  frame's top and bottom as the unsplit convolution pads;
- the stride-2 downsample (a zero row and column after the frame, then a 3x3 convolution): the band below's first row;
- the mid-block's attention over a frame's pixels: every band's rows (each band attends over the whole frame at the
  latent's resolution and keeps its own rows).
RMS norms (over channels), SiLU, nearest upsampling, the 1x1 and time-only convolutions need nothing of other rows.
So a banded encode or decode equals the unsplit one up to float rounding (convolution algorithms are chosen per
shape). Bands are whole latent rows, so every downsample meets an even number of rows.

Each band runs in a thread of its own, in lockstep with the others: an exchange is a barrier at which every band
posts its edge rows and takes its neighbours' (torch orders a cross-GPU copy after the kernels that wrote its source
and before those that read its result). Kernel launches are asynchronous, so the GPUs overlap while the threads take
turns at the GIL.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AutoencoderKLWan,
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
)
from torch import nn

from ..configs import VAE_STRIDE
from ..encoders.vae import VideoVAE


class Exchange:
    """Where the bands of one encode or decode meet: `share` gathers one value from every band's thread."""

    def __init__(self, bands: int):
        self._barrier = threading.Barrier(bands)
        self._slots: list = [None] * bands

    def share(self, index: int, value) -> list:
        self._slots[index] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()  # no band posts again before every band has read
        return values

    def abort(self) -> None:
        """A band failed: the others leave their wait (`threading.BrokenBarrierError`) instead of waiting forever."""
        self._barrier.abort()


@dataclass
class Band:
    """Band `index` of `count`; `exchange` is set for each call."""

    index: int
    count: int
    exchange: Exchange | None = None

    def padded(
        self,
        x: torch.Tensor,
        rows: tuple[int, int],
        cols: tuple[int, int],
        frames: tuple[int, torch.Tensor | None] = (0, None),
    ) -> torch.Tensor:
        """`x` `[..., H, W]` padded in one copy for a convolution without padding of its own: `rows` (above, below)
        from the neighbouring bands (zeros past the frame's edges), `cols` zero columns (left, right) and, on dim 2 of
        a 5-D `x`, `frames` in front: that many zero frames, then the cached frames (or None).

        One buffer in `x`'s memory format (channels-last stays channels-last for cuDNN), filled once: the neighbours
        copy their edge rows straight out of theirs, cached frames included."""
        above, below = rows
        left, right = cols
        zero_frames, cache = frames
        lead = zero_frames + (0 if cache is None else cache.shape[2])
        height, width = x.shape[-2:]
        shape = [*x.shape[:-2], above + height + below, left + width + right]
        if lead:
            shape[2] += lead
        buffer = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
        inner = buffer[..., above : above + height, left : left + width]
        if lead:
            buffer[:, :, :zero_frames].zero_()
            if cache is not None:
                inner[:, :, zero_frames:lead].copy_(cache)
            inner = inner[:, :, lead:]
        inner.copy_(x)
        if left:
            buffer[..., :left].zero_()
        if right:
            buffer[..., left + width :].zero_()
        # This band's first `below` and last `above` rows, for the bands above and below it.
        first, last = buffer[..., above : above + below, :], buffer[..., height : above + height, :]
        edges = self.exchange.share(self.index, (first, last))
        if above:
            top = buffer[..., :above, :]
            if self.index > 0:
                top.copy_(edges[self.index - 1][1])
            else:
                top.zero_()
        if below:
            bottom = buffer[..., above + height :, :]
            if self.index < self.count - 1:
                bottom.copy_(edges[self.index + 1][0])
            else:
                bottom.zero_()
        return buffer

    def whole(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every band's `x` put together along dim -2 on this band's device, and where this band's rows start."""
        parts = self.exchange.share(self.index, x)
        start = sum(part.shape[-2] for part in parts[: self.index])
        return torch.cat([part.to(x.device) for part in parts], dim=-2), start


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout `x` is in: channels-last (as the GPU's convolution weights are, `VideoVAE.channels_last`) or not."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class BandCausalConv3d(nn.Module):
    """`WanCausalConv3d` with a spatial kernel, on one band: the rows its padding would add come from the neighbours."""

    def __init__(self, conv: WanCausalConv3d, band: Band):
        super().__init__()
        self.conv, self.band = conv, band

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        conv = self.conv
        pad_w, _, pad_h, _, pad_t, _ = conv._padding
        # As WanCausalConv3d: cached frames stand in for (part of) the causal zero frames.
        cache = cache_x if cache_x is not None and pad_t > 0 else None
        zero_frames = pad_t - (0 if cache is None else cache.shape[2])
        x = self.band.padded(x, (pad_h, pad_h), (pad_w, pad_w), (zero_frames, cache))
        return F.conv3d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


class BandConv2d(nn.Module):
    """The padded 3x3 `nn.Conv2d` after an upsample, on one band."""

    def __init__(self, conv: nn.Conv2d, band: Band):
        super().__init__()
        self.conv, self.band = conv, band

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        pad_h, pad_w = conv.padding
        x = self.band.padded(x, (pad_h, pad_h), (pad_w, pad_w))
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


class BandZeroPad2d(nn.Module):
    """A downsample's `nn.ZeroPad2d` on one band: its bottom rows are the band below's first rows."""

    def __init__(self, pad: nn.ZeroPad2d, band: Band):
        super().__init__()
        self.padding, self.band = pad.padding, band

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.padding
        return self.band.padded(x, (top, bottom), (left, right))


class BandAttention(nn.Module):
    """The mid-block's attention over each frame's pixels, on one band: over the whole frame, keeping the band's rows."""

    def __init__(self, block: WanAttentionBlock, band: Band):
        super().__init__()
        self.block, self.band = block, band

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole, start = self.band.whole(x)
        return self.block(whole)[..., start : start + x.shape[-2], :]


def banded_model(model: AutoencoderKLWan, band: Band) -> AutoencoderKLWan:
    """A copy of `model`'s modules (its weights shared, not copied) whose row-mixing layers run on `band`."""
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    model = copy.deepcopy(model, memo=shared)
    covered: set[int] = set()  # the row-mixing convolutions a band layer now runs

    def wrap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, WanAttentionBlock):
                setattr(module, name, BandAttention(child, band))
            elif isinstance(child, WanCausalConv3d) and child.kernel_size[1] > 1:
                setattr(module, name, BandCausalConv3d(child, band))
                covered.add(id(child))
            elif isinstance(child, WanResample) and child.mode.startswith("downsample"):
                pad, conv = child.resample
                child.resample[0] = BandZeroPad2d(pad, band)
                covered.add(id(conv))
                wrap(child)
            elif isinstance(child, WanResample) and child.mode.startswith("upsample"):
                child.resample[1] = BandConv2d(child.resample[1], band)
                covered.add(id(child.resample[1].conv))
                wrap(child)
            else:
                wrap(child)

    wrap(model)
    for name, module in model.named_modules():
        mixes_rows = isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.kernel_size[-2] > 1
        if mixes_rows and id(module) not in covered:
            raise ValueError(
                f"VAE layer {name} ({type(module).__name__}) mixes rows and has no banded form: only the "
                "Wan 2.1 VAE's layout can run in bands"
            )
    return model


def band_rows(rows: int, bands: int) -> list[int]:
    """`rows` latent rows in `bands` contiguous bands, the first ones a row larger where they do not divide."""
    return [rows // bands + (index < rows % bands) for index in range(bands)]


class BandedVAE:
    """A `VideoVAE` over several devices (one replica each, the first the pipeline's): `encode`, `decode` and `cast`
    as `VideoVAE`'s, each frame split into one band of latent rows per device. Frames with fewer latent rows than
    devices, or a height that is no multiple of 8, run unsplit on the first."""

    def __init__(self, replicas: Sequence[VideoVAE]):
        self.replicas = list(replicas)
        self._bands = [Band(index, len(self.replicas)) for index in range(len(self.replicas))]
        self._banded = [VideoVAE(banded_model(vae.model, band)) for vae, band in zip(self.replicas, self._bands)]
        self._casts: dict[torch.dtype, BandedVAE] = {}
        self._calls = threading.Lock()  # one call at a time: the bands hold its exchange

    @classmethod
    def over(cls, vae: VideoVAE, devices: Sequence[str | torch.device]) -> "BandedVAE":
        """`vae` (on the first device) and a copy of it, weights and layout, on each other device."""
        copies = [VideoVAE(copy.deepcopy(vae.model)).to(device) for device in devices[1:]]
        return cls([vae, *copies])

    @property
    def device(self) -> torch.device:
        return self.replicas[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.replicas[0].dtype

    def cast(self, dtype: torch.dtype) -> "BandedVAE":
        """This VAE computing in `dtype` on every device (`VideoVAE.cast`)."""
        if dtype == self.dtype:
            return self
        if dtype not in self._casts:
            self._casts[dtype] = BandedVAE([vae.cast(dtype) for vae in self.replicas])
        return self._casts[dtype]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """As `VideoVAE.encode`: video `[3, F, H, W]` -> normalised latent `[16, T, H / 8, W / 8]` (float32)."""
        rows = band_rows(video.shape[-2] // VAE_STRIDE[1], len(self.replicas))
        if min(rows) == 0 or video.shape[-2] % VAE_STRIDE[1]:  # bands are whole latent rows
            return self.replicas[0].encode(video)
        parts = video.split([VAE_STRIDE[1] * r for r in rows], dim=-2)
        return self._run(VideoVAE.encode, parts)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """As `VideoVAE.decode`: latent `[16, T, h, w]` -> video `[3, 1 + 4 (T - 1), 8 h, 8 w]` in [-1, 1] (float32)."""
        rows = band_rows(latent.shape[-2], len(self.replicas))
        if min(rows) == 0:
            return self.replicas[0].decode(latent)
        return self._run(VideoVAE.decode, latent.split(rows, dim=-2))

    def _run(
        self, step: Callable[[VideoVAE, torch.Tensor], torch.Tensor], parts: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """`step` on every band at once, one thread each; the bands' results put together on the first device."""
        exchange = Exchange(len(parts))
        inference = torch.is_inference_mode_enabled()  # grad modes are per thread

        def run_band(index: int) -> torch.Tensor:
            vae = self._banded[index]
            on_device = torch.cuda.device(vae.device) if vae.device.type == "cuda" else contextlib.nullcontext()
            try:
                with on_device, torch.inference_mode(inference):
                    return step(vae, parts[index].to(vae.device))
            except BaseException:
                exchange.abort()
                raise

        with self._calls, ThreadPoolExecutor(len(parts), thread_name_prefix="vae-band") as pool:
            for band in self._bands:  # the bands hold this call's exchange until the pool is done
                band.exchange = exchange
            futures = [pool.submit(run_band, index) for index in range(len(parts))]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # the band that failed first, not the ones its abort woke
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return torch.cat([f.result().to(self.device) for f in futures], dim=-2)
