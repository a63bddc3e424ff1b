"""`load_pipeline`: the published checkpoint files in, a ready `Pipeline` out (weights, kernels, fp8, compile)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .configs import DEFAULT_NEGATIVE_PROMPT
from .encoders.image import ImageEncoder
from .encoders.text import TextEncoder
from .encoders.vae import VideoVAE
from .generation.pipeline import Pipeline, TextEncoderPlacement
from .loading.audio_layers import AudioLayers, audio_layer_sets
from .loading.checkpoints import WanFiles, check_files, dit_tensor_reader, load_dit
from .loading.lora import LoraSet
from .model.attention import fastest_self_attention

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
    text_encoder_placement: TextEncoderPlacement = "device",
    loras: Sequence[tuple[str | Path, float]] = (),
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
) -> Pipeline:
    """A pipeline over the published files (`checkpoint_dir`: the Wan2.1-I2V-14B-480P dir; `multitalk_dir`: the
    MeiGen-MultiTalk dir unless the Wan dir holds the merged index; `infinitetalk_dir`, optional: the InfiniteTalk
    dir, whose audio layers `Pipeline.set_weights` swaps in).

    The DiT streams from the shards onto `device` tensor by tensor. `loras` are merged first and stay undoable
    exactly (re-read from the shards, no copies kept). `fp8` quantises the blocks' linears and self-attention after
    that; otherwise the blocks' self-attention takes the fastest kernel that checks out on the card. `compile`
    compiles every block (regionally; the graphs are built on the first call, e.g. `Pipeline.warm_up`).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_files(checkpoint_dir, multitalk_dir, infinitetalk_dir=infinitetalk_dir)
    files = WanFiles(Path(checkpoint_dir))
    dit = load_dit(files.root, multitalk_dir, dtype=dtype, device=device)
    text_device = device if text_encoder_placement == "device" else torch.device("cpu")
    text_encoder = TextEncoder.from_checkpoint(
        files.t5, files.t5_tokenizer, text_len=dit.config.text_len, dtype=dtype, device=text_device
    )
    image_encoder = ImageEncoder.from_checkpoint(
        files.clip, dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device
    )
    vae = VideoVAE.from_checkpoint(files.vae, device=device)
    audio_layers = AudioLayers(dit, audio_layer_sets(files.root, multitalk_dir, infinitetalk_dir))
    lora_set = LoraSet(dit, reload=dit_tensor_reader(files.root, multitalk_dir, dtype=dtype, device=device))
    lora_set.set(loras)
    if fp8:
        from .model.fp8 import quantize_blocks

        quantize_blocks(dit)  # after any LoRA merge: the fp8 weights are final
    else:
        dit.set_self_attention(fastest_self_attention(device))
    log.info("DiT self-attention: %s", dit.blocks[0].self_attn.attend.__name__)
    if compile:
        dit.compile_blocks()
    return Pipeline(
        dit,
        text_encoder,
        image_encoder,
        vae,
        device=device,
        negative_prompt=negative_prompt,
        text_encoder_placement=text_encoder_placement,
        loras=lora_set,
        audio_layers=audio_layers,
    )
