"""A source video through the real runner on the tiny set: only the frames the clips start on are kept."""

import numpy as np
import pytest
import soundfile

from support.cog_inputs import run_inputs
from support.synthetic_media import frame_number, numbered_frames, write_media


@pytest.mark.parametrize("model, anchors", [("multitalk", {0: 0}), ("infinitetalk", {0: 0, 72: 59})])
def test_only_the_source_frames_the_clips_start_on_are_kept(runner, tmp_path, monkeypatch, model, anchors):
    """A 60-frame source with 5 s of speech: 125 frames. MultiTalk takes the source's first frame for the image;
    InfiniteTalk anchors its two clips (81 frames, 9 of motion: starts 0 and 72) on the source frames there, the
    last one past the source's end (as the reference's `extract_specific_frames`); nothing else is kept, so a long
    video costs no more memory than a short one."""
    video = write_media(tmp_path / "source.mp4", frames=numbered_frames(60, 64, 96), fps=25)
    speech = tmp_path / "speech.wav"
    t = np.arange(5 * 16000) / 16000
    soundfile.write(speech, (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(np.pi * 4 * t) ** 2).astype(np.float32), 16000)
    requests = []
    pipeline = runner.service.pipeline
    stream = pipeline.stream
    monkeypatch.setattr(
        pipeline, "stream", lambda request, *a, **k: requests.append(request) or stream(request, *a, **k)
    )

    runner.run(**run_inputs(video=str(video), audio=str(speech), model=model, seed=1, sampling_steps=2))

    (request,) = requests
    assert {index: frame_number(frame.numpy()) for index, frame in request.video.items()} == anchors
