"""Memory plans: the choice from a free-memory figure, and block streaming against the resident model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from support.golden import load_case
from PIL import Image

from wan import GenerationRequest, Pipeline, SamplingOptions, load_pipeline
from wan.loading.checkpoints import load_dit
from wan.loading.lora import LoRAError, merge_loras
from wan.model.dit import MultiTalkDiT
from wan.model.fp8 import Fp8Linear, quantize_blocks
from service.settings import MEMORY_PLAN_ENV, Settings
from wan.runtime.placement import EncodeOnDevice, plan_for_device
from wan.runtime.plans import FP8, GIB, RESIDENT, STREAMED, VAE_TILE_PX, choose_memory_plan
from wan.runtime.streaming import BlockStreamer, ParkedWeights, module_tensors, stream_blocks

# Worked by hand from the component sizes (GiB): weights that stay + the largest phase + 2.0 margin.
# resident: 35.17 DiT + 10.58 T5 + 1.18 CLIP + 0.47 VAE + 0.24 its bf16 copy + 0.35 wav2vec = 47.99, + 9.8 decode
#           + 2.0 = 59.79
# fp8:      18.19 DiT + 1.18 + 0.47 + 0.24 + 0.35 = 20.43, + 10.58 T5 while encoding + 2.0 = 33.01
# streamed: 0.59 non-block DiT + 2 x 0.44 slots + 1.18 + 0.47 + 0.24 + 0.35 = 3.71, + 10.58 T5 + 2.0 = 16.29
RESIDENT_NEEDS, FP8_NEEDS, STREAMED_NEEDS = 59.79, 33.01, 16.29


@pytest.mark.parametrize(
    "free_gib, expected",
    [
        (79.1, "resident"),  # an 80 GB card, nothing else on it
        (RESIDENT_NEEDS, "resident"),
        (RESIDENT_NEEDS - 0.01, "fp8"),
        (46.0, "fp8"),  # the 46 GiB cap of the device check
        (44.3, "fp8"),  # a 48 GB card
        (39.4, "fp8"),  # a 40 GB card
        (FP8_NEEDS, "fp8"),
        (FP8_NEEDS - 0.01, "streamed"),
        (31.3, "streamed"),  # a 32 GB card
        (24.0, "streamed"),  # the 24 GiB cap of the device check
        (22.5, "streamed"),  # a 24 GB card with a display attached
        (STREAMED_NEEDS, "streamed"),
    ],
)
def test_plan_chosen_from_free_memory(free_gib, expected):
    plan = choose_memory_plan(math.ceil(free_gib * GIB))
    assert plan.name == expected


def test_plan_fields_follow_the_issue():
    resident, fp8, streamed = (choose_memory_plan(int(g * GIB)) for g in (80, 46, 24))
    assert (resident.dit_weights, resident.dit_placement, resident.text_encoder, resident.vae_tiled) == (
        "bf16",
        "resident",
        "resident",
        False,
    )
    assert (fp8.dit_weights, fp8.dit_placement, fp8.text_encoder, fp8.vae_tiled) == (
        "fp8",
        "resident",
        "while_encoding",
        False,
    )
    assert (streamed.dit_weights, streamed.dit_placement, streamed.text_encoder, streamed.vae_tiled) == (
        "fp8",
        "streamed",
        "while_encoding",
        True,
    )
    # Host: 40 fp8 blocks (18.19 - 0.59 = 17.6) + the parked text encoder (10.58).
    assert streamed.host_gib == pytest.approx(28.18) and fp8.host_gib == pytest.approx(10.58)


def test_too_little_memory_is_a_clear_error():
    with pytest.raises(ValueError, match=r"16\.29 GiB.*MULTITALK_MEMORY_PLAN=streamed"):
        choose_memory_plan(int((STREAMED_NEEDS - 0.01) * GIB), setting=MEMORY_PLAN_ENV)


@pytest.mark.parametrize("override, expected", [("resident", "resident"), ("fp8", "fp8"), (" Streamed ", "streamed")])
def test_override_wins_over_free_memory(override, expected):
    assert choose_memory_plan(int(8 * GIB), override).name == expected
    assert choose_memory_plan(int(80 * GIB), override).name == expected


def test_empty_override_means_choose():
    assert choose_memory_plan(int(46 * GIB), "").name == "fp8"


def test_bad_override_names_the_variable_and_the_choices():
    with pytest.raises(
        ValueError,
        match=r"MULTITALK_MEMORY_PLAN='fast' is not a memory plan; use one of resident, "
        r"fp8, streamed",
    ):
        choose_memory_plan(int(80 * GIB), "fast", MEMORY_PLAN_ENV)


def test_cpu_device_runs_resident_unless_overridden():
    def plan(environ: dict[str, str]):
        return plan_for_device("cpu", Settings.from_env(environ).memory_plan, MEMORY_PLAN_ENV)

    assert plan({}).name == "resident"
    assert plan({MEMORY_PLAN_ENV: "streamed"}).name == "streamed"
    with pytest.raises(ValueError, match="MULTITALK_MEMORY_PLAN='tiny'"):
        plan({MEMORY_PLAN_ENV: "tiny"})


# --- block streaming: the real streamer, host-to-host on the CPU ----------------------------------------------------

INPUT_NAMES = ("x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks")


def golden_inputs(case) -> dict[str, torch.Tensor]:
    inputs = case.inputs()
    return {name: inputs[name] for name in INPUT_NAMES}


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def record_block_storages(model: MultiTalkDiT) -> list[set[int]]:
    """Per block call: the storages its parameters and buffers live in while it runs."""
    seen: list[set[int]] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append({storage_of(t) for t in module_tensors(m)}))
    return seen


@pytest.mark.parametrize("case_name", ["dit_1p", "dit_2p"])
def test_streamed_blocks_equal_resident_bit_for_bit(case_name):
    case = load_case(case_name)
    inputs = golden_inputs(case)
    with torch.no_grad():
        resident = case.dit()(**inputs)
        model = case.dit()
        streamer = stream_blocks(model, "cpu")
        seen = record_block_storages(model)
        streamed = model(**inputs)
        streamed_again = model(**inputs)
    assert torch.equal(streamed, resident) and torch.equal(streamed_again, resident)
    case.assert_close("out", streamed[None])
    # While a block runs its weights live in a slot (blocks alternate between the two); afterwards in its host buffer.
    slots = [storage_of(slot) for slot in streamer.slots]
    assert seen == [{slots[0]}, {slots[1]}] * 2
    for block, host in zip(model.blocks, streamer.host_blocks):
        assert {storage_of(t) for t in module_tensors(block)} == {storage_of(host.buffer)}
    # Only the blocks stream; the rest stays where it was (here the CPU) as ordinary tensors.
    assert storage_of(model.head.head.weight) not in {storage_of(h.buffer) for h in streamer.host_blocks}


def test_streamed_weights_are_read_from_the_host_buffers_on_every_pass():
    case = load_case("dit_2p")
    inputs = golden_inputs(case)
    model = case.dit()
    stream_blocks(model, "cpu")
    changed = case.dit()
    with torch.no_grad():
        before = model(**inputs)
        # Through the module's own parameter, which is a view of block 1's host buffer.
        model.blocks[1].ffn[2].weight.mul_(2)
        changed.blocks[1].ffn[2].weight.mul_(2)
        after = model(**inputs)
        truth = changed(**inputs)
    assert torch.equal(after, truth)
    assert not torch.equal(after, before)


def test_fp8_blocks_stream_bit_for_bit():
    """Fp8Linear's e4m3 weights and float32 scales are buffers; they stream like parameters."""
    case = load_case("dit_2p")

    def build() -> MultiTalkDiT:
        model = case.dit().to(torch.bfloat16)
        quantize_blocks(model, min_features=64)  # the tiny blocks' linears have 64 inputs
        return model

    inputs = golden_inputs(case)
    resident_model, model = build(), build()
    # every block linear: self q k v o, cross q k v o k_img v_img, ffn x2, audio q kv proj
    assert sum(isinstance(m, Fp8Linear) for m in model.blocks[0].modules()) == 15
    streamer = stream_blocks(model, "cpu")
    with torch.no_grad():
        resident = resident_model(**inputs)
        streamed = model(**inputs)
    assert torch.isfinite(resident).all() and torch.equal(streamed, resident)
    block_bytes = sum(t.nbytes for t in module_tensors(resident_model.blocks[0]))
    assert block_bytes <= streamer.slot_bytes < block_bytes + 256 * len(module_tensors(model.blocks[0]))


def test_streamer_rejects_a_model_with_other_blocks():
    case = load_case("dit_1p")
    model = case.dit()
    streamer = stream_blocks(model, "cpu")
    with pytest.raises(ValueError, match="holds 2 blocks, the model has 1"):
        streamer(model.blocks[:1], torch.zeros(1), {})
    assert isinstance(model.run_blocks, BlockStreamer)


class TiedModule(torch.nn.Module):
    """An embedding and an output layer sharing one weight, like the T5's tied embeddings."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("offset", torch.linspace(-1, 1, 16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(ids)) + self.offset))


def test_parked_module_runs_from_a_device_copy_and_returns_home():
    generator = torch.Generator().manual_seed(5)
    module = TiedModule().requires_grad_(False)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    ids = torch.tensor([[1, 7, 49, 3]])
    with torch.no_grad():
        truth = module(ids)
    # Groups of at most 2 KiB: the 3.2 KiB embedding alone, then the rest, so grouping is exercised.
    parked = ParkedWeights(module, "cpu", group_bytes=2048)
    assert len(parked.groups) == 2
    home = {storage_of(group.buffer) for group in parked.groups}
    assert {storage_of(t) for t in module_tensors(module)} == home
    with torch.no_grad(), parked.on_device() as on_device:
        inside = {storage_of(t) for t in module_tensors(on_device)}
        out = on_device(ids)
    assert inside.isdisjoint(home) and len(inside) == 2
    assert torch.equal(out, truth)
    assert module.out.weight is module.embed.weight  # still tied
    assert {storage_of(t) for t in module_tensors(module)} == home


# --- plans put in place: the loader and the pipeline on the tiny checkpoint set --------------------------------------


def test_load_dit_prepares_each_block_before_reading_the_next(tiny_weights):
    states = []

    def prepare(block):
        model_blocks = block_list[0]
        states.append([all(not t.is_meta for t in module_tensors(b)) for b in model_blocks])

    block_list = []
    original = MultiTalkDiT.__init__

    def remember(self, config):
        original(self, config)
        block_list.append(self.blocks)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MultiTalkDiT, "__init__", remember)
        model = load_dit(tiny_weights / "Wan2.1-I2V-14B-480P", dtype=torch.float32, prepare_block=prepare)
    # Block i is complete when prepared, block i+1 not yet read.
    assert states == [[True, False], [True, True]]
    assert model.blocks is block_list[0]


def tiny_pipeline(root, plan) -> Pipeline:
    return load_pipeline(
        root / "Wan2.1-I2V-14B-480P", root / "MeiGen-MultiTalk", device="cpu", dtype=torch.float32, memory_plan=plan
    )


def tiny_video(pipeline: Pipeline, width: int = 96) -> torch.Tensor:
    config = pipeline.dit.config
    generator = torch.Generator().manual_seed(0)
    audio = tuple(torch.randn(5, config.audio_layers, config.audio_channels, generator=generator) for _ in range(2))
    request = GenerationRequest("two people talk", Image.new("RGB", (width, 64), (120, 100, 90)), audio)
    options = SamplingOptions(size_bucket={"1.00": [64, width]}, frame_num=5, steps=2, seed=1)
    return pipeline.generate(request, options, progress=False)


def test_text_encoder_parked_between_calls_gives_the_resident_video(tiny_weights):
    resident = tiny_pipeline(tiny_weights, RESIDENT)
    parked = tiny_pipeline(tiny_weights, dataclasses.replace(RESIDENT, text_encoder="while_encoding"))
    assert isinstance(parked.text_encoder, EncodeOnDevice) and not isinstance(resident.text_encoder, EncodeOnDevice)
    home = {storage_of(group.buffer) for group in parked.text_encoder.parked.groups}
    assert {storage_of(t) for t in module_tensors(parked.text_encoder.encoder.model)} == home
    assert torch.equal(tiny_video(parked), tiny_video(resident))


def test_streamed_plan_gives_the_fp8_resident_video(tiny_weights):
    fp8 = tiny_pipeline(tiny_weights, FP8)
    streamed = tiny_pipeline(tiny_weights, dataclasses.replace(STREAMED, vae_tiled=False))
    assert isinstance(streamed.dit.module.run_blocks, BlockStreamer)
    assert not isinstance(fp8.dit.module.run_blocks, BlockStreamer)
    assert torch.equal(tiny_video(streamed), tiny_video(fp8))


def test_streamed_plan_tiles_the_vae(tiny_weights):
    tiled = tiny_pipeline(tiny_weights, STREAMED)
    untiled = tiny_pipeline(tiny_weights, dataclasses.replace(STREAMED, vae_tiled=False))
    assert tiled.vae.model.use_tiling and not untiled.vae.model.use_tiling
    assert tiled.vae.model.tile_sample_min_width == VAE_TILE_PX
    # Wider than one tile: tiled and untiled decodes differ (the tiles are blended), yet describe the same video.
    width = VAE_TILE_PX + 64
    video_tiled, video_untiled = tiny_video(tiled, width), tiny_video(untiled, width)
    assert video_tiled.shape == video_untiled.shape == (3, 5, 64, width)
    difference = (video_tiled - video_untiled).abs()
    assert difference.max() > 0
    assert difference.mean() < 0.1 * video_untiled.abs().mean()


# --- LoRAs on fp8 weights (the fp8 and streamed plans): merged into the re-read bf16 original, then quantised ------


def rank2_lora(model: MultiTalkDiT, names: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    lora = {}
    for name in names:
        out_features, in_features = model.get_submodule(name).weight.shape
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, in_features, generator=generator) * 0.5
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_features, 2, generator=generator) * 0.5
        lora[f"diffusion_model.{name}.alpha"] = torch.tensor(4.0)
    return lora


@pytest.mark.parametrize("streamed", [False, True])
def test_lora_on_fp8_weights_equals_merging_in_bf16_then_quantising(streamed):
    case = load_case("dit_2p")
    bf16 = case.dit().to(torch.bfloat16)
    originals = {name: tensor.clone() for name, tensor in bf16.state_dict().items()}
    touched = ["blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.1.audio_cross_attn.proj"]
    lora = rank2_lora(bf16, touched, torch.Generator().manual_seed(3))
    # Truth: the plain bf16 merge, then the model quantised.
    merge_loras(bf16, [(lora, 0.7)])
    quantize_blocks(bf16, min_features=64)
    untouched = case.dit().to(torch.bfloat16)
    quantize_blocks(untouched, min_features=64)

    model = case.dit().to(torch.bfloat16)
    quantize_blocks(model, min_features=64)
    if streamed:
        stream_blocks(model, "cpu")
    merged = merge_loras(model, [(lora, 0.7)], reload=lambda name: originals[name])
    assert sorted(merged.param_names) == sorted(f"{name}.weight" for name in touched)
    inputs = golden_inputs(case)
    with torch.no_grad():
        assert torch.equal(model(**inputs), bf16(**inputs))
        for name in touched:
            ours, truth = model.get_submodule(name), bf16.get_submodule(name)
            assert torch.equal(ours.weight.float(), truth.weight.float())
            assert torch.equal(ours.weight_scale, truth.weight_scale)
        merged.restore()
        for name in touched:
            ours, base = model.get_submodule(name), untouched.get_submodule(name)
            assert torch.equal(ours.weight.float(), base.weight.float())
            assert torch.equal(ours.weight_scale, base.weight_scale)
        assert torch.equal(model(**inputs), untouched(**inputs))


def test_lora_on_fp8_weights_needs_the_checkpoint():
    case = load_case("dit_1p")
    model = case.dit().to(torch.bfloat16)
    lora = rank2_lora(model, ["blocks.0.ffn.0"], torch.Generator().manual_seed(4))
    quantize_blocks(model, min_features=64)
    with pytest.raises(LoRAError, match="fp8 weights.*reload"):
        merge_loras(model, [(lora, 1.0)])
