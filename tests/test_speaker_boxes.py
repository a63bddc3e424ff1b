"""Speakers' boxes that select nothing are refused by the runner naming the box, before the embeddings and the weight
switch (a box in fractions of the image; a box the crop to the video's aspect cuts away: where the crop lands is
computed by hand), and the runner stays ready."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import service.talking_video as talking_video
from support.cog_inputs import run_inputs

TWO = {"audio": "examples/person1.wav", "second_audio": "examples/person2.wav", "num_frames": 5, "seed": 1}


def _no_model_work(runner, monkeypatch):
    """Fail the test if the request reaches wav2vec2; returns the LoRAs merged now, to check none was merged."""

    def embedding(*args, **kwargs):
        raise AssertionError("wav2vec2 ran for a request with a bad box")

    monkeypatch.setattr(talking_video, "get_embedding", embedding)
    return list(runner.service.pipeline.dit.weights.loras.active)


@pytest.mark.parametrize(
    "boxes, named",
    [
        (("0,0,0.5,1", "0.5,0,1,1"), "person1_bbox"),  # fractions of the image: under one pixel wide
        (("0,0,128,256", "300,0,400,256"), "person2_bbox"),  # right of the 256-pixel-wide image
    ],
)
def test_a_box_with_no_pixel_of_the_image_is_refused_before_any_model_work(runner, monkeypatch, boxes, named):
    merged = _no_model_work(runner, monkeypatch)
    inputs = run_inputs(image="examples/two_people.png", person1_bbox=boxes[0], person2_bbox=boxes[1], fast=True, **TWO)
    with pytest.raises(ValueError) as refused:
        runner.run(**inputs)
    message = str(refused.value)
    assert message.startswith(f"{named}: ") and "no whole pixel of the 256x256 image" in message, message
    assert "x = column, y = row" in message, message
    assert runner.service.pipeline.dit.weights.loras.active == merged  # the fast LoRA was not merged
    monkeypatch.undo()
    assert runner.run(**run_inputs(image="examples/two_people.png", **TWO)).exists()


def test_a_box_the_crop_cuts_away_is_refused_naming_it(runner, monkeypatch, tmp_path):
    # 600 x 100 (h/w 0.17) takes the tiny set's widest 480p bucket, 80 x 32 (h/w "0.26"), which covers it at x0.32
    # (192 x 32) and keeps the middle 80 columns: source columns 175 to 425. A box on columns 0-100 is cut away whole.
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((100, 600, 3), 128, np.uint8)).save(wide)
    _no_model_work(runner, monkeypatch)
    inputs = run_inputs(image=str(wide), person1_bbox="0,0,100,100", person2_bbox="250,0,350,100", **TWO)
    with pytest.raises(ValueError) as refused:
        runner.run(**inputs)
    message = str(refused.value)
    assert message.startswith("person1_bbox: ") and "center crop of the 600x100 image to 80x32" in message, message
    inside = run_inputs(image=str(wide), person1_bbox="200,0,300,100", person2_bbox="300,0,400,100", **TWO)
    monkeypatch.undo()
    assert runner.run(**inside).exists()
