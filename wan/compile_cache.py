"""Compiled kernels kept between container starts, so that `setup()` pays the compile once per machine type.

torch.compile's own caches live in /tmp (gone with the container). After the warm-up has compiled every graph a
request takes, the kernels, autotuning results and AOT graphs it produced are written to one file in a folder that
outlives the container (`MULTITALK_COMPILE_CACHE`, default `~/.cache/multitalk/compile`: mount it, or put it on the
weights volume; empty disables). The next `setup()` loads the file before compiling: dynamo still traces, inductor
finds its work done. The file is keyed by torch version and GPU; a stale entry inside it is a miss, never an error.
DiT worker processes (several GPUs) each keep a file of their own next to it (`worker_cache_file`): a worker
compiles the graphs of its own shards and rounds.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def kept_compiled(path: Path | None, workers=None) -> Iterator[None]:
    """Around a warm-up: the kernels of an earlier start loaded from `path` before, this start's saved after. With
    DiT workers (a `WorkerGroup`, which load their own files as they start) they are asked to save theirs instead;
    this process compiles nothing then."""
    if workers is None:
        load_compile_cache(path)
    yield
    if workers is None:
        save_compile_cache(path)
    else:
        workers.save_compile_cache()


def load_compile_cache(path: Path | None) -> bool:
    """Hand the file's kernels to torch.compile; False when there is none (or it cannot be read: logged)."""
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
    saved = torch.compiler.save_cache_artifacts() if path is not None else None
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
