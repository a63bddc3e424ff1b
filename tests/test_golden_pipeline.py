"""The generation pipeline against the reference's end-to-end golden runs: every `pipeline_*` case (MultiTalk's
`generate`) and every `infinitetalk_*` case (InfiniteTalk's `generate_infinitetalk`).

Every setting comes from the case's `case.json`; every tensor the case stores is compared, per clip. The pipeline runs
unchanged: its components are wrapped to record what they are given and return, `torch.randn` is wrapped to record
the noise draws, and APG's direction function to record its updates. The streaming cases run a second time with the
VAE in two bands of rows (`wan.runtime.vae_bands`, as a two-GPU runner places it; CPU replicas here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from support.golden import GoldenCase, cases_with_prefix, golden_parts, load_case
from wan import GenerationRequest, GuidanceOptions, Pipeline, SamplingOptions
from wan.configs import DEFAULT_NEGATIVE_PROMPT
from wan.encoders.text import clean_prompt
from wan.encoders.vae import VideoVAE
from wan.generation import pipeline as pipeline_module
from wan.generation import sampling
from wan.generation.denoise import denoise
from wan.model.dit import MultiTalkDiT
from wan.runtime.local import LocalDiT
from wan.runtime.vae_bands import BandedVAE

pytestmark = pytest.mark.golden

BRANCH_COLUMNS = {"cond": 0, "drop_text": 1, "uncond": 2}  # the reference's TeaCache branch order (cnt % 3)


@dataclass
class Trace:
    """What the pipeline's components saw, in call order."""

    dit: list[dict] = field(default_factory=list)
    encoded: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # VAE encode (in, out)
    denoised: list[torch.Tensor] = field(default_factory=list)  # each clip's x0
    decoded: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # VAE decode (in, out)
    clip_inputs: list[torch.Tensor] = field(default_factory=list)
    prompts: list[list[str]] = field(default_factory=list)
    noise: list[torch.Tensor] = field(default_factory=list)
    apg: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (norm before the clamp, update)


class RecordingDiT(torch.nn.Module):
    def __init__(self, dit: MultiTalkDiT, trace: Trace):
        super().__init__()
        self.dit, self.trace, self.config = dit, trace, dit.config

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    def forward(self, x, t, context, clip_fea, y, audio, masks, cache=None):
        out = self.dit(x, t, context, clip_fea, y, audio, masks, cache=cache)
        self.trace.dit.append(
            dict(x=x.clone(), t=t.clone(), context=context, y=y, audio=audio, masks=masks, out=out, cache=cache)
        )
        return out

    def time_embeddings(self, t, weights=None):
        return self.dit.time_embeddings(t, weights)


class RecordingVAE:
    def __init__(self, vae: VideoVAE, trace: Trace):
        self.vae, self.trace = vae, trace

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(video)
        self.trace.encoded.append((video.clone(), latent.clone()))
        return latent

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode(latent)
        self.trace.decoded.append((latent.clone(), video.clone()))
        return video


def bucket_table(config: dict) -> dict[str, list[int]]:
    """The case's bucket table as `{"h/w": [h, w]}` (the reference stores `[[h, w], 1]`)."""
    if "bucket_table" in config:
        return {k: list(v[0]) if isinstance(v[0], list) else list(v) for k, v in config["bucket_table"].items()}
    h, w = config["target_h_w"]
    return {f"{h / w:.2f}": [h, w]}


def reference_boxes(config: dict) -> tuple[tuple[float, ...], ...] | None:
    """The reference reads a box as (row_min, col_min, row_max, col_max); ours is [x1, y1, x2, y2] with x = column."""
    if not config.get("bbox"):
        return None
    return tuple((b[1], b[0], b[3], b[2]) for _, b in sorted(config["bbox"].items()))


def case_model(case: GoldenCase) -> str:
    """Which pipeline made the case: InfiniteTalk's `generate_infinitetalk`, or MultiTalk's `generate`."""
    return "infinitetalk" if "generate_infinitetalk" in case.meta.get("reference", "") else "multitalk"


def case_request(case: GoldenCase) -> tuple[GenerationRequest, SamplingOptions]:
    """The case's `generate()` call as our typed request and options; every setting from its case.json."""
    cfg, inputs = case.config, case.inputs()
    speakers = sorted(k for k in inputs if k.startswith("audio_emb_person"))
    image = inputs.get("cond_image_uint8_hwc")
    request = GenerationRequest(
        prompt=cfg["prompt"],
        image=None if image is None else Image.fromarray(image.numpy()),
        audio=tuple(inputs[k] for k in speakers),
        boxes=reference_boxes(cfg),
        negative_prompt=cfg.get("negative_prompt", ""),
        video=inputs.get("cond_video_uint8_thwc"),
    )
    extra = cfg.get("extra_args") or {}
    options = SamplingOptions(
        model=case_model(case),
        size_bucket=bucket_table(cfg),
        frame_num=cfg["frame_num"],
        motion_frame=cfg.get("motion_frame", 25),
        max_frames=cfg.get("max_frames_num", cfg["frame_num"]),
        steps=cfg["sampling_steps"],
        shift=cfg["shift"],
        text_scale=cfg["text_guide_scale"],
        audio_scale=cfg["audio_guide_scale"],
        seed=cfg["seed"],
        face_scale=cfg.get("face_scale", 0.05),
        color_correction=cfg.get("color_correction_strength", 0.0),
        guidance=GuidanceOptions(**{k: v for k, v in extra.items() if k in GuidanceOptions.__dataclass_fields__}),
    )
    return request, options


def run_case(case: GoldenCase, tmp_path, monkeypatch, vae_bands: int = 1) -> tuple[torch.Tensor, Trace]:
    trace = Trace()
    parts = golden_parts(case, tmp_path)
    vae = parts.vae if vae_bands == 1 else BandedVAE.over(parts.vae, ["cpu"] * vae_bands)

    def encode_text(prompts):
        trace.prompts.append(prompts)
        return parts.encode_text(prompts)

    def encode_image(frames):
        trace.clip_inputs.append(frames.clone())
        return parts.clip_features

    randn = torch.randn

    def recording_randn(*args, **kwargs):
        noise = randn(*args, **kwargs)
        trace.noise.append(noise.clone())  # the pipeline writes into its latent
        return noise

    monkeypatch.setattr(torch, "randn", recording_randn)
    apg_direction = sampling.apg_direction

    def recording_apg(diff, v_cond, buffer, norm_threshold=55.0, eta=0.0):
        update = apg_direction(diff, v_cond, buffer, norm_threshold, eta)
        trace.apg.append((buffer.running_average.double().norm(), update))
        return update

    monkeypatch.setattr(sampling, "apg_direction", recording_apg)

    def recording_denoise(*args, **kwargs):
        x0 = denoise(*args, **kwargs)
        trace.denoised.append(x0.clone())
        return x0

    monkeypatch.setattr(pipeline_module, "denoise", recording_denoise)
    pipeline = Pipeline(LocalDiT(RecordingDiT(parts.dit, trace)), encode_text, encode_image, RecordingVAE(vae, trace))
    request, options = case_request(case)
    return pipeline.generate(request, options, progress=False), trace


def mirrored(full: torch.Tensor, length: int) -> torch.Tensor:
    """The reference's last-clip padding written out: frame L + j repeats frame L - 1 - j."""
    extra = torch.arange(full.shape[0], max(length, full.shape[0]))
    return torch.cat([full, full[2 * full.shape[0] - 1 - extra]])


def observed_tensors(case: GoldenCase, video: torch.Tensor, trace: Trace) -> dict[str, torch.Tensor]:
    """Everything the run produced, under the case's tensor names (clip k >= 1 under `debug.clip{k}.`)."""
    cfg = case.config
    infinitetalk = case_model(case) == "infinitetalk"
    steps = cfg["sampling_steps"]
    passes = 2 if cfg["text_guide_scale"] == 1.0 else 3
    branches = ("cond", "drop_audio") if passes == 2 else ("cond", "drop_text", "uncond")
    clips = len(trace.decoded)
    assert len(trace.dit) == clips * steps * passes
    # `y` encodes the clip's known frames with zeros up to frame_num; InfiniteTalk also encodes its motion frames
    # alone, and its anchor only where it differs from the clip before's (an image: once).
    conditions = [e for e in trace.encoded if e[0].shape[1] == cfg["frame_num"]]
    motions = [e for e in trace.encoded if e[0].shape[1] < cfg["frame_num"]]
    if not infinitetalk:
        assert len(conditions) == len(trace.encoded) == clips
    else:
        anchors = [trace.clip_inputs[k] for k in range(clips)]
        changes = 1 + sum(not torch.equal(a, b) for a, b in zip(anchors, anchors[1:]))
        assert len(conditions) == changes and len(motions) == clips
        assert changes == (1 if "cond_video_uint8_thwc" not in case.inputs() else clips), changes
    found: dict[str, torch.Tensor] = {"video": video}
    draws = iter(trace.noise)
    kept = 0
    for k in range(clips):
        name = (lambda n: n) if k == 0 else (lambda n, k=k: f"debug.clip{k}.{n}")
        calls = trace.dit[k * steps * passes : (k + 1) * steps * passes]
        # The latent of y's known frames, as this clip's DiT is given it.
        latent = calls[0]["y"][0, 4:]
        x0, (decoded_latent, decoded) = trace.denoised[k], trace.decoded[k]
        # The decoder is causal in time: it is given x0's leading latent frames, all of them but in the last clip.
        assert torch.equal(decoded_latent, x0[:, : decoded_latent.shape[1]])
        assert k == clips - 1 or decoded_latent.shape[1] == x0.shape[1]
        found[name("vae_encode_latent")] = latent
        found[name("x0")] = x0
        found[name("y")] = calls[0]["y"]
        found[name("noise")] = next(draws)
        if k == 0:
            found["cond_image_normalized"] = conditions[0][0][None, :, :1]
            found["clip_visual_input"] = trace.clip_inputs[0]
            found["vae_decode_video"] = decoded
            found["ref_target_masks"] = calls[0]["masks"]
            found["context"] = calls[0]["context"]
            if passes == 3:
                found["context_null"] = calls[1]["context"]
        if infinitetalk:
            # Every clip is anchored on a source frame: y's only known frame, and the CLIP input.
            found[name("cond_image_normalized")] = trace.clip_inputs[k]
            anchor = [pixels for pixels, _ in conditions if torch.equal(pixels[:, :1], trace.clip_inputs[k][0])]
            assert anchor, f"clip {k}: y was not encoded from its CLIP input"
            motion = motions[k][1]
            found[name("latent_motion_frames")] = motion
            # Held clean in the latent at every step, the last included.
            assert torch.equal(x0[:, : motion.shape[1]], motion)
            assert torch.equal(calls[0]["x"][:, : motion.shape[1]], motion)
        elif k > 0:
            motion = 1 + (cfg["motion_frame"] - 1) // 4
            found[name("latent_motion_frames")] = x0[:, :motion]  # re-noised at t = 0 last: exactly the motion latent
            # MultiTalk conditions clip k on the last motion frame of clip k - 1 as kept in the video.
            if kept - 1 < video.shape[1]:
                torch.testing.assert_close(trace.clip_inputs[k][0, :, 0], video[:, kept - 1], rtol=0, atol=0)
        if k > 0:
            for j in range(steps + 1):
                found[name(f"motion_noise.{j}")] = next(draws)
        kept += decoded.shape[1] if k == 0 else decoded.shape[1] - cfg["motion_frame"]
        for i in range(steps):
            step = calls[i * passes : (i + 1) * passes]
            found[name(f"step{i}.latent_in")] = step[0]["x"]
            found[name(f"step{i}.timestep")] = step[0]["t"]
            for branch, call in zip(branches, step):
                found[name(f"step{i}.pred_{branch}")] = call["out"]
        uncond = calls[passes - 1]["audio"]
        found["audio_null_is_zeros_1human"] = torch.tensor(float(uncond.shape[0] == 1 and not uncond.any()))
        found.update(audio_windows(case, k, calls[0]["audio"], name))
    assert next(draws, None) is None, "more noise drawn than the reference draws"
    # The last clip decodes the fewest latent frames that give the video's frames (each latent frame after the first
    # decodes to 4 frames).
    assert 0 <= kept - video.shape[1] < 4

    if trace.apg:
        norms, updates = zip(*trace.apg)
        per_step = len(trace.apg) // (clips * steps)
        found["apg_diff_norm"] = torch.stack(norms).view(-1, per_step)[:steps]
        for i in range(steps):
            for term, update in zip(("text", "audio") if per_step == 2 else ("audio",), updates[i * per_step :]):
                found[f"debug.step{i}.apg_{term}_update"] = update
    caches = [call["cache"] for call in trace.dit[: steps * passes]]
    if caches[0] is not None and passes == 3:
        found.update(teacache_tables(caches, steps))
    return found


def audio_windows(case: GoldenCase, k: int, audio: torch.Tensor, name) -> dict[str, torch.Tensor]:
    """The window indices of clip k, checked through what the DiT was given: audio[h] == padded_h[index_h]."""
    inputs, expected = case.inputs(), case.outputs()
    found = {}
    for h in range(audio.shape[0]):
        key = name("audio_window_index")
        if key not in expected:
            key = name(f"audio_window_index.person{h + 1}")
        index = expected[key]
        full = inputs[f"audio_emb_person{h + 1}"]
        torch.testing.assert_close(audio[h], mirrored(full, int(index.max()) + 1)[index], rtol=0, atol=0)
        found[key] = index
    return found


def teacache_tables(caches, steps: int) -> dict[str, torch.Tensor]:
    tables = {
        key: torch.full((steps, 3), float("nan"), dtype=torch.float64) for key in ("rel_l1", "rescaled", "accumulated")
    }
    skipped = torch.zeros(steps, 3, dtype=torch.int64)
    for name, column in BRANCH_COLUMNS.items():
        decisions = caches[column].decisions
        assert len(decisions) == steps
        for i, decision in enumerate(decisions):
            skipped[i, column] = decision.skipped
            for key in tables:
                if getattr(decision, key) is not None:
                    tables[key][i, column] = getattr(decision, key)
    return {"teacache_skipped": skipped, **{f"teacache_{key}": table for key, table in tables.items()}}


@pytest.mark.parametrize("name", cases_with_prefix("pipeline_") + cases_with_prefix("infinitetalk_"))
def test_golden_pipeline(name, tmp_path, monkeypatch):
    check_case(load_case(name), tmp_path, monkeypatch)


@pytest.mark.parametrize("name", cases_with_prefix("pipeline_stream"))
def test_golden_pipeline_with_the_vae_in_bands(name, tmp_path, monkeypatch):
    """Every clip's encode (the motion frames of the clip before) and decode in two bands of rows."""
    banded_calls = []
    run_bands = BandedVAE._run

    def counted(vae, step, parts):
        banded_calls.append(len(parts))
        return run_bands(vae, step, parts)

    monkeypatch.setattr(BandedVAE, "_run", counted)
    trace = check_case(load_case(name), tmp_path, monkeypatch, vae_bands=2)
    assert banded_calls == [2] * (len(trace.encoded) + len(trace.decoded))


def check_case(case: GoldenCase, tmp_path, monkeypatch, vae_bands: int = 1) -> Trace:
    """The case run through `Pipeline.generate`, every stored tensor compared."""
    name, cfg, expected = case.name, case.config, case.outputs()
    video, trace = run_case(case, tmp_path, monkeypatch, vae_bands)

    negative = cfg.get("negative_prompt", "") or DEFAULT_NEGATIVE_PROMPT
    assert trace.prompts == [[cfg["prompt"], negative]]
    if "negative_prompt_after_whitespace_clean" in cfg:
        assert clean_prompt(negative) == cfg["negative_prompt_after_whitespace_clean"]
    # The reference returns fewer frames than the audio covers (its final cut, README defect M1); we keep them all.
    assert video.shape[1] == min(
        cfg.get("max_frames_num", cfg["frame_num"]), case.inputs()["audio_emb_person1"].shape[0]
    )

    found = observed_tensors(case, video, trace)
    missing = sorted(set(expected) - set(found))
    assert not missing, f"{name}: stored tensors this run does not produce: {missing}"
    failures = []
    for key in sorted(expected):
        try:
            if key == "video":
                assert_video_close(case, found[key])
            else:
                case.assert_close(key, found[key])
        except AssertionError as error:
            failures.append(str(error))
    assert not failures, "\n".join(failures)
    return trace


def assert_video_close(case: GoldenCase, video: torch.Tensor) -> None:
    """The frames both produce, each clip's range at its own tolerance (noise grows from clip to clip)."""
    expected = case.outputs()["video"]
    tolerance = case.tolerances()["video"]
    frames = expected.shape[1]
    ranges = tolerance.get("per_clip_frame_ranges") or [{"frames": [0, frames], **tolerance}]
    for part in ranges:
        a, b = part["frames"]
        case.assert_close("video", video[:, a:b], expected[:, a:b], part["strict_max_abs_err"])
