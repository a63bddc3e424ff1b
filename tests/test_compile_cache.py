"""The compile cache between container starts (`wan.compile_cache`): a fresh process that loads the file finds
inductor's work done (a cache hit, where a fresh process without it compiles: a miss); bad files and disks cost the
compile, never the predictor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from wan.compile_cache import COMPILE_CACHE_ENV, compile_cache_file, load_compile_cache, save_compile_cache

PROBE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from torch._dynamo.utils import counters
    from wan.compile_cache import load_compile_cache, save_compile_cache
    mode, path = sys.argv[1], Path(sys.argv[2])
    loaded = load_compile_cache(path) if mode == "load" else False
    torch.compile(lambda x: torch.sin(x) * 2 + x.cos())(torch.randn(8))
    if mode == "save":
        save_compile_cache(path)
    print(json.dumps(dict(loaded=loaded, **counters["inductor"])))
""")


def probe(mode: str, cache_file, inductor_dir) -> dict:
    """A new process (a new container: its own empty inductor cache) compiling one small function."""
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(cache_file)], env=env, capture_output=True,
                          text=True, timeout=600, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="CPU inductor needs a C++ compiler")
def test_a_new_process_with_the_file_skips_the_compile(tmp_path):
    cache = tmp_path / "keep" / "inductor.bin"
    first = probe("save", cache, tmp_path / "container1")
    assert first["fxgraph_cache_miss"] == 1 and cache.is_file()
    assert [p.name for p in cache.parent.iterdir()] == ["inductor.bin"], "no partial file left behind"
    second = probe("load", cache, tmp_path / "container2")
    assert second["loaded"] and second.get("fxgraph_cache_hit") == 1 and "fxgraph_cache_miss" not in second
    without = probe("none", cache, tmp_path / "container3")
    assert without["fxgraph_cache_miss"] == 1


def test_a_bad_file_is_ignored_with_a_warning(tmp_path, caplog):
    bad = tmp_path / "inductor.bin"
    bad.write_bytes(b"not a cache")
    assert load_compile_cache(bad) is False
    assert "not used" in caplog.text and str(bad) in caplog.text
    assert load_compile_cache(tmp_path / "absent.bin") is False


def test_an_unwritable_folder_is_logged_not_raised(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"kernels", None))
    blocked = tmp_path / "file"
    blocked.write_text("")
    save_compile_cache(blocked / "inductor.bin")  # its folder is a file
    assert "not saved" in caplog.text


def test_the_file_names_torch_and_the_card_and_the_setting_turns_it_off(monkeypatch, tmp_path):
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path))
    assert compile_cache_file(torch.device("cpu")) is None  # nothing is compiled on a CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    path = compile_cache_file(torch.device("cuda"))
    assert path.parent == tmp_path and path.name == f"inductor-torch{torch.__version__.replace('+', '-')}-NVIDIA-H200.bin"
    monkeypatch.setenv(COMPILE_CACHE_ENV, "")
    assert compile_cache_file(torch.device("cuda")) is None
