"""Spawn a gloo process group on CPU and run a test function on every rank."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, store_path: str, backend: str, args: tuple
) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; re-raise failures.

    ``backend="nccl"`` puts rank ``r`` on ``cuda:r``. Ranks are forked from a
    server process that has imported torch and the workers once (``forkserver``),
    so starting a group costs a fork, not a Python start and a torch import
    (a fresh interpreter per rank for CUDA, which a fork must not inherit).
    """
    with tempfile.TemporaryDirectory(prefix="zero-store-") as tmp:
        store_path = os.path.join(tmp, "store")
        mp.start_processes(
            _entry,
            args=(fn, world_size, store_path, backend, args),
            nprocs=world_size,
            join=True,
            start_method="spawn" if backend == "nccl" else "forkserver",
        )


# Imported once by the fork server, before it forks any rank.
mp.set_forkserver_preload(["torch", "torch.distributed", f"{__package__}.workers",
                           f"{__package__}.corner_workers"])  # fmt: skip
