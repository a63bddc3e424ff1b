"""One DiT per GPU, each in its own worker process, owned by the process that serves requests (the driver).

Cog runs one process; with N > 1 visible GPUs it starts N workers (`WorkerGroup`), one per GPU, joined in one NCCL
process group (gloo on CPU, for tests). Each worker builds the DiT on its own GPU from the same files (`DiTSource`,
streamed: no CPU copy of the weights), placed by the same memory plan as a single-process DiT
(`wan.runtime.placement`: bf16 or fp8, resident or streamed, and the attention kernel that goes with it), and prepares
a sequence-parallel group for every degree it may be asked for.
The driver keeps everything else (encoders, the sampling loop; the VAE, whose frames it splits in bands over the
GPUs: `wan.runtime.vae_bands`) and, for each step, sends the latent to every worker and gets back the velocity of
each guidance branch from the first GPU of the group that ran it; the groups run their branches at the same time
(`wan.runtime.schedule`). The group measures a pass at every sequence degree on the first clip it is given (the
warm-up's) and runs each clip's passes by the fastest schedule for that many. Tensors cross the process boundary on the CPU, through shared memory (a few MB per step);
the heavy traffic stays between the GPUs.

The driver is no member of the NCCL group, so a worker that dies cannot take it down: the driver sees the death
(process sentinel or an error reply), stops the other workers (which may wait in a collective for the dead one),
fails the request with `WorkerError` naming the GPU, and starts a fresh group on the next request.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import socket
import statistics
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp

from ..configs import NUM_TRAIN_TIMESTEPS, DiTConfig
from ..generation import sampling
from ..generation.backend import ClipInputs, TeaCacheSettings, branch_velocity
from ..loading.audio_layers import AudioLayers, AudioLayerSet, audio_layer_sets
from ..loading.checkpoints import dit_tensor_reader
from ..loading.dit_weights import DiTWeights
from ..loading.lora import LoraSet
from ..model.dit import MultiTalkDiT
from ..model.sequence_parallel import SequenceParallel
from .local import LocalDiT
from .compile_cache import inductor_cache_counts, load_compile_cache, save_compile_cache, worker_cache_file
from .placement import load_dit_for_plan, plan_for_device
from .plans import RESIDENT, MemoryPlan
from .schedule import Schedule, Split, choose_schedule, describe, schedule_rounds, valid_splits

log = logging.getLogger(__name__)

# NVLink multicast off in NCCL and torch's symmetric memory: on shared hosts it can put the GPUs out of service.
# Set in every worker before NCCL starts, whatever the environment says.
NCCL_SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class WorkerError(RuntimeError):
    """A DiT worker failed or died; the group was stopped and restarts on the next request."""


class DiTSource(Protocol):
    """How a worker gets its DiT (picklable: it travels to the worker process)."""

    @property
    def config(self) -> DiTConfig: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def build(self, device: torch.device, plan: MemoryPlan = RESIDENT) -> MultiTalkDiT:
        """The DiT on `device`, its weights and kernels placed for `plan` (`wan.runtime.placement`)."""
        ...

    def tensor_reader(self, device: torch.device) -> Callable[[str], torch.Tensor] | None:
        """Reads one DiT tensor back from the files (undoes LoRA merges exactly); None where there are no files."""
        ...

    def audio_layer_sets(self) -> dict[str, AudioLayerSet]:
        """The audio-layer sets on disk (empty where there are no files)."""
        ...


@dataclass(frozen=True)
class CheckpointSource:
    """The published checkpoint files, read tensor by tensor onto the worker's GPU (`load_dit`)."""

    checkpoint_dir: Path
    multitalk_dir: Path | None = None
    infinitetalk_dir: Path | None = None
    dtype: torch.dtype = torch.bfloat16

    @property
    def config(self) -> DiTConfig:
        return DiTConfig.from_json(Path(self.checkpoint_dir) / "config.json")

    def build(self, device: torch.device, plan: MemoryPlan = RESIDENT) -> MultiTalkDiT:
        return load_dit_for_plan(self.checkpoint_dir, self.multitalk_dir, plan, dtype=self.dtype, device=device)

    def tensor_reader(self, device: torch.device) -> Callable[[str], torch.Tensor]:
        return dit_tensor_reader(self.checkpoint_dir, self.multitalk_dir, dtype=self.dtype, device=device)

    def audio_layer_sets(self) -> dict[str, AudioLayerSet]:
        return audio_layer_sets(self.checkpoint_dir, self.multitalk_dir, self.infinitetalk_dir)


@dataclass(frozen=True)
class WorkerOptions:
    compile: bool = False  # regional compilation of the blocks
    # How each worker's DiT is placed (as the in-process one would be); None: by the worker's own card.
    memory_plan: MemoryPlan | None = None
    # The single-process compile cache file (`wan.runtime.compile_cache`): each worker loads its own file next to it before
    # compiling, and saves it on `WorkerGroup.save_compile_cache()`.
    compile_cache: Path | None = None


# Commands, driver -> every worker. Each is answered by every worker.
@dataclass(frozen=True)
class _SetWeights:
    audio_layers: str | None
    loras: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class _BeginClip:
    cond: ClipInputs  # CPU tensors
    teacache: TeaCacheSettings | None


@dataclass(frozen=True)
class _Step:
    latent: torch.Tensor  # CPU
    t: torch.Tensor
    branches: tuple[str, ...]
    schedule: Schedule


@dataclass(frozen=True)
class _EndClip:
    pass


@dataclass(frozen=True)
class _TeaCacheSteps:
    timesteps: torch.Tensor  # CPU, [steps, 1]
    settings: TeaCacheSettings
    loras: tuple[tuple[str, float], ...] | None


@dataclass(frozen=True)
class _SaveCompileCache:
    pass


@dataclass(frozen=True)
class _Stop:
    pass


def visible_devices() -> list[str]:
    """One worker device per visible GPU."""
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    """N worker processes, one DiT each: the driver's handle, a `wan.generation.backend.DiTBackend`. Start with
    `start()` (or let `begin_clip` do it), stop with `close()` (also run when the group is garbage-collected or the
    interpreter exits)."""

    def __init__(self, source: DiTSource, devices: Sequence[str], options: WorkerOptions = WorkerOptions()):
        if len(devices) < 2:
            raise ValueError(f"a worker group needs at least 2 devices, got {list(devices)}; use the DiT in-process")
        self.source = source
        self.config, self.dtype = source.config, source.dtype
        self.devices = list(devices)
        self.options = options
        self.heads: int | None = None  # the DiT's, reported by the workers
        self.worker_info: list[dict] = []  # what each worker reported when it was ready
        self.schedule: Schedule | None = None  # how a step's passes run; default: every pass over all GPUs
        self.pass_seconds: dict[int, float] | None = None  # per sequence degree, measured on the first clip
        self.active_audio_layers: str | None = "multitalk"  # what the workers' DiTs hold (re-applied after a restart)
        self.loras: tuple[tuple[str, float], ...] = ()
        self._processes: list[Any] = []
        self._connections: list[multiprocessing.connection.Connection] = []
        self._finalizer: weakref.finalize | None = None

    @property
    def size(self) -> int:
        return len(self.devices)

    @property
    def active_loras(self) -> tuple[tuple[str, float], ...]:
        return self.loras

    @property
    def running(self) -> bool:
        return bool(self._processes)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def start(self) -> None:
        """Spawn the workers and wait until every one holds its DiT."""
        if self.running:
            return
        started = time.monotonic()
        context = mp.get_context("spawn")
        port = free_port()
        for rank, device in enumerate(self.devices):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(rank, self.size, port, device, self.source, self.options, theirs),
                name=f"dit-worker-{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()  # only the worker holds its end: its death then reads as EOF here
            self._processes.append(process)
            self._connections.append(ours)
        self._finalizer = weakref.finalize(self, _stop_workers, self._processes, self._connections)
        self.worker_info = self._collect()
        self.heads = self.worker_info[0]["heads"]
        log.info("%d DiT workers ready on %s in %.0f s", self.size, ", ".join(self.devices), time.monotonic() - started)
        if self.schedule is None:  # the most GPUs a single pass can use
            self.schedule = (max(valid_splits(self.size, 1, self.heads), key=lambda split: split.gpus),)
        if self.loras or self.active_audio_layers != "multitalk":
            self._request(_SetWeights(self.active_audio_layers, self.loras))

    def close(self, grace_s: float = 10.0) -> None:
        """Stop the workers: a clean stop for those that answer within `grace_s`, else terminate them."""
        if self._finalizer is not None and self._finalizer.detach() is not None:
            _stop_workers(self._processes, self._connections, grace_s)
        self._processes, self._connections, self._finalizer = [], [], None

    def use_schedule(self, schedule: Schedule) -> None:
        """Run each step in these rounds (each split of at most this group's GPUs, with a sequence degree that divides
        the heads); `(split,)` runs every round as `split`."""
        if not schedule:
            raise ValueError("a schedule needs at least one round")
        for split in schedule:
            if split.gpus > self.size:
                raise ValueError(f"split {split} needs {split.gpus} GPUs, the group has {self.size}")
            if self.heads is not None and self.heads % split.degree:
                raise ValueError(
                    f"split {split}: sequence degree {split.degree} does not divide the {self.heads} heads"
                )
        self.schedule = tuple(schedule)

    def save_compile_cache(self) -> list[dict[str, int]]:
        """Each worker writes what it compiled to its own file next to `WorkerOptions.compile_cache` (after the
        warm-up); per worker, the graphs that came from the cache and those compiled."""
        counts = self._request(_SaveCompileCache())
        log.info(
            "DiT workers' compiled graphs (from the cache / compiled): %s",
            ", ".join(f"{c['fxgraph_cache_hit']}/{c['fxgraph_cache_miss']}" for c in counts),
        )
        return counts

    def set_weights(self, audio_layers: str | None, loras: Sequence[tuple[str | Path, float]]) -> None:
        """The audio-layer set (None: unchanged) and the merged LoRAs ((file, scale) pairs) in every worker, as
        `wan.loading.dit_weights.DiTWeights.set_weights` (kept across restarts)."""
        wanted = tuple((str(path), float(scale)) for path, scale in loras)
        audio_layers = audio_layers or self.active_audio_layers
        if (audio_layers, wanted) != (self.active_audio_layers, self.loras) and self.running:
            self._request(_SetWeights(audio_layers, wanted))
        self.active_audio_layers, self.loras = audio_layers, wanted

    def use_fastest_schedule(self, passes: int, pass_seconds: dict[int, float]) -> None:
        """The schedule that runs `passes` passes a step fastest, by the measured pass seconds per sequence degree."""
        schedule = choose_schedule(self.size, passes, self.heads, pass_seconds)
        if schedule != self.schedule:
            log.info("%d passes a step: %s (guidance groups x GPUs each, per round)", passes, describe(schedule))
        self.use_schedule(schedule)

    def begin_clip(self, cond: ClipInputs, passes: int | None = None, teacache: TeaCacheSettings | None = None) -> None:
        """Hand every worker a clip's conditioning (and a fresh TeaCache); starts the group if it is not running.
        With `passes`, the fastest schedule for that many passes a step, from pass times measured on this clip's
        shapes the first time (`calibrate`)."""
        self.start()
        if passes is not None:
            if self.pass_seconds is None:
                self.calibrate(cond)
            self.use_fastest_schedule(passes, self.pass_seconds)
        self._request(_BeginClip(cond.to("cpu"), teacache))

    def calibrate(self, cond: ClipInputs) -> dict[int, float]:
        """Measure a pass at every sequence degree on `cond`'s shapes (the schedules are chosen from these)."""
        latent = torch.zeros(self.config.out_dim, *cond.y.shape[2:])
        self.pass_seconds = self.time_passes(cond, latent, torch.full((1,), float(NUM_TRAIN_TIMESTEPS)))
        log.info(
            "DiT pass seconds by sequence degree: %s",
            ", ".join(f"{degree}: {seconds:.2f}" for degree, seconds in self.pass_seconds.items()),
        )
        return self.pass_seconds

    def velocities(self, latent: torch.Tensor, t: torch.Tensor, branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The velocity of each branch at (latent, t), the branches spread over the split's groups; on latent's
        device."""
        replies = self._request(_Step(latent.detach().cpu(), t.detach().cpu(), tuple(branches), self.schedule))
        found = {branch: v for reply in replies for branch, v in reply.items()}
        missing = set(branches) - found.keys()
        if missing:
            raise WorkerError(f"no worker returned the branches {sorted(missing)} (schedule {describe(self.schedule)})")
        return {branch: found[branch].to(latent.device) for branch in branches}

    def teacache_steps(
        self,
        timesteps: torch.Tensor,
        settings: TeaCacheSettings,
        loras: Sequence[tuple[str | Path, float]] | None = None,
    ) -> int:
        """`wan.generation.sampling.teacache_computed_steps` over the workers' DiT (the first worker answers; with
        `loras`, over the time embedding they would give it); starts the group if it is not running."""
        self.start()
        wanted = None if loras is None else tuple((str(path), float(scale)) for path, scale in loras)
        return self._request(_TeaCacheSteps(timesteps.cpu(), settings, wanted))[0]

    def end_clip(self) -> float | None:
        """Drop the clip's tensors in the workers; returns the share of DiT passes TeaCache skipped (None without
        TeaCache)."""
        counts = [c for c in self._request(_EndClip()) if c is not None]
        if not counts:
            return None
        skipped, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
        return skipped / max(total, 1)

    def time_passes(
        self,
        cond: ClipInputs,
        latent: torch.Tensor,
        t: torch.Tensor,
        degrees: Sequence[int] | None = None,
        repeats: int = 2,
    ) -> dict[int, float]:
        """Median seconds of one DiT pass (the driver's round trip) at each sequence degree (default: every degree
        the GPUs allow), after one warm-up."""
        self.begin_clip(cond)
        if degrees is None:
            degrees = sorted({split.degree for split in valid_splits(self.size, 1, self.heads)})
        kept, seconds = self.schedule, {}
        try:
            for degree in degrees:
                self.use_schedule((Split(1, degree),))
                times = []
                for _ in range(repeats + 1):
                    started = time.perf_counter()
                    self.velocities(latent, t, ("cond",))
                    times.append(time.perf_counter() - started)
                seconds[degree] = statistics.median(times[1:])
        finally:
            if self.running:
                self.end_clip()
            self.schedule = kept
        return seconds

    def _request(self, command: Any) -> list[Any]:
        if not self.running:
            raise WorkerError("the DiT workers are not running (a failed request stopped them); start() them again")
        for rank, connection in enumerate(self._connections):
            try:
                connection.send(command)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                self._fail(rank, "is gone (its pipe is closed)")
        return self._collect()

    def _collect(self) -> list[Any]:
        """Every worker's answer to the last command, watching for deaths while waiting."""
        replies: list[Any] = [None] * self.size
        pending = set(range(self.size))
        while pending:
            watched = {self._connections[r]: r for r in pending} | {self._processes[r].sentinel: r for r in pending}
            for ready in multiprocessing.connection.wait(list(watched)):
                rank = watched[ready]
                if rank not in pending:
                    continue
                connection = self._connections[rank]
                if not connection.poll():  # the sentinel fired and nothing is left to read: the process ended
                    self._died(rank)
                try:
                    status, payload = connection.recv()
                except (EOFError, ConnectionResetError):
                    self._died(rank)
                if status == "error":
                    self._fail(rank, f"failed:\n{payload}")
                replies[rank] = payload
                pending.discard(rank)
        return replies

    def _died(self, rank: int) -> None:
        self._processes[rank].join(timeout=5)
        self._fail(rank, f"died (exit code {self._processes[rank].exitcode})")

    def _fail(self, rank: int, what: str) -> None:
        self.close(grace_s=0)  # the others may wait in a collective for the failed one
        raise WorkerError(
            f"DiT worker {rank} on {self.devices[rank]} {what}\n"
            "All DiT workers were stopped; the next request starts them again."
        )


def _stop_workers(processes: list, connections: list, grace_s: float = 10.0) -> None:
    """Ask every worker to stop, give them `grace_s` seconds, then terminate (and kill) whoever is still there."""
    if grace_s > 0:
        for connection in connections:
            try:
                connection.send(_Stop())
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace_s
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
    for connection in connections:
        connection.close()


def _worker_main(
    rank: int,
    world: int,
    port: int,
    device: str,
    source: DiTSource,
    options: WorkerOptions,
    connection: multiprocessing.connection.Connection,
) -> None:
    os.environ.update(NCCL_SAFETY_ENV)
    try:
        worker = _Worker(rank, world, port, torch.device(device), source, options)
        connection.send(("ready", worker.info()))
        while not isinstance(command := connection.recv(), _Stop):
            connection.send(("ok", worker.handle(command)))
    except EOFError:  # the driver is gone
        return
    except BaseException:
        try:
            connection.send(("error", traceback.format_exc()))
        finally:
            os._exit(1)  # skip the process group's teardown: the other ranks may wait in a collective
    dist.destroy_process_group()


class _Worker:
    """A worker's state: its DiT, its sequence-parallel groups, the current split and clip."""

    def __init__(
        self, rank: int, world: int, port: int, device: torch.device, source: DiTSource, options: WorkerOptions
    ):
        self.rank, self.device, self.source = rank, device, source
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # CPU workers (tests): one thread each, so that results do not depend on the machine's cores
            torch.set_num_threads(1)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
        )
        self.dit = source.build(device, options.memory_plan or plan_for_device(device))
        self.compile_cache = worker_cache_file(options.compile_cache, rank, world) if options.compile else None
        self.compile_cache_loaded = load_compile_cache(self.compile_cache)
        if options.compile:
            # Each sequence degree (its shard's sizes) is one more graph per speaker count, beyond dynamo's default
            # of 8 variants per function on 8 GPUs; this process is the DiT's alone.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.dit.compile_blocks()
        self.sequence_groups = _sequence_groups(rank, world, self.dit.config.num_heads)
        loras = LoraSet(self.dit, reload=source.tensor_reader(device))
        sets = source.audio_layer_sets()
        self.weights = DiTWeights(loras, AudioLayers(self.dit, sets) if sets else None)
        self.cond: ClipInputs | None = None
        self.teacache: sampling.TeaCache | None = None
        self.led: set[str] = set()  # the clip's branches whose velocity this worker returns (TeaCache counts)

    def info(self) -> dict:
        return dict(
            heads=self.dit.config.num_heads,
            device=str(self.device),
            attention=getattr(self.dit.blocks[0].self_attn.attend, "__name__", "?"),
            pid=os.getpid(),
            compile_cache_loaded=self.compile_cache_loaded,
        )

    def handle(self, command: Any) -> Any:
        if isinstance(command, _SetWeights):
            return self.weights.set_weights(command.audio_layers, command.loras)
        if isinstance(command, _BeginClip):
            self.cond = command.cond.to(self.device)
            self.teacache, self.led = None, set()
            if command.teacache is not None:
                self.teacache = sampling.TeaCache(command.teacache.thresh, command.teacache.size_bucket)
            return None
        if isinstance(command, _Step):
            return self._step(command)
        if isinstance(command, _TeaCacheSteps):
            if self.rank:
                return None
            # The worker's DiT as the one in a single process: its prediction is the same code's.
            local = LocalDiT(self.dit, self.weights)
            return local.teacache_steps(command.timesteps.to(self.device), command.settings, command.loras)
        if isinstance(command, _SaveCompileCache):
            save_compile_cache(self.compile_cache)
            return inductor_cache_counts()
        if isinstance(command, _EndClip):
            counts = None
            if self.teacache is not None and self.led:
                decisions = [d for name in self.led for d in self.teacache.branches[name].decisions]
                counts = (sum(d.skipped for d in decisions), len(decisions))
            self.cond = self.teacache = None
            return counts
        raise TypeError(f"unknown worker command {command!r}")

    def _step(self, command: _Step) -> dict[str, torch.Tensor]:
        if self.cond is None:
            raise RuntimeError("a step arrived before its clip's conditioning")
        latent, t = command.latent.to(self.device), command.t.to(self.device)
        velocities = {}
        for split, branches in schedule_rounds(command.schedule, command.branches):
            group = self.rank // split.degree if self.rank < split.gpus else None
            if group is None or group >= len(branches):
                continue  # this round leaves this GPU idle
            if split.degree > 1 and split.degree not in self.sequence_groups:
                raise ValueError(f"no sequence-parallel group of degree {split.degree} (split {split})")
            parallel = self.sequence_groups[split.degree] if split.degree > 1 else None
            branch = branches[group]
            cache = self.teacache.branch(branch) if self.teacache is not None else None
            with torch.inference_mode():
                velocity = branch_velocity(self.dit, latent, t, self.cond, branch, cache, parallel=parallel)
            # Every rank of a group holds the whole velocity; only the group's first sends it back.
            if self.rank % split.degree == 0:
                velocities[branch] = velocity.cpu()
                self.led.add(branch)
        return velocities


def _sequence_groups(rank: int, world: int, heads: int) -> dict[int, SequenceParallel]:
    """This rank's sequence-parallel group for every degree d > 1 that divides the heads: the ranks are cut into
    blocks of d consecutive ranks (block i = guidance group i of any split with degree d). Every rank creates every
    group, in the same order, as `new_group` requires."""
    groups = {}
    for degree in range(2, world + 1):
        if heads % degree:
            continue
        for block in range(world // degree):
            ranks = list(range(block * degree, (block + 1) * degree))
            group = dist.new_group(ranks)
            if rank in ranks:
                groups[degree] = SequenceParallel(group, degree, rank - ranks[0])
    return groups
