"""`bench.RandomSource`, the benchmarks' random DiT: any tensor is drawn again exactly, so a LoRA is merged into fp8
weights and undone as with the published files (the GPU benchmarks of two-GPU fp8 requests rest on it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench import RandomSource, tiny_config
from wan.loading.lora import LoraSet
from wan.runtime.plans import FP8
from wan.model.fp8 import Fp8Linear

CPU = torch.device("cpu")


def test_every_tensor_is_drawn_again_exactly() -> None:
    source = RandomSource(tiny_config(), torch.float32, seed=7)
    dit = source.build(CPU)
    read = source.tensor_reader(CPU)
    for name, param in dit.named_parameters():
        assert torch.equal(read(name), param), name
    other = RandomSource(tiny_config(), torch.float32, seed=8).tensor_reader(CPU)
    assert not torch.equal(other("blocks.0.self_attn.q.weight"), read("blocks.0.self_attn.q.weight"))


def test_a_lora_on_fp8_weights_is_merged_and_undone_exactly(tmp_path: Path) -> None:
    # Wide enough for the fp8 plan to quantise the block's linears (it leaves those under 1024 inputs).
    config = dataclasses.replace(tiny_config(), dim=1024, ffn_dim=1024, num_heads=8, num_layers=1)
    source = RandomSource(config, torch.bfloat16)
    dit = source.build(CPU, FP8)
    fp8 = [name for name, module in dit.named_modules() if isinstance(module, Fp8Linear)]
    assert fp8
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for name in fp8:
        module = dit.get_submodule(name)
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator)
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in lora.items()}, tmp_path / "lora.safetensors")
    before = {key: value.clone() for key, value in dit.state_dict().items()}

    loras = LoraSet(dit, reload=source.tensor_reader(CPU))
    loras.set([(tmp_path / "lora.safetensors", 1.0)])
    changed = [key for key, value in dit.state_dict().items() if not torch.equal(value, before[key])]
    assert any(key.startswith(fp8[0]) for key in changed)
    loras.set([])
    for key, value in dit.state_dict().items():
        assert torch.equal(value, before[key]), key
