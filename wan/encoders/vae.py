"""Wan2.1 causal video VAE: `Wan2.1_VAE.pth` in `diffusers.AutoencoderKLWan`, plus the reference's latent scaling.

The keys go through diffusers' own Wan converter; the config is read off the tensor shapes, so nothing is fetched.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ..configs import VAE_LATENT_MEAN, VAE_LATENT_STD
from .state_dict import assign_checked, derive_config, read_state_dict


def vae_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKLWan's constructor arguments, read off a Wan-format state dict.

    The encoder's `downsamples` list is the levels' residual blocks, each level but the last closed by a resample
    (a spatial one, or a spatio-temporal one with a `time_conv`).
    """
    base_dim = state_dict["encoder.conv1.weight"].shape[0]
    indices = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.downsamples.")})
    levels, temporal_downsample = [[]], []
    for index in indices:
        prefix = f"encoder.downsamples.{index}."
        if prefix + "resample.1.weight" in state_dict:
            temporal_downsample.append(prefix + "time_conv.weight" in state_dict)
            levels.append([])
        else:
            levels[-1].append(state_dict[prefix + "residual.2.weight"].shape[0])
    num_res_blocks = len(levels[0])
    if any(len(level) != num_res_blocks for level in levels):
        raise ValueError(f"uneven residual blocks per encoder level: {[len(level) for level in levels]}")
    # The converter hard-codes the decoder's block indices of this layout, the only one Wan2.1 has.
    if len(levels) != 4 or num_res_blocks != 2:
        raise ValueError(f"{len(levels)} levels of {num_res_blocks} blocks: the Wan converter handles 4 levels of 2")
    return dict(
        base_dim=base_dim,
        z_dim=state_dict["conv2.weight"].shape[0],
        dim_mult=[level[0] // base_dim for level in levels],
        num_res_blocks=num_res_blocks,
        attn_scales=[],
        temperal_downsample=temporal_downsample,
        dropout=0.0,
        in_channels=state_dict["encoder.conv1.weight"].shape[1],
        out_channels=state_dict["decoder.head.2.weight"].shape[0],
        latents_mean=list(VAE_LATENT_MEAN),
        latents_std=list(VAE_LATENT_STD),
    )


def load_wan_vae(
    state_dict: dict[str, torch.Tensor], path: Path, *, dtype: torch.dtype, device: str | torch.device
) -> AutoencoderKLWan:
    """AutoencoderKLWan holding a Wan-format state dict read from `path` (named in errors)."""
    config = derive_config(vae_config, state_dict, path)
    with torch.device("meta"):
        model = AutoencoderKLWan(**config)
    # The converter only renames, so feeding it the keys themselves yields diffusers key -> file key.
    sources = convert_wan_vae_to_diffusers({key: key for key in state_dict})
    tensors = {key: state_dict[source].to(device, dtype) for key, source in sources.items()}
    assign_checked(model, tensors, sources, path)
    return model


class VideoVAE:
    """Video `[3, F, H, W]` in [-1, 1] <-> normalised latent `[16, 1 + (F - 1) // 4, H / 8, W / 8]`."""

    def __init__(self, model: AutoencoderKLWan):
        self.model = model.eval().requires_grad_(False)
        self._casts: dict[torch.dtype, VideoVAE] = {}  # copies computing in other dtypes, made on first use
        # The reference multiplies by a float32 reciprocal on encode and divides by it on decode.
        self.mean = torch.tensor(VAE_LATENT_MEAN, dtype=torch.float32).view(-1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(VAE_LATENT_STD, dtype=torch.float32).view(-1, 1, 1, 1)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> "VideoVAE":
        return cls(load_wan_vae(read_state_dict(checkpoint), checkpoint, dtype=dtype, device=device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device) -> "VideoVAE":
        self.model.to(device)
        self._casts.clear()
        return self

    def channels_last(self) -> "VideoVAE":
        """Convolution weights (and so the activations) in channels-last-3d: cuDNN's NHWC kernels without the layout
        conversions around each conv (H200, one 81-frame 448x896 clip in float32: encode 1.72 -> 1.56 s, decode 2.79
        -> 2.60 s, the video 8e-4 relative from the NCHW one, as far as two TF32 algorithms differ)."""
        for module in self.model.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        self._casts.clear()
        return self

    def cast(self, dtype: torch.dtype) -> "VideoVAE":
        """This VAE computing in `dtype`: itself, or a converted copy made on first use (its tiling and weight layout
        kept; these weights stay as they are)."""
        if dtype == self.dtype:
            return self
        if dtype not in self._casts:
            # nn.Module's own `to`: diffusers' warns about keeping modules in float32, which this VAE has none of.
            self._casts[dtype] = VideoVAE(torch.nn.Module.to(copy.deepcopy(self.model), dtype))
        return self._casts[dtype]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """The latent mean (no sampling), normalised per channel; float32."""
        mu = self.model.encode(video.to(self.device, self.dtype)[None]).latent_dist.mode()[0].float()
        return (mu - self.mean.to(mu.device)) * self.inv_std.to(mu.device)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Video clamped to [-1, 1] (diffusers clamps), `1 + 4 (T - 1)` frames; float32."""
        latent = latent.to(self.device, torch.float32)
        z = latent / self.inv_std.to(latent.device) + self.mean.to(latent.device)
        return self.model.decode(z[None].to(self.dtype)).sample[0].float()
