"""Compiled kernels kept between container starts, so that `setup()` pays the compile once per machine type.

torch.compile's own caches live in /tmp (gone with the container). After the warm-up has compiled every graph a
request takes, the kernels, autotuning results and AOT graphs it produced are written to one file in a folder that
outlives the container (the service names the folder). The next start loads the file before compiling. The file is
keyed by torch version and GPU; a stale entry inside it is a miss, never an error.

In one process the file also keeps dynamo's traced graphs (torch's caching precompile), so a start that finds it
neither traces nor compiles (dynamo's tracing was ~35 s of a cached setup). Saved graphs drop their guards on which
functions a block calls (the self-attention kernel, fp8 linears' forward), so that file is named by what decides
them too (`MultiTalkDiT.block_code`): a start with another kernel, or with another release's model code, finds no
file rather than the wrong graphs.
The flag that records them (`torch._dynamo.config.caching_precompile`, experimental) is on only while a start
loads, compiles and warms up (`recording_compiles`). Some torch versions trace the saved graphs again (see
bench/RESULTS.md): no gain there, no harm.

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


def compile_cache_file(folder: Path | None, device: torch.device) -> Path | None:
    """The cache file in `folder` for this torch and this GPU; None without a folder or a GPU."""
    if folder is None or device.type != "cuda":
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
    """Around a start that loads a compile cache, compiles, warms up and saves: dynamo keeps the graphs it traces for
    the file (and takes the file's) only when its file was loaded before `torch.compile` was called and everything up
    to the save ran inside. Off again after, so that a request's recompile is an ordinary one. Dynamo's warning for
    each guard the saved graphs drop (over a hundred a start) is held back meanwhile: the file's name stands in for
    those guards (`traced_cache_file`)."""
    quiet = _DroppedGuards()
    dynamo_log = logging.getLogger("torch._dynamo.guards")
    dynamo_log.addFilter(quiet)
    try:
        with torch._dynamo.config.patch(caching_precompile=path is not None):
            yield
    finally:
        dynamo_log.removeFilter(quiet)
        if quiet.dropped:
            log.info("compile cache: %d guards dropped from the saved graphs (the file name keys them)", quiet.dropped)


class _DroppedGuards(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "caching_precompile" in record.getMessage():
            self.dropped += 1
            return False
        return True


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
    log.info(
        "compile cache: loaded %s (%.0f MB) in %.1f s", path, path.stat().st_size / 1e6, time.monotonic() - started
    )
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
