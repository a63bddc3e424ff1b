"""The reference's two-speaker example (`tests/data/examples`: a 2560x1440 PNG, two 44.1 kHz stereo WAVs, boxes)
through the real runner on the tiny weights, as `cog predict -i image=@multi1.png -i audio=@1.WAV ...` runs it."""

import json
from pathlib import Path

from support.cog_inputs import run_inputs
from src.video.mp4 import probe_video

EXAMPLE = Path(__file__).resolve().parent / "data" / "examples"


def test_reference_example_two_speakers_with_boxes(runner):
    spec = json.loads((EXAMPLE / "multitalk_example_1.json").read_text())
    folder = EXAMPLE.parent  # the json's paths start with "examples/"
    # The reference's boxes are [row_min, col_min, row_max, col_max]; ours are x1,y1,x2,y2.
    boxes = {k: f"{b[1]},{b[0]},{b[3]},{b[2]}" for k, b in spec["bbox"].items()}
    output = runner.run(
        **run_inputs(
            image=str(folder / spec["cond_image"]),
            audio=str(folder / spec["cond_audio"]["person1"]),
            second_audio=str(folder / spec["cond_audio"]["person2"]),
            prompt=spec["prompt"],
            audio_type=spec["audio_type"],
            person1_bbox=boxes["person1"],
            person2_bbox=boxes["person2"],
            num_frames=5,
            sampling_steps=2,
            seed=7,
        )
    )
    info = probe_video(output)
    # 16:9 -> the 0.50 bucket of the tiny set's 480p table (448x896 shrunk 14 times: 32x64).
    assert (info["frames"], info["width"], info["height"]) == (5, 64, 32)
    assert info["audio_codec"] == "aac" and abs(info["audio_duration"] - 5 / 25) < 1 / 25
