"""Run a function on N CPU processes joined in a gloo process group (tests of the sequence-parallel DiT)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._pytree import tree_map

from wan.runtime.workers import free_port


def _rank_main(rank: int, world: int, port: int, fn: Callable, out_dir: Path, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Copies: a functional collective's result is an AsyncCollectiveTensor that any op waits for, but torch.save
        # reads its storage directly and could save it before the collective has finished.
        result = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, fn(rank, world, *args))
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, out_dir: Path, *args) -> list:
    """`fn(rank, world, *args)` on `world` spawned processes; returns each rank's (torch.save-able) result.

    `fn` must be importable by name (a module-level function), as spawned processes import it afresh.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_main, args=(world, free_port(), fn, out_dir, args), nprocs=world, start_method="spawn")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
