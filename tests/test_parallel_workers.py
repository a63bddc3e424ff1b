"""The worker processes of `wan.runtime.workers` on 2 CPU processes (gloo) with the golden tiny DiT: the guidance
passes of a step, sequence-parallel (1x2) and guidance-parallel (2x1), against the same passes run in this process
by the plain path; TeaCache over several steps; a worker that dies or fails, and the restart after it; the whole
pipeline with its DiT in the workers against the plain pipeline; the compiled workers' kernels kept between starts."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from support.golden import cases_with_prefix, golden_parts, load_case
from PIL import Image

from wan import GenerationRequest, GuidanceOptions, Pipeline, SamplingOptions
from wan.configs import DiTConfig
from wan.generation import sampling
from wan.generation.backend import ClipInputs, TeaCacheSettings, branch_velocity
from wan.generation.denoise import GuidedVelocity
from wan.loading.checkpoints import FAST_LORA_DIR_NAME, FAST_LORA_NAME, MULTITALK_DIR_NAME, WAN_DIR_NAME
from wan.loading.lora import merge_loras
from wan.model.dit import MultiTalkDiT
from wan.runtime.local import LocalDiT
from wan.runtime.placement import load_dit_for_plan, place_dit
from wan.runtime.plans import FP8, RESIDENT, MemoryPlan
from wan.runtime.schedule import Split
from wan.runtime.workers import CheckpointSource, WorkerError, WorkerGroup, WorkerOptions

pytestmark = [
    pytest.mark.slow,  # worker processes: each group start is seconds
    pytest.mark.skipif(
        not {"dit_1p", "dit_2p"} <= set(cases_with_prefix("dit_")), reason="golden dit_1p/dit_2p cases not found"
    ),
]
TWO_PASS, THREE_PASS = ("cond", "drop_audio"), ("cond", "drop_text", "uncond")


@functools.cache
def golden_model() -> MultiTalkDiT:
    """The tiny DiT of the golden cases (dit_2p uses dit_1p's weights)."""
    return load_case("dit_1p").dit()


@dataclass(frozen=True)
class GoldenSource:
    """The workers' DiT source: the golden weights (picklable, as the workers need)."""

    dtype = torch.float32

    @property
    def config(self) -> DiTConfig:
        return golden_model().config

    def build(self, device: torch.device, plan: MemoryPlan = RESIDENT) -> MultiTalkDiT:
        model = golden_model().to(device)
        place_dit(model, plan, device)
        return model

    def tensor_reader(self, device: torch.device) -> None:
        return None

    def audio_layer_sets(self) -> dict:
        return {}


def conditioning(case_name: str) -> tuple[ClipInputs, torch.Tensor, torch.Tensor]:
    inputs = load_case(case_name).inputs()
    context = inputs["context"]
    cond = ClipInputs(
        context=context,
        context_null=torch.flip(context, dims=[0]) * 0.5,  # any other prompt
        clip_fea=inputs["clip_fea"],
        y=inputs["y"],
        audio=inputs["audio"],
        masks=inputs["ref_target_masks"],
    )
    return cond, inputs["x"], inputs["t"]


@pytest.fixture(scope="module")
def group():
    workers = WorkerGroup(GoldenSource(), ["cpu", "cpu"])
    workers.start()
    yield workers
    workers.close()


def sequential(model, latent, t, cond, branches, teacache=None) -> dict[str, torch.Tensor]:
    """The passes one after the other in this process, as the one-GPU path runs them."""
    return {b: branch_velocity(model, latent, t, cond, b, teacache.branch(b) if teacache else None) for b in branches}


def plain(cond, latent, t, branches, teacache=None):
    with torch.inference_mode():
        return sequential(golden_model(), latent, t, cond, branches, teacache)


def combine(velocities: dict, text_scale: float, audio_scale: float) -> torch.Tensor:
    """The guided velocity the driver makes of the passes (plain CFG; cond and drop_audio: text guidance off)."""
    text_scale = 1.0 if "drop_audio" in velocities else text_scale
    return GuidedVelocity(None, text_scale, audio_scale, GuidanceOptions()).combine(velocities)


def assert_same_velocities(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for branch in expected:
        # Sequence parallel changes the attention's summation order: float32 noise only.
        torch.testing.assert_close(actual[branch], expected[branch], rtol=1e-5, atol=2e-5, msg=branch)


@pytest.mark.parametrize(
    "schedule, case_name, branches",
    [
        ((Split(1, 2),), "dit_2p", TWO_PASS),  # both passes sequence-parallel
        ((Split(1, 2),), "dit_1p", THREE_PASS),
        ((Split(2, 1),), "dit_1p", TWO_PASS),  # one pass per GPU
        ((Split(2, 1),), "dit_2p", THREE_PASS),  # 2 passes on one GPU, 1 on the other
        ((Split(2, 1), Split(1, 2)), "dit_2p", THREE_PASS),  # one pass per GPU, then the third over both
    ],
    ids=str,
)
def test_step_over_workers_equals_plain_step(group, schedule, case_name, branches):
    cond, latent, t = conditioning(case_name)
    group.use_schedule(schedule)
    group.begin_clip(cond)
    velocities = group.velocities(latent, t, branches)
    group.end_clip()
    expected = plain(cond, latent, t, branches)
    assert_same_velocities(velocities, expected)
    # The guided velocity the driver makes of them.
    torch.testing.assert_close(combine(velocities, 3.0, 2.0), combine(expected, 3.0, 2.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("schedule", [(Split(2, 1),), (Split(2, 1), Split(1, 2))], ids=str)
def test_teacache_over_several_steps_matches_plain_loop(group, schedule):
    """Each branch's TeaCache lives in the workers that run the branch; the loop and its skips are the plain one's."""
    cond, latent, _ = conditioning("dit_2p")
    steps = sampling.timesteps(8, shift=5.0)
    # The tiny DiT's time embedding moves far more per step than the 14B's: a threshold that skips some passes.
    settings = TeaCacheSettings(1e6, "multitalk-480")
    group.use_schedule(schedule)
    group.begin_clip(cond, teacache=settings)
    teacache = sampling.TeaCache(settings.thresh, settings.size_bucket)
    ours = theirs = latent
    for i in range(len(steps) - 1):
        t = steps[i : i + 1]
        ours = sampling.euler_step(ours, combine(group.velocities(ours, t, THREE_PASS), 3.0, 2.0), t, steps[i + 1])
        v = combine(plain(cond, theirs, t, THREE_PASS, teacache), 3.0, 2.0)
        theirs = sampling.euler_step(theirs, v, t, steps[i + 1])
    skipped = group.end_clip()
    assert 0 < teacache.skipped_fraction() < 1, "the fixture must make TeaCache skip some passes, not all"
    assert skipped == teacache.skipped_fraction()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_teacache_steps_come_from_the_workers_dit(group):
    """The driver holds no DiT weights: the first worker predicts TeaCache's steps, as the in-process DiT would."""
    timesteps = sampling.timesteps(12, shift=5.0)[:-1].view(-1, 1)
    model = golden_model()
    for thresh in (0.0, 1e6, 1e12):
        with torch.inference_mode():
            expected = sampling.teacache_computed_steps(
                (model.time_embeddings(t)[1] for t in timesteps), thresh, "multitalk-480"
            )
        assert group.teacache_steps(timesteps, TeaCacheSettings(thresh, "multitalk-480")) == expected
    assert expected == 5  # only the warm-up steps: the prediction is not constant


def test_teacache_steps_for_a_requests_loras_come_from_the_workers_too(group, tmp_path):
    """With the LoRAs a request will run with, the first worker predicts as the in-process DiT, unmerged."""
    timesteps = sampling.timesteps(24, shift=5.0)[:-1].view(-1, 1)
    weight = golden_model().time_projection[1].weight
    generator = torch.Generator().manual_seed(3)
    save_file(
        {
            "diffusion_model.time_projection.1.lora_up.weight": 0.5 * torch.randn(weight.shape[0], 2, generator=generator),
            "diffusion_model.time_projection.1.lora_down.weight": torch.randn(2, weight.shape[1], generator=generator),
        },
        tmp_path / "time.safetensors",
    )  # fmt: skip
    lora = [(str(tmp_path / "time.safetensors"), 1.0)]
    settings = TeaCacheSettings(3e5, "multitalk-480")
    local = LocalDiT(load_case("dit_1p").dit())
    assert group.teacache_steps(timesteps, settings, lora) == local.teacache_steps(timesteps, settings, lora)
    assert group.teacache_steps(timesteps, settings, lora) != group.teacache_steps(timesteps, settings)
    assert group.active_loras == ()  # nothing was merged for it


def test_killed_worker_fails_the_request_and_the_next_request_restarts(group):
    cond, latent, t = conditioning("dit_1p")
    group.use_schedule((Split(1, 2),))
    group.begin_clip(cond)
    os.kill(group.pids[1], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"DiT worker 1 on cpu died \(exit code -9\)"):
        group.velocities(latent, t, TWO_PASS)
    assert not group.running
    group.begin_clip(cond)  # the next request
    assert_same_velocities(group.velocities(latent, t, TWO_PASS), plain(cond, latent, t, TWO_PASS))
    group.end_clip()


def test_error_in_a_worker_is_reported_with_its_traceback(group):
    cond, latent, t = conditioning("dit_1p")
    group.use_schedule((Split(2, 1),))
    group.begin_clip(cond)
    with pytest.raises(WorkerError, match=r"(?s)DiT worker \d on cpu failed:.*unknown guidance branch 'sideways'"):
        group.velocities(latent, t, ("cond", "sideways"))
    assert not group.running


def test_a_schedule_the_group_cannot_run_is_refused_before_any_step(group):
    kept = group.schedule
    for schedule, problem in (
        ((), "at least one round"),
        ((Split(2, 1), Split(1, 4)), "split 1x4 needs 4 GPUs, the group has 2"),
    ):
        with pytest.raises(ValueError, match=problem):
            group.use_schedule(schedule)
    assert group.schedule == kept


@pytest.fixture(scope="module")
def pipeline_parts(tmp_path_factory):
    """The tiny pipeline of the golden pipeline_e2e case (its DiT is dit_1p's), CLIP stubbed by its stored output."""
    parts = golden_parts(load_case("pipeline_e2e"), tmp_path_factory.mktemp("parts"))
    return parts.encode_text, (lambda frames: parts.clip_features), parts.vae


@pytest.mark.parametrize(
    "speakers, frames, options",
    [
        (2, 14, dict()),  # 3 passes, two clips: motion frames re-noised by the driver
        (1, 9, dict(text_scale=1.0, guidance=GuidanceOptions(use_teacache=True, teacache_thresh=1e6))),
    ],
    ids=["2p-3pass-stream", "1p-2pass-teacache"],
)
def test_pipeline_with_workers_equals_plain_pipeline(group, pipeline_parts, speakers, frames, options):
    text_encoder, image_encoder, vae = pipeline_parts
    plain_pipeline = Pipeline(LocalDiT(golden_model()), text_encoder, image_encoder, vae)
    parallel = Pipeline(group, text_encoder, image_encoder, vae)
    generator = torch.Generator().manual_seed(frames)
    audio = tuple(torch.randn(frames, 12, 768, generator=generator) for _ in range(speakers))
    request = GenerationRequest("talk", Image.new("RGB", (96, 64), (120, 80, 60)), audio)
    options = SamplingOptions(
        size_bucket={"0.67": [32, 48]}, frame_num=9, motion_frame=5, steps=7, shift=7.0, seed=3, **options
    )
    with one_thread():  # as the CPU workers: else matmul rounding differs, and the second clip amplifies it
        expected = plain_pipeline.generate(request, options, progress=False)
    video = parallel.generate(request, options, progress=False)
    assert set(group.pass_seconds) == {1, 2}  # measured on the first clip; a split chosen from them
    torch.testing.assert_close(video, expected, rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_conditioning(config: DiTConfig, generator: torch.Generator) -> tuple[ClipInputs, torch.Tensor]:
    """Random inputs of a 9-frame, 64 x 96 two-speaker clip in the pipeline's shapes; returns them and the latent."""
    frames, lat_h, lat_w = 3, 8, 12
    masks = torch.zeros(3, lat_h, lat_w)
    masks[0, :, : lat_w // 2], masks[1, :, lat_w // 2 :], masks[2] = 1, 1, 1
    cond = ClipInputs(
        context=torch.randn(7, config.text_dim, generator=generator),
        context_null=torch.randn(9, config.text_dim, generator=generator),
        clip_fea=torch.randn(1, 257, config.clip_dim, generator=generator),
        y=torch.randn(1, 20, frames, lat_h, lat_w, generator=generator),
        audio=torch.randn(2, 9, config.audio_window, config.audio_layers, config.audio_channels, generator=generator),
        masks=masks,
    )
    return cond, torch.randn(16, frames, lat_h, lat_w, generator=generator)


def test_workers_stream_the_checkpoint_and_merge_and_restore_loras(tiny_weights):
    root = tiny_weights
    source = CheckpointSource(root / WAN_DIR_NAME, root / MULTITALK_DIR_NAME, dtype=torch.float32)
    lora = root / FAST_LORA_DIR_NAME / FAST_LORA_NAME
    model = source.build(torch.device("cpu"))
    cond, latent = random_conditioning(model.config, torch.Generator().manual_seed(0))
    t = torch.tensor([900.0])
    with torch.inference_mode(), one_thread():
        base = sequential(model, latent, t, cond, THREE_PASS)
        merged = merge_loras(model, [(lora, 1.0)])
        with_lora = sequential(model, latent, t, cond, THREE_PASS)
        merged.restore()
    assert not torch.allclose(with_lora["cond"], base["cond"], atol=1e-3), "the LoRA must change the output"

    group = WorkerGroup(source, ["cpu", "cpu"])
    try:
        group.set_weights(None, [(lora, 1.0)])  # before the start: applied when the workers are up
        group.use_schedule((Split(2, 1),))
        group.begin_clip(cond)
        assert_same_velocities(group.velocities(latent, t, THREE_PASS), with_lora)
        group.set_weights(None, [])  # exact restore from the files
        assert_same_velocities(group.velocities(latent, t, THREE_PASS), base)
    finally:
        group.close()
    assert not group.running


def test_workers_place_their_dit_by_the_memory_plan(tiny_weights):
    """With the fp8 plan every worker's DiT is the one the single-process loader makes for that plan (fp8 linears,
    fp8 self-attention), not the published precision."""
    root = tiny_weights
    source = CheckpointSource(root / WAN_DIR_NAME, root / MULTITALK_DIR_NAME, dtype=torch.float32)
    exact = source.build(torch.device("cpu"))
    fp8 = load_dit_for_plan(root / WAN_DIR_NAME, root / MULTITALK_DIR_NAME, FP8, dtype=torch.float32, device="cpu")
    cond, latent = random_conditioning(fp8.config, torch.Generator().manual_seed(0))
    t = torch.tensor([900.0])
    with torch.inference_mode(), one_thread():
        expected = sequential(fp8, latent, t, cond, TWO_PASS)
        unquantised = sequential(exact, latent, t, cond, TWO_PASS)
    assert not torch.equal(expected["cond"], unquantised["cond"]), "fp8 must change the output"

    group = WorkerGroup(source, ["cpu", "cpu"], WorkerOptions(memory_plan=FP8))
    try:
        group.use_schedule((Split(2, 1),))
        group.begin_clip(cond)
        velocities = group.velocities(latent, t, TWO_PASS)
    finally:
        group.close()
    # One pass per worker (no sequence split), one thread each: the same arithmetic as here, to the bit.
    assert all(torch.equal(velocities[branch], expected[branch]) for branch in TWO_PASS)


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="CPU inductor needs a C++ compiler")
def test_compiled_workers_keep_their_kernels_between_starts(tmp_path, monkeypatch):
    """Each worker saves what it compiled to its own file next to the single-process one; the next group (another
    container: empty inductor caches) loads it and compiles nothing, with the same velocities."""
    cache = tmp_path / "keep" / "inductor.bin"
    options = WorkerOptions(compile=True, compile_cache=cache)
    cond, latent, t = conditioning("dit_2p")
    expected = plain(cond, latent, t, THREE_PASS)
    reports = []
    for container in ("first", "second"):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / container))  # the workers' own /tmp caches
        workers = WorkerGroup(GoldenSource(), ["cpu", "cpu"], options)
        try:
            workers.start()
            workers.use_schedule((Split(2, 1), Split(1, 2)))  # a whole pass on each worker, then one over both
            workers.begin_clip(cond)
            velocities = workers.velocities(latent, t, THREE_PASS)
            workers.end_clip()
            reports.append(
                ([info["compile_cache_loaded"] for info in workers.worker_info], workers.save_compile_cache())
            )
        finally:
            workers.close()
        assert_same_velocities(velocities, expected)
    assert sorted(p.name for p in cache.parent.iterdir()) == ["inductor-worker0of2.bin", "inductor-worker1of2.bin"]
    (first_loaded, first_counts), (second_loaded, second_counts) = reports
    assert first_loaded == [False, False] and all(c["fxgraph_cache_miss"] > 0 for c in first_counts)
    assert second_loaded == [True, True]
    assert all(c["fxgraph_cache_hit"] > 0 and c["fxgraph_cache_miss"] == 0 for c in second_counts)
