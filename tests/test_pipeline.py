"""MultiTalkPipeline behaviour beyond the golden run: lengths, streaming, seeds, guidance modes, input errors.

Built from the golden tiny DiT / T5 / VAE weights with a fixed CLIP feature, so a generate() call takes seconds.
"""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from golden import load_case
from wan.configs import DiTConfig
from wan.dit import MultiTalkDiT
from wan.pipeline import ClipPlan, MultiTalkPipeline, pad_audio, plan_clips
from wan.text_encoder import TextEncoder, load_umt5
from wan.vae import VideoVAE

BUCKET = {"0.67": [32, 48]}


class CountingDiT(torch.nn.Module):
    def __init__(self, dit):
        super().__init__()
        self.dit, self.calls, self.config = dit, [], dit.config

    @property
    def dtype(self):
        return self.dit.dtype

    def forward(self, x, t, context, clip_fea, y, audio, masks, cache=None):
        self.calls.append((float(t), audio.shape[0], bool(audio.any()), cache))
        return self.dit(x, t, context, clip_fea, y, audio, masks, cache=cache)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    case = load_case("pipeline_e2e")
    dit_weights = case.file("weights", "dit")
    dit = MultiTalkDiT(DiTConfig.from_dict(load_case(dit_weights.parent.name).dit_config_values()))
    dit.load_state_dict(load_file(dit_weights), strict=True)
    t5_path = case.file("weights", "t5")
    text_encoder = TextEncoder(load_umt5(load_file(t5_path), t5_path, dtype=torch.float32, device="cpu"), None, 24)
    ids, mask = case.inputs()["t5_ids"], case.inputs()["t5_mask"]
    vae_path = tmp_path_factory.mktemp("vae") / "vae.pth"
    torch.save(load_file(case.file("weights", "vae")), vae_path)
    clip = case.inputs()["clip_stub_output"]
    return MultiTalkPipeline.from_components(
        CountingDiT(dit.eval()),
        lambda prompts: text_encoder.encode_ids(ids, mask),
        lambda frames: clip,
        VideoVAE.from_checkpoint(vae_path, dtype=torch.float32),
    )


def _generate(pipeline, frames, speakers=1, **kwargs):
    generator = torch.Generator().manual_seed(frames)
    audio = {f"person{k + 1}": torch.randn(frames, 12, 768, generator=generator) for k in range(speakers)}
    image = Image.new("RGB", (96, 64), (120, 80, 60))
    pipeline.dit.calls.clear()
    extra = kwargs.pop("extra", {})
    args = dict(size_buckget=BUCKET, frame_num=9, motion_frame=5, sampling_steps=2, shift=7.0, seed=3, progress=False)
    args.update(kwargs)
    return pipeline.generate({"prompt": "talk", "cond_image": image, "cond_audio": audio, **extra}, **args)


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


def test_streaming_two_clips_and_motion_frames(pipeline):
    video = _generate(pipeline, 14)  # clips of 9 frames, each later one adds 9 - 5 = 4: 9 + 4 + 4 >= 14
    steps_per_clip = 2 * 3
    assert len(pipeline.dit.calls) == 3 * steps_per_clip
    assert video.shape[1] == 14


def test_max_frames_num_caps_the_video(pipeline):
    assert _generate(pipeline, 14, max_frames_num=9).shape[1] == 9


def test_same_seed_same_video_other_seed_differs(pipeline):
    first = _generate(pipeline, 9, speakers=2)
    again = _generate(pipeline, 9, speakers=2)
    other = _generate(pipeline, 9, speakers=2, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_three_pass_and_two_pass_guidance(pipeline):
    _generate(pipeline, 9, speakers=2)
    calls = pipeline.dit.calls
    assert [(c[1], c[2]) for c in calls[:3]] == [(2, True), (2, True), (1, False)]  # cond, drop_text, uncond
    _generate(pipeline, 9, speakers=2, text_guide_scale=1.0)
    calls = pipeline.dit.calls
    assert len(calls) == 2 * 2 and [(c[1], c[2]) for c in calls[:2]] == [(2, True), (1, False)]  # cond, drop_audio


def test_teacache_branch_per_pass_and_fresh_per_clip(pipeline):
    _generate(pipeline, 14, text_guide_scale=1.0, extra_args={"use_teacache": True, "teacache_thresh": 0.3})
    caches = [c[3] for c in pipeline.dit.calls]
    assert all(cache is not None for cache in caches)
    first_clip, second_clip = caches[:4], caches[4:8]
    assert first_clip[0] is first_clip[2] and first_clip[1] is first_clip[3] and first_clip[0] is not first_clip[1]
    assert not {id(c) for c in first_clip} & {id(c) for c in second_clip}


def test_input_errors_are_clear(pipeline):
    with pytest.raises(ValueError, match="1 or 2 speakers"):
        _generate(pipeline, 9, speakers=3)
    with pytest.raises(ValueError, match="NaN"):
        pipeline.generate(
            {"prompt": "", "cond_image": Image.new("RGB", (96, 64)), "cond_audio": {"person1": torch.full((9, 12, 768), float("nan"))}},
            size_buckget=BUCKET, frame_num=9, sampling_steps=1,
        )
    with pytest.raises(ValueError, match="do not match the model"):
        pipeline.generate(
            {"prompt": "", "cond_image": Image.new("RGB", (96, 64)), "cond_audio": {"person1": torch.zeros(9, 3, 32)}},
            size_buckget=BUCKET, frame_num=9, sampling_steps=1,
        )
    with pytest.raises(ValueError, match="speaker 2"):
        _generate(pipeline, 9, speakers=2, extra={"bbox": {"person1": [0, 0, 40, 60], "person2": [95, 0, 96, 1]}})
    with pytest.raises(ValueError, match="4n\\+1"):
        _generate(pipeline, 9, frame_num=8)


def test_warm_up_runs_both_speaker_graphs(pipeline):
    pipeline.dit.calls.clear()
    pipeline.warm_up(frame_num=1)
    assert [c[1] for c in pipeline.dit.calls] == [2, 2, 1]  # cond and drop_text with two speakers, uncond with one
