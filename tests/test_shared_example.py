"""The reference's two-speaker example (`../shared/examples`: a 2560x1440 PNG, two 44.1 kHz stereo WAVs, boxes) through
the real predictor on the tiny weights, as `cog predict -i image=@multi1.png -i audio=@1.WAV ...` would run it."""

import json
import os
from pathlib import Path

import pytest

from predict import Predictor
from wan.testing.tiny import write_tiny_checkpoints
from wan.generation.video import probe_video

EXAMPLE = Path(os.environ.get("MULTITALK_EXAMPLES_DIR", Path(__file__).resolve().parents[2] / "shared" / "examples"))


def test_reference_example_two_speakers_with_boxes(tmp_path):
    spec_file = EXAMPLE / "multitalk_example_1.json"
    if not spec_file.is_file():
        pytest.fail(f"{spec_file} not found (set MULTITALK_EXAMPLES_DIR)")
    spec = json.loads(spec_file.read_text())
    folder = EXAMPLE.parent  # the json's paths start with "examples/"
    # The reference's boxes are [row_min, col_min, row_max, col_max]; ours are x1,y1,x2,y2.
    boxes = {k: f"{b[1]},{b[0]},{b[3]},{b[2]}" for k, b in spec["bbox"].items()}
    predictor = Predictor()
    predictor.setup(weights=str(write_tiny_checkpoints(tmp_path / "weights")))
    output = predictor.predict(
        image=folder / spec["cond_image"], audio=folder / spec["cond_audio"]["person1"],
        second_audio=folder / spec["cond_audio"]["person2"], prompt=spec["prompt"], negative_prompt="",
        audio_type=spec["audio_type"], person1_bbox=boxes["person1"], person2_bbox=boxes["person2"], num_frames=5,
        resolution="480p", sampling_steps=2, turbo=True, fast=False, lora_url=None, lora_scale=1.0,
        text_guidance_scale=None, audio_guidance_scale=None, seed=7, color_correction_strength=1.0, use_apg=False,
    )
    info = probe_video(output)
    assert (info["frames"], info["width"], info["height"]) == (5, 896, 448)  # 16:9 -> the 0.50 bucket
    assert info["audio_codec"] == "aac" and abs(info["audio_duration"] - 5 / 25) < 1 / 25
