"""A source video through the real runner on the tiny set: decoded only as far as the request uses it."""

import numpy as np
import pytest
import soundfile

from support.cog_inputs import run_inputs
from support.synthetic_media import frame_number, numbered_frames, write_media


@pytest.mark.parametrize("model, used", [("multitalk", 1), ("infinitetalk", 25)])
def test_source_video_is_read_as_far_as_the_clips_use_it(runner, tmp_path, monkeypatch, model, used):
    """A 2 s source with 1 s of speech: the video is 25 frames long; MultiTalk takes the source's first frame for the
    image, InfiniteTalk the frames up to the video's end (at 25 fps, source frame k for output frame k)."""
    video = write_media(tmp_path / "source.mp4", frames=numbered_frames(50, 64, 96), fps=25)
    speech = tmp_path / "speech.wav"
    t = np.arange(16000) / 16000
    soundfile.write(speech, (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(np.pi * 4 * t) ** 2).astype(np.float32), 16000)
    requests = []
    pipeline = runner.service.pipeline
    stream = pipeline.stream
    monkeypatch.setattr(
        pipeline, "stream", lambda request, *a, **k: requests.append(request) or stream(request, *a, **k)
    )

    runner.run(**run_inputs(video=str(video), audio=str(speech), model=model, seed=1))

    (request,) = requests
    assert [frame_number(frame) for frame in request.video.numpy()] == list(range(used))
