"""The generation pipeline beyond the golden runs: lengths, streaming, seeds, guidance modes, input errors.

Built from the golden tiny DiT / T5 / VAE weights with a fixed CLIP feature, so a generate() call takes seconds.
"""

import dataclasses

import pytest
import torch
from PIL import Image

from support.golden import golden_parts, load_case
from wan import GenerationRequest, GuidanceOptions, Pipeline, SamplingOptions
from wan.generation.plan import ClipPlan, latent_frames, pad_audio, plan_clips
from wan.generation import pipeline as pipeline_module
from wan.generation.denoise import GuidedVelocity
from wan.runtime.local import LocalDiT

BUCKET = {"0.67": [32, 48]}


class CountingDiT(torch.nn.Module):
    def __init__(self, dit):
        super().__init__()
        self.dit, self.calls, self.config = dit, [], dit.config

    @property
    def dtype(self):
        return self.dit.dtype

    def forward(self, x, t, context, clip_fea, y, audio, masks, cache=None):
        self.calls.append(dict(t=float(t), speakers=audio.shape[0], sound=bool(audio.any()), cache=cache, x=x.clone()))
        return self.dit(x, t, context, clip_fea, y, audio, masks, cache=cache)

    def time_embeddings(self, t, weights=None):
        return self.dit.time_embeddings(t, weights)


class RecordingVAE:
    def __init__(self, vae):
        self.vae, self.encoded, self.decoded = vae, [], []

    def encode(self, video):
        latent = self.vae.encode(video)
        self.encoded.append((video, latent))
        return latent

    def decode(self, latent):
        video = self.vae.decode(latent)
        self.decoded.append((latent, video))
        return video


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    parts = golden_parts(load_case("pipeline_e2e"), tmp_path_factory.mktemp("parts"))
    return Pipeline(
        LocalDiT(CountingDiT(parts.dit)), parts.encode_text, lambda frames: parts.clip_features, RecordingVAE(parts.vae)
    )


def _generate(pipeline, frames, speakers=1, boxes=None, **options):
    generator = torch.Generator().manual_seed(frames)
    audio = tuple(torch.randn(frames, 12, 768, generator=generator) for _ in range(speakers))
    image = Image.new("RGB", (96, 64), (120, 80, 60))
    pipeline.dit.module.calls.clear()
    pipeline.vae.encoded.clear()
    pipeline.vae.decoded.clear()
    settings = dict(size_bucket=BUCKET, frame_num=9, motion_frame=5, steps=2, shift=7.0, seed=3)
    settings.update(options)
    request = GenerationRequest("talk", image, audio, boxes=boxes)
    return pipeline.generate(request, SamplingOptions(**settings), progress=False)


def test_plan_clips_hand_computed():
    assert plan_clips(82, 81, 25) == ClipPlan(81, (0, 56), 82, pad_last=True)  # streaming: 81 + 56 >= 82
    assert plan_clips(137, 81, 25).starts == (0, 56)
    assert plan_clips(138, 81, 25).starts == (0, 56, 112)
    assert plan_clips(26, 13, 5) == ClipPlan(13, (0, 8, 16), 26, pad_last=True)  # the golden streaming case
    # Clip mode (the reference's max_frames_num <= frame_num): one full clip, cut, no padding.
    assert plan_clips(200, 81, 25, max_frames=50) == ClipPlan(81, (0,), 50, pad_last=False)
    assert plan_clips(200, 81, 25, max_frames=120) == ClipPlan(81, (0, 56), 120, pad_last=True)
    # Audio the reference rejects (at most frame_num frames): one clip of the smallest 4n+1 length covering it.
    assert plan_clips(81, 81, 25) == ClipPlan(81, (0,), 81, pad_last=True)
    assert plan_clips(30, 81, 25) == ClipPlan(33, (0,), 30, pad_last=True)
    assert plan_clips(1, 81, 25).frames == 1
    with pytest.raises(ValueError):
        plan_clips(0, 81, 25)
    with pytest.raises(ValueError, match="motion_frame"):
        plan_clips(100, 9, 9)


def test_the_last_clip_decodes_only_the_latent_frames_of_the_frames_it_keeps():
    plan = plan_clips(250, 81, 5)  # 10 s: clips at 0, 76, 152, 228; the last keeps frames 228..249
    assert plan.starts == (0, 76, 152, 228)
    assert [plan.frames_needed(k) for k in range(4)] == [81, 81, 81, 22]
    # frame 0 from latent frame 0, frames 4i-3..4i from latent frame i: frame 21 needs latent frames 0..6
    assert [latent_frames(n) for n in (1, 2, 5, 6, 22, 81)] == [1, 2, 2, 3, 7, 21]
    assert plan_clips(30, 81, 25).frames_needed(0) == 30  # one clip of 33 frames: 30 kept, 8 latent frames


def test_pad_audio_appends_the_reversed_tail_the_last_windows_read():
    emb = torch.arange(4.0)[:, None, None]
    # clip end 4 = L: 4 - 4 + 3 = 3 frames, frame L + j = frame L - 1 - j
    assert pad_audio(emb, 4).flatten().tolist() == [0, 1, 2, 3, 3, 2, 1]
    assert pad_audio(emb, 5).flatten().tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    # more missing than there is audio: all of it, reversed, once (the windows clamp to the end)
    assert pad_audio(emb, 9).flatten().tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    assert pad_audio(emb, 3) is emb  # the clip ends inside the audio


@pytest.mark.parametrize("frames", [3, 9, 14])
def test_video_is_as_long_as_the_audio(pipeline, frames):
    video = _generate(pipeline, frames)
    assert video.shape == (3, frames, 32, 48)
    assert video.abs().max() <= 1


def test_streaming_reencodes_and_renoises_the_motion_frames(pipeline):
    video = _generate(pipeline, 14, seed=3)  # clips of 9 frames advancing by 4: 9 + 4 + 4 >= 14
    calls, encoded, decoded = pipeline.dit.module.calls, pipeline.vae.encoded, pipeline.vae.decoded
    assert len(calls) == 3 * 2 * 3 and len(encoded) == len(decoded) == 3
    assert video.shape[1] == 14
    # The reference's draws from one generator: clip noise, then per later clip its noise and one motion noise
    # before the first step and after each of the 2 steps.
    generator = torch.Generator().manual_seed(3)
    clip_noise = [torch.randn(16, 3, 4, 6, generator=generator)]
    motion_noise = [None]
    for _ in (1, 2):
        clip_noise.append(torch.randn(16, 3, 4, 6, generator=generator))
        motion_noise.append([torch.randn(16, 2, 4, 6, generator=generator) for _ in range(3)])
    assert torch.equal(calls[0]["x"], clip_noise[0])
    for k in (1, 2):
        pixels, latent = encoded[k]
        # The next clip's first 5 pixel frames are the previous clip's last 5, then zeros.
        assert torch.equal(pixels[:, :5], decoded[k - 1][1][:, -5:]) and not pixels[:, 5:].any()
        first_step = calls[k * 6]["x"]
        # At t = 1000 the re-noised motion latent (1 + (5 - 1) // 4 = 2 latent frames) is its noise draw exactly;
        # after the last step (t = 0) it is the motion latent exactly.
        assert torch.equal(first_step[:, :2], motion_noise[k][0]) and torch.equal(
            first_step[:, 2:], clip_noise[k][:, 2:]
        )
        assert torch.equal(decoded[k][0][:, :2], latent[:, :2])
        # Clip k adds its frames after the 5 it shares with clip k - 1.
        start = 9 + 4 * (k - 1)
        count = min(4, 14 - start)
        assert torch.equal(video[:, start : start + count], decoded[k][1][:, 5 : 5 + count])


def test_each_clip_is_handed_out_as_soon_as_it_is_decoded(pipeline):
    """stream hands generate's video out clip by clip (the last one cut to the audio), each before the next clip's
    DiT passes: what lets the runner encode the mp4 while the next clip is generated."""
    pieces, passes_then = [], []

    def on_frames(frames: torch.Tensor) -> None:
        pieces.append(frames.clone())
        passes_then.append(len(pipeline.dit.module.calls))

    generator = torch.Generator().manual_seed(14)
    request = GenerationRequest("talk", Image.new("RGB", (96, 64)), (torch.randn(14, 12, 768, generator=generator),))
    options = SamplingOptions(size_bucket=BUCKET, frame_num=9, motion_frame=5, steps=2, seed=3)
    pipeline.dit.module.calls.clear()
    shape = pipeline.stream(request, options, on_frames, progress=False)
    assert [p.shape[1] for p in pieces] == [9, 4, 1]  # clips of 9 advancing by 4; 14 frames in all
    assert passes_then == [6, 12, 18]  # 2 steps x 3 passes a clip
    video = pipeline.generate(request, options, progress=False)
    assert shape == video.shape and shape[:2] == (3, 14) and torch.equal(torch.cat(pieces, dim=1), video)


def test_the_vae_dtype_is_the_options(pipeline):
    """vae_dtype=bfloat16 encodes and decodes with a bfloat16 copy of the VAE: a video within bf16 rounding of the
    float32 one, not equal to it; the float32 weights stay."""
    vae = pipeline.vae.vae  # the golden float32 VideoVAE behind the recording wrapper
    fp32 = Pipeline(pipeline.dit, pipeline.text_encoder, pipeline.image_encoder, vae)
    weight = next(vae.model.parameters()).clone()
    request = GenerationRequest("talk", Image.new("RGB", (96, 64)), (torch.randn(9, 12, 768),))
    options = SamplingOptions(size_bucket=BUCKET, frame_num=9, steps=2, seed=5)
    base = fp32.generate(request, options, progress=False)
    half = fp32.generate(request, dataclasses.replace(options, vae_dtype=torch.bfloat16), progress=False)
    relative = ((half - base).norm() / base.norm()).item()
    assert 1e-4 < relative < 0.05
    assert vae.cast(torch.bfloat16).dtype == torch.bfloat16 and vae.cast(torch.bfloat16) is vae.cast(torch.bfloat16)
    assert vae.cast(torch.float32) is vae and torch.equal(next(vae.model.parameters()), weight)
    assert torch.equal(
        fp32.generate(request, dataclasses.replace(options, vae_dtype=torch.float32), progress=False), base
    )


def test_max_frames_caps_the_video(pipeline):
    assert _generate(pipeline, 14, max_frames=9).shape[1] == 9


def test_same_seed_same_video_other_seed_differs(pipeline):
    first = _generate(pipeline, 9, speakers=2)
    again = _generate(pipeline, 9, speakers=2)
    other = _generate(pipeline, 9, speakers=2, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_three_pass_and_two_pass_guidance(pipeline):
    _generate(pipeline, 9, speakers=2)
    calls = pipeline.dit.module.calls
    assert [(c["speakers"], c["sound"]) for c in calls[:3]] == [(2, True), (2, True), (1, False)]
    _generate(pipeline, 9, speakers=2, text_scale=1.0)
    calls = pipeline.dit.module.calls
    assert len(calls) == 2 * 2 and [(c["speakers"], c["sound"]) for c in calls[:2]] == [(2, True), (1, False)]


@pytest.mark.parametrize(
    "scales, needed",
    [
        ((3.0, 1.0), ("cond", "drop_text")),  # audio scale 1: no uncond pass
        ((1.0, 1.0), ("cond",)),  # both 1: the conditional pass alone
        ((1.0, 2.0), ("cond", "drop_audio")),
    ],
    ids=str,
)
@pytest.mark.parametrize("use_apg", [False, True], ids=["cfg", "apg"])
def test_a_guidance_scale_of_one_drops_its_pass_and_changes_nothing(pipeline, monkeypatch, scales, needed, use_apg):
    """The passes a unit scale makes redundant are not run; run anyway, they give the very same video."""
    text_scale, audio_scale = scales
    settings = dict(text_scale=text_scale, audio_scale=audio_scale, guidance=GuidanceOptions(use_apg=use_apg))
    dropped = _generate(pipeline, 14, speakers=2, **settings)  # three clips of two steps
    calls = pipeline.dit.module.calls
    assert len(calls) == 3 * 2 * len(needed)
    assert [(c["speakers"], c["sound"]) for c in calls[: len(needed)]] == [
        (1, False) if branch == "drop_audio" else (2, True) for branch in needed
    ]

    class EveryPass(GuidedVelocity):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.branches = ("cond", "drop_text", "uncond", "drop_audio")

    monkeypatch.setattr(pipeline_module, "GuidedVelocity", EveryPass)
    run_anyway = _generate(pipeline, 14, speakers=2, **settings)
    assert len(pipeline.dit.module.calls) == 3 * 2 * 4
    assert torch.equal(run_anyway, dropped)


def test_teacache_branch_per_pass_and_fresh_per_clip(pipeline):
    _generate(pipeline, 14, text_scale=1.0, guidance=GuidanceOptions(use_teacache=True, teacache_thresh=0.3))
    caches = [c["cache"] for c in pipeline.dit.module.calls]
    assert all(cache is not None for cache in caches)
    first_clip, second_clip = caches[:4], caches[4:8]
    assert first_clip[0] is first_clip[2] and first_clip[1] is first_clip[3] and first_clip[0] is not first_clip[1]
    assert not {id(c) for c in first_clip} & {id(c) for c in second_clip}


@pytest.mark.parametrize("thresh", [0.0, 1e6, 1e12])
def test_teacache_steps_are_known_before_the_clip_runs(pipeline, thresh):
    """The steps whose blocks run, predicted from the time embeddings alone, are those every branch of every clip
    then runs. The tiny DiT's time embedding moves far more per step than the 14B's: 1e6 skips some, 1e12 all but
    the 5 warm-up steps, 0 none."""
    settings = dict(steps=12, shift=5.0, guidance=GuidanceOptions(use_teacache=True, teacache_thresh=thresh))
    options = SamplingOptions(size_bucket=BUCKET, frame_num=9, motion_frame=5, seed=3, **settings)
    predicted = pipeline.computed_steps(options)
    _generate(pipeline, 14, **settings)  # three clips (starting at frames 0, 4, 8), three passes a step
    caches = {id(call["cache"]): call["cache"] for call in pipeline.dit.module.calls}
    assert len(caches) == 9
    assert [sum(not d.skipped for d in cache.decisions) for cache in caches.values()] == [predicted] * 9
    assert predicted == {0.0: 12, 1e12: 5}.get(thresh, predicted) and (thresh != 1e6 or 5 < predicted < 12)
    no_teacache = dataclasses.replace(options, guidance=GuidanceOptions())
    assert pipeline.computed_steps(no_teacache) == 12


def test_input_errors_are_clear(pipeline):
    with pytest.raises(ValueError, match="1 or 2 speakers"):
        _generate(pipeline, 9, speakers=3)
    with pytest.raises(ValueError, match="NaN"):
        GenerationRequest("", Image.new("RGB", (96, 64)), (torch.full((9, 12, 768), float("nan")),))
    with pytest.raises(ValueError, match="do not match the model"):
        pipeline.generate(
            GenerationRequest("", Image.new("RGB", (96, 64)), (torch.zeros(9, 3, 32),)),
            SamplingOptions(size_bucket=BUCKET, frame_num=9, steps=1),
        )
    with pytest.raises(ValueError, match="speaker 2"):
        _generate(pipeline, 9, speakers=2, boxes=((0, 0, 40, 60), (95, 0, 96, 1)))
    with pytest.raises(ValueError, match="4n\\+1"):
        SamplingOptions(frame_num=8)


def test_warm_up_runs_every_graph_then_measures(pipeline):
    pipeline.dit.module.calls.clear()
    costs = pipeline.warm_up(BUCKET, frame_num=5)
    # The common shape with two speakers, two passes: cond (the request's speakers) and drop_audio (one silent
    # track). Two and one speakers at the small shape (9 frames: 3 latent frames of 2x3 patches), three passes:
    # cond, drop_text, uncond (silent). The common shape again, measured.
    small = 3 * (32 // 16) * (48 // 16)
    common = 2 * (32 // 16) * (48 // 16)
    assert [(c["speakers"], c["x"][0].numel() // 4) for c in pipeline.dit.module.calls] == [
        (2, common),
        (1, common),
        (2, small),
        (2, small),
        (1, small),
        (1, small),
        (1, small),
        (1, small),
        (2, common),
        (1, common),
    ]
    assert costs.tokens == 2 * (32 // 16) * (48 // 16) and costs.pixels == 32 * 48 and costs.frames == 5
    assert costs.pass_seconds > 0 and costs.clip_seconds > 0 and costs.text_seconds > 0


def test_infinitetalk_anchors_each_clip_on_the_source_frame_at_its_start(pipeline, monkeypatch):
    """Dubbing: clip k is anchored on source frame start_k, and on the last frame once the audio outlasts the
    video (the reference's `extract_specific_frames`). 9-frame clips with 5 motion frames start every 4 frames."""
    from wan.generation import pipeline as pipeline_module

    anchors = []
    condition = pipeline_module.infinitetalk_condition
    monkeypatch.setattr(
        pipeline_module,
        "infinitetalk_condition",
        lambda vae, source, *rest, **kw: anchors.append(source.clone()) or condition(vae, source, *rest, **kw),
    )
    shades = [10, 50, 90, 130, 170, 210]  # source frame k is one flat colour: k is readable from any crop of it
    video = torch.stack([torch.full((64, 96, 3), shade, dtype=torch.uint8) for shade in shades])
    audio = (torch.randn(14, 12, 768, generator=torch.Generator().manual_seed(0)),)  # 14 frames: clips at 0, 4, 8
    settings = dict(size_bucket=BUCKET, frame_num=9, motion_frame=5, steps=2, shift=7.0, seed=3, model="infinitetalk")
    out = pipeline.generate(
        GenerationRequest("talk", None, audio, video=video), SamplingOptions(**settings), progress=False
    )

    assert out.shape[1] == 14
    seen = [round(float((anchor.mean() + 1) / 2 * 255)) for anchor in anchors]
    assert seen == [shades[0], shades[4], shades[5]]  # start 8 is past the 6-frame video: its last frame
