"""MultiTalkPipeline.generate against the reference's end-to-end golden runs (`pipeline_*` cases)."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from golden import cases_with_prefix, load_case
from wan.configs import DiTConfig
from wan.dit import MultiTalkDiT
from wan.pipeline import MultiTalkPipeline
from wan.text_encoder import TextEncoder, load_umt5
from wan.vae import VideoVAE


def _pth(tmp_path, weights, name):
    path = tmp_path / f"{name}.pth"
    torch.save(load_file(weights), path)
    return path


class Recorder(torch.nn.Module):
    """Wraps the DiT to keep every call's inputs and outputs, in call order."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.calls, self.config = dit, [], dit.config

    def forward(self, x, t, context, clip_fea, y, audio, masks, cache=None):
        out = self.dit(x, t, context, clip_fea, y, audio, masks, cache=cache)
        self.calls.append(dict(x=x.clone(), t=t.clone(), audio=audio, y=y, masks=masks, out=out))
        return out


@pytest.mark.parametrize("name", cases_with_prefix("pipeline_"))
def test_golden_pipeline(name, tmp_path):
    case = load_case(name)
    cfg, inputs, expected = case.config, case.inputs(), case.outputs()
    # The DiT weights live in a DiT case's folder, whose case.json holds their config.
    dit_weights = case.file("weights", "dit")
    dit_case = load_case(dit_weights.parent.name)
    dit = MultiTalkDiT(DiTConfig.from_dict(dit_case.dit_config_values()))
    dit.load_state_dict(load_file(dit_weights), strict=True)
    recorder = Recorder(dit.eval())

    t5_weights = case.file("weights", "t5")
    vae_weights = case.file("weights", "vae")
    # The reference run used a stub tokenizer whose ids are stored: only the encoder is real here.
    text_encoder = TextEncoder(load_umt5(load_file(t5_weights), t5_weights, dtype=torch.float32, device="cpu"), None, cfg["text_len"])
    prompts_seen = []

    def encode_text(prompts):
        prompts_seen.append(prompts)
        return text_encoder.encode_ids(inputs["t5_ids"], inputs["t5_mask"])

    clip_inputs = []

    def encode_image(frames):
        clip_inputs.append(frames.clone())
        return inputs["clip_stub_output"]

    vae = VideoVAE.from_checkpoint(_pth(tmp_path, vae_weights, "vae"), dtype=torch.float32)
    decoded = []
    decode = vae.decode
    vae.decode = lambda latent: decoded.append(latent.clone()) or decode(latent)

    pipeline = MultiTalkPipeline.from_components(recorder, encode_text, encode_image, vae)
    image = Image.fromarray(inputs["cond_image_uint8_hwc"].numpy())
    h, w = cfg["target_h_w"]
    video = pipeline.generate(
        {
            "prompt": cfg["prompt"],
            "cond_image": image,
            "cond_audio": {"person1": inputs["audio_emb_person1"], "person2": inputs["audio_emb_person2"]},
        },
        size_buckget={f"{h / w:.2f}": [h, w]},
        frame_num=cfg["frame_num"],
        max_frames_num=cfg["frame_num"],
        shift=cfg["shift"],
        sampling_steps=cfg["sampling_steps"],
        text_guide_scale=cfg["text_guide_scale"],
        audio_guide_scale=cfg["audio_guide_scale"],
        seed=cfg["seed"],
        face_scale=cfg["face_scale"],
        progress=False,
    )

    assert prompts_seen == [[cfg["prompt"], cfg["negative_prompt"]]]
    torch.testing.assert_close(clip_inputs[0], expected["clip_visual_input"], rtol=0, atol=1e-6)
    torch.testing.assert_close(recorder.calls[0]["y"], expected["y"], rtol=0, atol=1e-5)
    torch.testing.assert_close(recorder.calls[0]["masks"], expected["ref_target_masks"], rtol=0, atol=0)
    # The seeded generator reproduces the reference's torch.manual_seed noise.
    torch.testing.assert_close(recorder.calls[0]["x"], expected["noise"], rtol=0, atol=0)

    passes = 3
    assert len(recorder.calls) == passes * cfg["sampling_steps"]
    for step in range(cfg["sampling_steps"]):
        cond, drop_text, uncond = recorder.calls[passes * step : passes * step + passes]
        assert uncond["audio"].shape[0] == 1 and not uncond["audio"].any()
        case.assert_close(f"step{step}.latent_in", cond["x"])
        torch.testing.assert_close(cond["t"], expected[f"step{step}.timestep"], rtol=0, atol=0)
        case.assert_close(f"step{step}.pred_cond", cond["out"])
        case.assert_close(f"step{step}.pred_drop_text", drop_text["out"])
        case.assert_close(f"step{step}.pred_uncond", uncond["out"])
    case.assert_close("x0", decoded[0])
    case.assert_close("video", video)
