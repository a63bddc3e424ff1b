"""Where the published checkpoint files live, and the streaming loader of the MultiTalk DiT.

Two on-disk layouts of the DiT are accepted as they are:
- the README merge: the Wan dir holds MultiTalk's index json (base keys -> the Wan shards, audio keys ->
  `multitalk.safetensors`) and `multitalk.safetensors` itself, or a link to it;
- the plain downloads: the Wan dir with Wan's own index (base keys only) beside a `MeiGen-MultiTalk` dir that holds
  `multitalk.safetensors` and its index json.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..configs import DiTConfig
from ..model.dit import MultiTalkDiT

WAN_DIR_NAME = "Wan2.1-I2V-14B-480P"
MULTITALK_DIR_NAME = "MeiGen-MultiTalk"
WAV2VEC_DIR_NAME = "chinese-wav2vec2-base"
# InfiniteTalk's audio-layer sets over the same base: one for one speaker, one for two (MeiGen-AI/InfiniteTalk).
INFINITETALK_DIR_NAME = "InfiniteTalk"
INFINITETALK_FILES = {
    "infinitetalk-single": "single/infinitetalk.safetensors",
    "infinitetalk-multi": "multi/infinitetalk.safetensors",
}
DIT_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
MULTITALK_WEIGHTS_NAME = "multitalk.safetensors"
# lightx2v's step-distillation LoRA (4 steps, text guidance 1), as published in Kijai/WanVideo_comfy.
FAST_LORA_DIR_NAME = "loras"
FAST_LORA_NAME = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"
# Optional, beside the three folders: bucket tables replacing the built-in ones (the tiny set serves thumbnails).
SIZE_BUCKETS_NAME = "size_buckets.json"

T5_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WAV2VEC_FILES = ("config.json", "preprocessor_config.json")
WAV2VEC_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class WanFiles:
    """Paths of the published files inside the `Wan2.1-I2V-14B-480P` dir (the DiT shards come from its index)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def dit_index(self) -> Path:
        return self.root / DIT_INDEX_NAME

    @property
    def t5(self) -> Path:
        return self.root / "models_t5_umt5-xxl-enc-bf16.pth"

    @property
    def t5_tokenizer(self) -> Path:
        return self.root / "google" / "umt5-xxl"

    @property
    def clip(self) -> Path:
        return self.root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

    @property
    def vae(self) -> Path:
        return self.root / "Wan2.1_VAE.pth"


def is_multitalk_key(key: str) -> bool:
    """True for the audio additions that ship in `multitalk.safetensors` rather than in the Wan shards."""
    return key.startswith("audio_proj.") or ".audio_cross_attn." in key or ".norm_x." in key


def default_multitalk_dir(checkpoint_dir: Path) -> Path:
    return Path(checkpoint_dir).parent / MULTITALK_DIR_NAME


def _read_weight_map(index: Path) -> dict[str, str]:
    if not index.is_file():
        raise FileNotFoundError(f"DiT index not found: {index}")
    try:
        return dict(json.loads(index.read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index json with a weight_map ({e})") from e


def _audio_weight_map(multitalk_dir: Path) -> dict[str, str]:
    """Key -> file name for the MultiTalk dir: its index json, else the header of `multitalk.safetensors`."""
    index = multitalk_dir / DIT_INDEX_NAME
    if index.is_file():
        return _read_weight_map(index)
    weights = multitalk_dir / MULTITALK_WEIGHTS_NAME
    if weights.is_file():
        with _open_safetensors(weights) as f:
            return {key: MULTITALK_WEIGHTS_NAME for key in f.keys()}
    raise FileNotFoundError(
        f"MultiTalk audio weights not found: the DiT index lists no audio keys, and neither {index} nor {weights} "
        f"exists (pass multitalk_dir, or merge MultiTalk's index into the Wan dir as its README says)"
    )


def find_dit_files(checkpoint_dir: Path, multitalk_dir: Path | None = None) -> dict[str, Path]:
    """Every DiT key -> the safetensors file holding it, for either layout (see the module docstring).

    Shard names are looked up in `checkpoint_dir`, then in `multitalk_dir` (default: the sibling `MeiGen-MultiTalk`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    multitalk_dir = Path(multitalk_dir) if multitalk_dir is not None else default_multitalk_dir(checkpoint_dir)
    weight_map = _read_weight_map(checkpoint_dir / DIT_INDEX_NAME)
    if not any(is_multitalk_key(key) for key in weight_map):
        # Wan's own index wins for the base keys; MultiTalk's names the same shards for them anyway.
        weight_map = {**_audio_weight_map(multitalk_dir), **weight_map}
    search = (checkpoint_dir, multitalk_dir)
    paths = {name: next((d / name for d in search if (d / name).is_file()), None) for name in set(weight_map.values())}
    missing = sorted(name for name, path in paths.items() if path is None)
    if missing:
        raise FileNotFoundError(f"DiT weight files not found in {checkpoint_dir} or {multitalk_dir}: {missing}")
    return {key: paths[name] for key, name in weight_map.items()}


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path} (truncated or corrupt safetensors file?): {e}") from e


def _group_by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for key, path in files.items():
        groups.setdefault(path, []).append(key)
    return groups


def load_dit(
    checkpoint_dir: Path,
    multitalk_dir: Path | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    prepare_block: Callable[[torch.nn.Module], None] | None = None,
) -> MultiTalkDiT:
    """The MultiTalk DiT with the published weights, in eval mode without gradients.

    The model is built on the meta device and each tensor is cast to `dtype` on `device` as it is read, so the host
    never holds more than one tensor in the files' float32 (the real shards are 75 GB). Strict: every key of the
    model must come from the files, nothing else may be there, and every shape must match. Blocks are read one at a
    time and `prepare_block(block)` runs on each as soon as it is complete (fp8 quantisation, a move to host
    memory), so the whole DiT in `dtype` never has to fit on `device`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = DiTConfig.from_json(checkpoint_dir / "config.json")
    files = find_dit_files(checkpoint_dir, multitalk_dir)
    with torch.device("meta"):
        model = MultiTalkDiT(config)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}

    missing = sorted(expected.keys() - files.keys())
    if missing:
        raise ValueError(f"DiT checkpoint in {checkpoint_dir}: {len(missing)} model keys in no index: {missing[:20]}")
    unexpected = sorted(files.keys() - expected.keys())
    if unexpected:
        listed = [f"{key} ({files[key].name})" for key in unexpected[:20]]
        raise ValueError(f"DiT checkpoint in {checkpoint_dir}: {len(unexpected)} keys the model lacks: {listed}")

    # Check every header before reading any data, so a bad last shard fails in seconds, not after minutes.
    groups = _group_by_file(files)
    for path, keys in groups.items():
        with _open_safetensors(path) as f:
            stored = set(f.keys())
            for key in keys:
                if key not in stored:
                    raise ValueError(f"{path}: the index lists {key!r}, but the file does not hold it")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    want = list(expected[key])
                    raise ValueError(f"{path}: {key!r} has shape {list(shape)}, the model expects {want}")

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for path, file_keys in _group_by_file({key: files[key] for key in keys}).items():
            with _open_safetensors(path) as f:
                for key in file_keys:
                    try:
                        tensor = f.get_tensor(key)
                    except (SafetensorError, OSError) as e:
                        raise ValueError(f"cannot read {key!r} from {path} (truncated or corrupt?): {e}") from e
                    tensors[key] = tensor.to(device=device, dtype=dtype)
                    # Drop the fp32 copy now; else it stays alive while the next tensor is read.
                    del tensor
        return tensors

    for index, block in enumerate(model.blocks):
        prefix = f"blocks.{index}."
        block_tensors = read([key for key in expected if key.startswith(prefix)])
        block.load_state_dict({k.removeprefix(prefix): t for k, t in block_tensors.items()}, strict=True, assign=True)
        del block_tensors
        if prepare_block is not None:
            prepare_block(block)
    # Every key is accounted for above, so non-strict only skips the blocks, which are in already.
    model.load_state_dict(read([key for key in expected if not key.startswith("blocks.")]), strict=False, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"MultiTalkDiT tensors not initialised after loading: {leftover}")
    return model.eval().requires_grad_(False)


def check_files(
    checkpoint_dir: Path,
    multitalk_dir: Path | None = None,
    wav2vec_dir: Path | None = None,
    infinitetalk_dir: Path | None = None,
) -> None:
    """Raise one FileNotFoundError that lists every missing published file, or return if all are there.

    Checks the Wan dir (config, encoders, VAE, the text tokenizer, the DiT shards its index or MultiTalk's names), the
    MultiTalk weights, and the wav2vec2 and InfiniteTalk dirs when given.
    """
    checkpoint_dir = Path(checkpoint_dir)
    wan = WanFiles(checkpoint_dir)
    required = [wan.config, wan.t5, wan.clip, wan.vae]
    required += [wan.t5_tokenizer / name for name in T5_TOKENIZER_FILES]
    if wav2vec_dir is not None:
        wav2vec_dir = Path(wav2vec_dir)
        required += [wav2vec_dir / name for name in WAV2VEC_FILES]
    if infinitetalk_dir is not None:
        required += [Path(infinitetalk_dir) / name for name in INFINITETALK_FILES.values()]
    problems = [f"missing: {path}" for path in required if not path.is_file()]
    if wav2vec_dir is not None and not any((wav2vec_dir / name).is_file() for name in WAV2VEC_WEIGHT_NAMES):
        problems.append(f"missing: {wav2vec_dir / WAV2VEC_WEIGHT_NAMES[0]} (or {WAV2VEC_WEIGHT_NAMES[1]})")
    if not (checkpoint_dir / DIT_INDEX_NAME).is_file():
        # Without the Wan index nothing says which layout this is: name the plain downloads' files.
        multitalk = Path(multitalk_dir) if multitalk_dir is not None else default_multitalk_dir(checkpoint_dir)
        for path in (checkpoint_dir / DIT_INDEX_NAME, multitalk / MULTITALK_WEIGHTS_NAME, multitalk / DIT_INDEX_NAME):
            if not path.is_file():
                problems.append(f"missing: {path}")
    else:
        try:
            find_dit_files(checkpoint_dir, multitalk_dir)
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    if problems:
        raise FileNotFoundError("checkpoint files missing:\n  " + "\n  ".join(problems))


def dit_tensor_reader(
    checkpoint_dir: Path,
    multitalk_dir: Path | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> Callable[[str], torch.Tensor]:
    """`read(key)`: one DiT tensor read back from the published files, cast as `load_dit` casts it.

    Lets a LoRA merge be undone exactly without keeping copies of the touched weights.
    """
    files = find_dit_files(checkpoint_dir, multitalk_dir)

    def read(key: str) -> torch.Tensor:
        with _open_safetensors(files[key]) as f:
            return f.get_tensor(key).to(device=device, dtype=dtype)

    return read
