"""The compile cache between container starts (`wan.runtime.compile_cache`): a fresh process that loads the file finds
inductor's work done (a cache hit, where a fresh process without it compiles: a miss) and, for the DiT's blocks,
dynamo's traced graphs (nothing traced), but never the graphs of another self-attention kernel; bad files and disks
cost the compile, never the predictor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from service.settings import COMPILE_CACHE_ENV, Settings
from wan.runtime.compile_cache import compile_cache_file, load_compile_cache, save_compile_cache

REPO_ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from torch._dynamo.utils import counters
    from wan.runtime.compile_cache import load_compile_cache, save_compile_cache
    mode, path = sys.argv[1], Path(sys.argv[2])
    loaded = load_compile_cache(path) if mode == "load" else False
    torch.compile(lambda x: torch.sin(x) * 2 + x.cos())(torch.randn(8))
    if mode == "save":
        save_compile_cache(path)
    print(json.dumps(dict(loaded=loaded, **counters["inductor"])))
""")


# `setup()`'s order on the tiny set: the pipeline loaded with its blocks compiled (an earlier start's file loaded
# first), the DiT run, the file saved; `fp8`: the fp8 memory plan, whose blocks another start's graphs would run
# wrongly (their guards on the kernels are dropped). The DiT's output is checked against the same DiT uncompiled.
DIT_PROBE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from torch._dynamo.utils import counters
    from bench.bench_dit import TINY_CLIP, dit_inputs
    from wan.runtime.compile_cache import recording_compiles, traced_cache_file
    from wan.runtime.factory import load_pipeline
    from wan.runtime.plans import FP8, RESIDENT

    plan, base, weights = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    with torch.inference_mode(), recording_compiles(base):
        pipeline = load_pipeline(weights / "Wan2.1-I2V-14B-480P", weights / "MeiGen-MultiTalk", device="cpu",
                                 dtype=torch.float32, compile=True, memory_plan=FP8 if plan == "fp8" else RESIDENT,
                                 compile_cache=base)
        dit = pipeline.dit.module
        inputs = dit_inputs(dit.config, TINY_CLIP, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
        compiled = dit(**inputs)
        pipeline.dit.save_compile_cache()
        with torch.compiler.set_stance("force_eager"):
            eager = dit(**inputs)
    print(json.dumps(dict(file=str(traced_cache_file(base, dit)),
                          traced=counters["stats"]["unique_graphs"], loaded=counters["dynamo_cache"]["dynamo_cache_hit"],
                          error=float((compiled - eager).abs().max()))))
""")


def start_probe(mode: str, cache_file, inductor_dir, script: str = PROBE, *args) -> subprocess.Popen:
    """A new process (a new container: its own empty inductor cache) compiling one small function (or `script`)."""
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    return subprocess.Popen([sys.executable, "-c", script, mode, str(cache_file), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)  # fmt: skip


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def probe(*args) -> dict:
    return result(start_probe(*args))


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="CPU inductor needs a C++ compiler")
def test_a_new_process_with_the_file_skips_the_compile(tmp_path):
    cache = tmp_path / "keep" / "inductor.bin"
    saving, without = start_probe("save", cache, tmp_path / "container1"), start_probe("none", cache, tmp_path / "c3")
    first = result(saving)  # (the two at once: neither reads what the other writes)
    assert first["fxgraph_cache_miss"] == 1 and cache.is_file()
    assert [p.name for p in cache.parent.iterdir()] == ["inductor.bin"], "no partial file left behind"
    second = probe("load", cache, tmp_path / "container2")
    assert second["loaded"] and second.get("fxgraph_cache_hit") == 1 and "fxgraph_cache_miss" not in second
    assert result(without)["fxgraph_cache_miss"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="CPU inductor needs a C++ compiler")
def test_a_new_process_traces_nothing_but_never_takes_another_plans_graphs(tmp_path, tiny_weights):
    base = tmp_path / "keep" / "inductor.bin"
    resident = start_probe("resident", base, tmp_path / "container1", DIT_PROBE, tiny_weights)
    fp8_first = start_probe("fp8", base, tmp_path / "container3", DIT_PROBE, tiny_weights)  # at once: own file names
    first = result(resident)
    assert first["traced"] >= 1 and first["loaded"] == 0 and first["error"] < 1e-6
    assert Path(first["file"]).is_file() and Path(first["file"]).parent == base.parent
    fp8 = result(fp8_first)
    second = probe("resident", base, tmp_path / "container2", DIT_PROBE, tiny_weights)
    assert second["traced"] == 0 and second["loaded"] >= 1, "the graphs come from the file: dynamo traces nothing"
    assert second["error"] < 1e-6
    assert fp8["file"] != first["file"] and fp8["loaded"] == 0 and fp8["traced"] >= 1
    # On the CPU the fp8 plan differs from the resident one by its attention kernel alone (4.5e-5 here): with the
    # resident graphs it would be that far from its eager self.
    assert fp8["error"] < 1e-6, "compiled for its own fp8 attention, not with the resident plan's graphs"


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
    folder = Settings.from_env({COMPILE_CACHE_ENV: str(tmp_path)}).compile_cache
    assert compile_cache_file(folder, torch.device("cpu")) is None  # nothing is compiled on a CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    path = compile_cache_file(folder, torch.device("cuda"))
    assert (
        path.parent == tmp_path and path.name == f"inductor-torch{torch.__version__.replace('+', '-')}-NVIDIA-H200.bin"
    )
    off = Settings.from_env({COMPILE_CACHE_ENV: ""}).compile_cache
    assert compile_cache_file(off, torch.device("cuda")) is None


def test_the_traced_graphs_file_changes_with_the_model_librarys_source(tmp_path):
    """Another release of the model code (a cache folder that outlives the container sees several) must not load the
    traced graphs saved by this one: their guards on the functions a block calls are dropped."""
    tree = tmp_path / "release"
    shutil.copytree(REPO_ROOT / "wan", tree / "wan", ignore=shutil.ignore_patterns("__pycache__"))
    script = "from wan.model.dit import MultiTalkDiT; from wan.testing.tiny import TINY_DIT; "
    script += "print(MultiTalkDiT(TINY_DIT).block_code())"

    def block_code() -> list[str]:
        env = dict(os.environ, PYTHONPATH=str(tree))
        done = subprocess.run([sys.executable, "-c", script], cwd=tree, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    before = block_code()
    rope = tree / "wan" / "model" / "rope.py"
    rope.write_text(rope.read_text() + "\n# the next release\n")
    after = block_code()
    assert before[:-1] == after[:-1], "the same classes and kernel"
    assert before[-1] != after[-1] and before[-1].startswith("wan.model source ")
