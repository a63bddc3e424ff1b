"""The README's Python example runs as written (from the repository root after `make demo`) and makes the video it
promises: as long as person 1's audio, with that audio muxed in."""

from __future__ import annotations

import re
import runpy
import wave

from support import REPO_ROOT
from support.mp4_boxes import mp4_tracks


def test_readme_python_example_runs(tiny_weights, tmp_path, monkeypatch) -> None:
    (block,) = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    # The layout the example expects in the repository root, in an empty directory so its output is the only file.
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "tiny-weights").symlink_to(tiny_weights)
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    (tmp_path / "example.py").write_text(block)
    monkeypatch.chdir(tmp_path)

    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")

    with wave.open(str(REPO_ROOT / "examples" / "person1.wav")) as audio:
        seconds = audio.getnframes() / audio.getframerate()
    tracks = mp4_tracks(tmp_path / "talking.mp4")
    assert tracks["vide"]["codec"] == "avc1" and tracks["soun"]["codec"] == "mp4a"
    assert tracks["vide"]["samples"] == round(seconds * 25)  # 25 fps, the length of the audio
    assert tracks["vide"]["deltas"] == {1 / 25}
    assert abs(tracks["soun"]["edit_seconds"] - seconds) < 1 / 25
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "example.py", "examples", "talking.mp4"]
