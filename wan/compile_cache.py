"""Compiled kernels kept between container starts, so that `setup()` pays the compile once per machine type.

torch.compile's own caches live in /tmp (gone with the container). After the warm-up has compiled every graph a
request takes, the kernels, autotuning results and AOT graphs it produced are written to one file in a folder that
outlives the container (`MULTITALK_COMPILE_CACHE`, default `~/.cache/multitalk/compile`: mount it, or put it on the
weights volume; empty disables). The next `setup()` loads the file before compiling. The file is keyed by torch
version and GPU; a stale entry inside it is a miss, never an error.

In one process the file also keeps dynamo's traced graphs (torch's caching precompile), so a start that finds it
neither traces nor compiles (dynamo's tracing was ~35 s of a cached setup). Saved graphs drop their guards on which
functions a block calls (the self-attention kernel, fp8 linears' forward), so that file is named by what decides
them too (`MultiTalkDiT.block_code`): a start with another kernel finds no file rather than the wrong graphs.
The flag that records them (`torch._dynamo.config.caching_precompile`, experimental) is on only while `setup()`
loads, compiles and warms up (`recording_compiles`). With torch 2.13 a start then traces nothing (CPU test); torch
2.11's dynamo finds the graphs and traces them again (H200, bench/NOTES.md session 6): no gain there, no harm.

DiT worker processes (several GPUs) each keep a file of their own next to it (`worker_cache_file`), kernels only
(traced graphs of blocks that take a process group were not tried): a worker compiles the graphs of its own shards
and rounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

COMPILE_CACHE_ENV = "MULTITALK_COMPILE_CACHE"


def compile_cache_file(device: torch.device) -> Path | None:
    """The cache file for this torch and this GPU; None when disabled or not on a GPU."""
    folder = os.environ.get(COMPILE_CACHE_ENV, str(Path.home() / ".cache" / "multitalk" / "compile")).strip()
    if not folder or device.type != "cuda":
        return None
    card = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    return Path(folder) / f"inductor-torch{torch.__version__.replace('+', '-')}-{card}.bin"


def worker_cache_file(path: Path | None, rank: int, world: int) -> Path | None:
    """DiT worker `rank` of `world`'s file, next to the single-process one `path` (None: none)."""
    return None if path is None else path.with_name(f"{path.stem}-worker{rank}of{world}{path.suffix}")


def inductor_cache_counts() -> dict[str, int]:
    """This process's FX-graph cache hits and misses so far (what came from a cache, what was compiled)."""
    from torch._dynamo.utils import counters

    return {key: counters["inductor"].get(key, 0) for key in ("fxgraph_cache_hit", "fxgraph_cache_miss")}


def traced_cache_file(path: Path | None, dit: torch.nn.Module) -> Path | None:
    """The single-process file for `dit` next to `path`, named by its blocks' code (`MultiTalkDiT.block_code`)."""
    if path is None:
        return None
    return path.with_name(f"{path.stem}-{hashlib.sha256(dit.block_code().encode()).hexdigest()[:12]}{path.suffix}")


@contextlib.contextmanager
def recording_compiles(path: Path | None) -> Iterator[None]:
    """Around a setup that loads a compile cache, compiles, warms up and saves: dynamo keeps the graphs it traces for
    the file (and takes the file's) only when its file was loaded before `torch.compile` was called and everything up
    to the save ran inside. Off again after, so that a request's recompile is an ordinary one."""
    with torch._dynamo.config.patch(caching_precompile=path is not None):
        yield


def save_compiled(path: Path | None, pipeline) -> None:
    """After the warm-up: the single-process file for the pipeline's DiT, or each DiT worker's own."""
    if pipeline.workers is not None:
        pipeline.workers.save_compile_cache()
    else:
        save_compile_cache(traced_cache_file(path, pipeline.dit))


def load_compile_cache(path: Path | None) -> bool:
    """Hand the file's kernels (and traced graphs) to torch.compile; False when there is none or it cannot be read."""
    if path is None or not path.is_file():
        return False
    started = time.monotonic()
    try:
        # torch checks the bytes' checksum and answers None (with its own warning) for a corrupt file
        loaded = torch.compiler.load_cache_artifacts(path.read_bytes()) is not None
    except Exception as error:  # a truncated or foreign file must not stop the predictor: it compiles anew
        loaded, problem = False, f"{type(error).__name__}: {error}"
    else:
        problem = "unreadable or corrupt"
    if not loaded:
        log.warning("compile cache %s not used (%s); compiling from scratch", path, problem)
        return False
    log.info("compile cache: loaded %s (%.0f MB) in %.1f s", path, path.stat().st_size / 1e6, time.monotonic() - started)
    return True


def save_compile_cache(path: Path | None) -> None:
    """Write what this process compiled (atomically: a reader never sees half a file); failures are logged only."""
    if path is None:
        return
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as error:  # e.g. a graph that cannot be serialised: the next start compiles again, nothing worse
        log.warning("compile cache not saved to %s (%s: %s)", path, type(error).__name__, error)
        return
    if saved is None:
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(saved[0])
        os.replace(partial, path)
    except OSError as error:  # a read-only or full disk costs the next start its compile, nothing more
        with contextlib.suppress(OSError):
            partial.unlink()
        log.warning("compile cache not saved to %s (%s)", path, error)
        return
    log.info("compile cache: saved %s (%.0f MB)", path, path.stat().st_size / 1e6)
