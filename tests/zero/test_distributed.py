"""Multi-process ZeroOptimizer tests: gloo process groups of 2, 3 and 4 CPU ranks."""

from __future__ import annotations

import pytest

from . import workers
from .harness import spawn


@pytest.mark.parametrize("world_size,steps", [(2, 100), (3, 30), (4, 30)])
def test_parity_with_torch_optim(world_size: int, steps: int) -> None:
    spawn(workers.parity_worker, world_size, steps)


@pytest.mark.parametrize("world_size", [2, 3])
def test_accumulation_clipping_nonfinite_stats_bf16(world_size: int) -> None:
    spawn(workers.features_worker, world_size)


def test_checkpoint_reshard_both_directions_and_corruption(tmp_path) -> None:
    spawn(workers.ckpt_save_worker, 2, str(tmp_path))  # saved at 2
    spawn(workers.ckpt_reshard_worker, 3, str(tmp_path))  # 2 -> 3, then saved at 3
    spawn(workers.ckpt_corrupt_worker, 2, str(tmp_path))  # corrupted; then 3 -> 2


def test_step_timings_split_communication_and_optimizer() -> None:
    spawn(workers.timings_worker, 2)


def test_reduce_scatter_frees_all_but_the_reduced_slice() -> None:
    spawn(workers.grad_memory_worker, 2)
