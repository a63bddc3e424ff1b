"""LoRA loading and exact, reversible merging into the DiT, on its original (Wan) parameter names.

Formats: the reference's `diffusion_model.<module>.lora_down/lora_up` (+ `.alpha`, `.diff`, `.diff_b`), kohya
`lora_unet_<module_with_underscores>.*`, and PEFT/diffusers `lora_A/lora_B` on Wan or diffusers module names
(`transformer.`, `diffusion_model.` or `base_model.model.` prefix). A key that fits no parameter is an error, except
the kinds the reference does not apply either (`.diff_m`), which are skipped.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..model.fp8 import Fp8Linear

LoRASource = str | Path | Mapping[str, torch.Tensor]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_KOHYA_PREFIX = "lora_unet_"
_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up", ".lora_B.weight": "up",
    ".lora_B.bias": "diff_b", ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
}  # fmt: skip
# diffusers WanTransformer3DModel module names -> Wan originals (inverse of diffusers' Wan checkpoint/LoRA converters).
_DIFFUSERS_TOP = {"proj_out": "head.head", "scale_shift_table": "head.modulation"} | {
    f"condition_embedder.{theirs}": wan for theirs, wan in (
        ("time_embedder.linear_1", "time_embedding.0"), ("time_embedder.linear_2", "time_embedding.2"),
        ("text_embedder.linear_1", "text_embedding.0"), ("text_embedder.linear_2", "text_embedding.2"),
        ("time_proj", "time_projection.1"), ("image_embedder.norm1", "img_emb.proj.0"),
        ("image_embedder.ff.net.0.proj", "img_emb.proj.1"), ("image_embedder.ff.net.2", "img_emb.proj.3"),
        ("image_embedder.norm2", "img_emb.proj.4"))
}  # fmt: skip
_DIFFUSERS_BLOCK = {
    f"{attn}.{theirs}": f"{ours}.{wan}" for attn, ours in (("attn1", "self_attn"), ("attn2", "cross_attn"))
    for theirs, wan in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                        ("norm_k", "norm_k"), ("add_k_proj", "k_img"), ("add_v_proj", "v_img"),
                        ("norm_added_k", "norm_k_img"))
} | {
    "norm2": "norm3", "norm3": "norm2",  # diffusers swapped the names of the two block norms
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation",
}  # fmt: skip
_DIFFUSERS_MARKER = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|scale_shift_table|ffn\.net)(\.|$)")
_LISTED = 5
_REFERENCE_SKIPS = (".diff_m",)

log = logging.getLogger(__name__)


class LoRAError(ValueError):
    """A LoRA that cannot be applied completely (unreadable file, keys or shapes that fit no model parameter)."""


@dataclass
class LoRAEntry:
    """Everything one LoRA adds to one module; `param_name` is the weight (or bare parameter) it changes."""

    param_name: str
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    keys: tuple[str, ...] = ()  # the LoRA file's own keys, for error messages

    @property
    def bias_name(self) -> str:
        return self.param_name.removesuffix(".weight") + ".bias"


def _raise_if(problems: list[str], source: str) -> None:
    if problems:
        more = f" ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        raise LoRAError(f"LoRA {source}: {len(problems)} key(s) do not fit the model: "
                        + "; ".join(problems[:_LISTED]) + more)  # fmt: skip


def load_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors LoRA file, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"LoRA file not found: {path}")
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises several types for truncated or non-safetensors files
        raise LoRAError(f"LoRA file {path} is not a readable safetensors file: {error}") from error


def _from_diffusers(path: str) -> str:
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", path)
    return f"blocks.{block[1]}.{_DIFFUSERS_BLOCK.get(block[2], block[2])}" if block else _DIFFUSERS_TOP.get(path, path)


def _split_key(key: str) -> tuple[str, str] | None:
    """`diffusion_model.blocks.0.ffn.0.lora_up.weight` -> (`blocks.0.ffn.0`, `up`), prefix still on kohya keys."""
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            module = key.removesuffix(suffix)
            prefix = next((prefix for prefix in _PREFIXES if module.startswith(prefix)), "")
            return module.removeprefix(prefix), part
    return None


def normalize_lora_keys(
    state_dict: Mapping[str, torch.Tensor], model_param_names: Iterable[str], source: str = "state dict"
) -> list[LoRAEntry]:
    """Group a LoRA's tensors by the model parameter they change; raise LoRAError listing every key that fits none."""
    names = set(model_param_names)
    targets = {n.rsplit(".", 1)[0] for n in names if n.endswith((".weight", ".bias"))}
    targets |= {n for n in names if not n.endswith((".weight", ".bias"))}  # bare parameters such as `modulation`
    split = {key: _split_key(key) for key in state_dict}
    # Kijai's LoRAs hold `.diff_m` modulation deltas, which the reference passes over (it applies only the suffixes it
    # knows); so do we, saying so. Any other unknown key is an error: a full weight, say, means no LoRA file.
    skipped = sorted(key for key, parts in split.items() if parts is None and key.endswith(_REFERENCE_SKIPS))
    if skipped:
        listed = ", ".join(skipped[:_LISTED]) + (
            f" and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else ""
        )
        log.info("LoRA %s: %d keys the reference does not apply either are skipped: %s", source, len(skipped), listed)
    problems = [f"{key} (unknown key format)" for key, parts in split.items() if parts is None and key not in skipped]
    # A file uses diffusers module names or Wan ones, never a mix; decide once so `blocks.0.norm2` is unambiguous.
    diffusers_names = any(_DIFFUSERS_MARKER.search(parts[0]) for parts in split.values() if parts)
    # kohya's `blocks_0_self_attn_q` is looked up among the model's own paths, never split by guessing (None: ambiguous)
    kohya_index: dict[str, str | None] = {}
    for path in targets:
        kohya_index[path.replace(".", "_")] = None if path.replace(".", "_") in kohya_index else path
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    for key, (module, part) in ((key, parts) for key, parts in split.items() if parts):
        if module.startswith(_KOHYA_PREFIX):
            resolved = kohya_index.get(module.removeprefix(_KOHYA_PREFIX), "")
            if not resolved:
                problems.append(f"{key} ({'ambiguous' if resolved is None else 'no'} model module matches)")
                continue
            module = resolved
        elif diffusers_names:
            module = _from_diffusers(module)
        if module not in targets:
            problems.append(f"{key} (model has no module {module!r})")
        elif part in grouped[module]:
            problems.append(f"{key} (duplicates {grouped[module][part]})")
        else:
            grouped[module][part] = key
    entries = []
    for module, parts in grouped.items():
        keys = tuple(parts.values())
        weight = f"{module}.weight" if f"{module}.weight" in names else module if module in names else None
        if ("up" in parts) != ("down" in parts):
            problems.append(f"{', '.join(keys)} (lora up without down or down without up)")
        elif "alpha" in parts and "up" not in parts:
            problems.append(f"{parts['alpha']} (alpha without lora up/down)")
        elif weight is None and parts.keys() & {"up", "diff"}:
            problems.append(f"{', '.join(keys)} (module {module!r} has no weight)")
        elif "diff_b" in parts and f"{module}.bias" not in names:
            problems.append(f"{parts['diff_b']} (module {module!r} has no bias)")
        else:
            tensors = {part: state_dict[key] for part, key in parts.items()}
            alpha = float(tensors.pop("alpha").item()) if "alpha" in tensors else None
            entries.append(LoRAEntry(weight or f"{module}.weight", alpha=alpha, keys=keys, **tensors))
    if not state_dict:
        problems.append("(no tensors at all)")
    _raise_if(problems, source)
    return entries


def _shape_problems(entry: LoRAEntry, params: Mapping[str, torch.Tensor]) -> list[str]:
    problems = []
    if entry.up is not None:
        weight, up, down = params[entry.param_name], entry.up, entry.down
        # A Conv3d weight [out, in, *k] takes down [r, in, *k] and up [out, r, 1, 1, 1].
        ranks_match = up.ndim >= 2 and down.ndim >= 2 and up[0].numel() == up.shape[1] == down.shape[0]
        if not ranks_match or (up.shape[0], *down.shape[1:]) != tuple(weight.shape):
            problems.append(f"{entry.keys} (up {list(up.shape)} @ down {list(down.shape)} does not give "
                            f"{entry.param_name} {list(weight.shape)})")  # fmt: skip
    for diff, name in ((entry.diff, entry.param_name), (entry.diff_b, entry.bias_name)):
        if diff is not None and diff.shape != params[name].shape:
            problems.append(f"{entry.keys} (diff {list(diff.shape)} does not fit {name} {list(params[name].shape)})")
    return problems


def _delta(entry: LoRAEntry, bias: bool, scale: float, alpha_mode: str, param: torch.Tensor) -> torch.Tensor:
    """scale · (ratio · up@down + diff) for a weight, scale · diff_b for a bias; float32 on the parameter's device."""
    device, shape = param.device, param.shape
    if bias:
        return scale * entry.diff_b.to(device, torch.float32)
    delta = torch.zeros(shape, dtype=torch.float32, device=device)
    if entry.up is not None:
        # The reference ignores `.alpha` (ratio 1); "standard" is what kohya/PEFT/ComfyUI define: alpha / rank.
        ratio = entry.alpha / entry.down.shape[0] if alpha_mode == "standard" and entry.alpha is not None else 1.0
        up, down = entry.up.to(device, torch.float32).flatten(1), entry.down.to(device, torch.float32).flatten(1)
        delta += (scale * ratio) * (up @ down).reshape(shape)
    if entry.diff is not None:
        delta += scale * entry.diff.to(device, torch.float32)
    return delta


Contributions = dict[str, list[tuple[float, LoRAEntry, bool]]]  # parameter -> (scale, entry, is its bias)


def _contributions(params: Mapping[str, torch.Tensor], loras: Sequence[tuple[LoRASource, float]]) -> Contributions:
    """Every LoRA read and checked against the model's parameters, before any weight changes."""
    contributions: Contributions = defaultdict(list)
    for index, (source, scale) in enumerate(loras):
        label = str(source) if isinstance(source, (str, Path)) else f"state dict #{index}"
        state_dict = load_lora_file(source) if isinstance(source, (str, Path)) else source
        entries = normalize_lora_keys(state_dict, params, label)
        _raise_if([problem for entry in entries for problem in _shape_problems(entry, params)], label)
        for entry in entries:
            if entry.up is not None or entry.diff is not None:
                contributions[entry.param_name].append((scale, entry, False))
            if entry.diff_b is not None:
                contributions[entry.bias_name].append((scale, entry, True))
    return contributions


def _merged_value(param: torch.Tensor, contributions: list, alpha_mode: str) -> torch.Tensor:
    """A parameter's deltas summed in float32 and added to it, rounded to its dtype once."""
    delta = sum(_delta(entry, bias, scale, alpha_mode, param) for scale, entry, bias in contributions)
    return (param.float() + delta).to(param.dtype)


@dataclass
class MergedLoRA:
    """Merged LoRAs; `restore()` puts back the exact original values of the parameters they touched.

    Memory: without `reload`, copies of the touched parameters stay in host RAM (a LoRA on every attention and FFN
    linear of the 14B DiT touches most of its ~33 GB of bf16), none on the GPU. With `reload(name) -> Tensor` (e.g. the
    checkpoint loader) nothing is kept but those tensors are read again; it must return what the model was loaded with.
    """

    model: torch.nn.Module
    param_names: list[str]
    originals: dict[str, torch.Tensor]  # empty when `reload` is given
    reload: Callable[[str], torch.Tensor] | None = None
    restored: bool = False

    @torch.no_grad()
    def restore(self) -> None:
        if self.restored:
            raise RuntimeError("these LoRAs were already restored")
        params = _weights(self.model)
        fp8 = _fp8_weights(self.model)
        for name in self.param_names:
            original = self.reload(name) if self.reload is not None else self.originals.pop(name)
            if original.shape != params[name].shape:
                raise LoRAError(f"reload({name!r}) gave {list(original.shape)}, not {list(params[name].shape)}")
            if name in fp8:
                fp8[name].set_weight(original)  # quantised as when loaded: the same e4m3 values and scales
            else:
                params[name].copy_(original.to(params[name].device, params[name].dtype))
        self.restored = True


def _fp8_weights(model: torch.nn.Module) -> dict[str, Fp8Linear]:
    """`<module>.weight` -> the Fp8Linear holding that weight in e4m3 (`wan.fp8.quantize_blocks`)."""
    return {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, Fp8Linear)}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter a LoRA may change; an fp8 weight appears as a meta tensor of its logical shape `[out, in]`."""
    params = dict(model.named_parameters())
    for name, module in _fp8_weights(model).items():
        params[name] = torch.empty(module.out_features, module.in_features, device="meta")
    return params


@torch.no_grad()
def merge_loras(
    model: torch.nn.Module,
    loras: Sequence[tuple[LoRASource, float]],
    alpha_mode: str = "standard",
    reload: Callable[[str], torch.Tensor] | None = None,
) -> MergedLoRA:
    """Add `scale · delta` of each (file or state dict, scale) to the model's weights in place, on their device.

    alpha_mode "standard": up@down times alpha/rank where the LoRA stores `.alpha` (PEFT files hold none: ratio 1);
    "reference": alpha ignored, like the reference's WanLoraWrapper. Every LoRA is read and checked before any weight
    changes; a parameter's deltas are summed in float32 and rounded to its dtype once. Two files with the same stem
    are two list items, each applied once (the reference applied the first one twice).
    """
    if alpha_mode not in ("standard", "reference"):
        raise ValueError(f"alpha_mode must be 'standard' or 'reference', got {alpha_mode!r}")
    params = _weights(model)
    fp8 = _fp8_weights(model)
    contributions = _contributions(params, loras)
    touched = list(contributions)
    if reload is None and fp8.keys() & contributions.keys():
        raise LoRAError("LoRA on fp8 weights: the bf16 originals are not in memory; merge with `reload` (checkpoint)")
    originals = {} if reload is not None else {name: params[name].detach().to("cpu", copy=True) for name in touched}
    for name in touched:
        # An fp8 weight merges into its bf16 original, read again, and is quantised anew.
        param = reload(name) if name in fp8 else params[name]
        merged = _merged_value(param, contributions[name], alpha_mode)
        if name in fp8:
            fp8[name].set_weight(merged)
        else:
            param.copy_(merged)
    return MergedLoRA(model, touched, originals, reload)


class LoraSet:
    """The LoRAs merged into a model, switched exactly: `set()` undoes the current set (restoring the exact base
    weights) before merging the new one, and does nothing when the set is unchanged."""

    def __init__(
        self, model: torch.nn.Module, reload: Callable[[str], torch.Tensor] | None = None, alpha_mode: str = "standard"
    ):
        self.model, self.reload, self.alpha_mode = model, reload, alpha_mode
        self.active: list[tuple[str, float]] = []
        self._merged: MergedLoRA | None = None

    def set(self, loras: Sequence[tuple[str | Path, float]]) -> None:
        wanted = [(str(path), float(scale)) for path, scale in loras]
        if wanted == self.active:
            return
        if self._merged is not None:
            self._merged.restore()
            self._merged, self.active = None, []
        if wanted:
            self._merged = merge_loras(self.model, wanted, alpha_mode=self.alpha_mode, reload=self.reload)
            self.active = wanted

    @torch.no_grad()
    def values_with(self, loras: Sequence[tuple[str | Path, float]], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """What the (non-fp8) parameters `names` would hold after `set(loras)`, computed as the merge computes them;
        the model keeps what it holds."""
        wanted = [(str(path), float(scale)) for path, scale in loras]
        params = dict(self.model.named_parameters())
        if wanted == self.active:
            return {name: params[name] for name in names}
        contributions = _contributions(_weights(self.model), wanted)
        values = {}
        for name in names:
            base = params[name]
            if self._merged is not None and name in self._merged.param_names:  # the current set touched it
                original = self.reload(name) if self.reload is not None else self._merged.originals[name]
                base = original.to(base.device, base.dtype)
            values[name] = _merged_value(base, contributions[name], self.alpha_mode) if name in contributions else base
        return values
