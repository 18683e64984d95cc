"""The corners a user reaches, against torch: assigned gradients, the DDP clipping habit,
changing betas, a float64 default dtype, resume, state dicts, closing, host reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zerotrain.optim import Adamax, Nadam, ZeroOptimizer

from . import corner_workers
from .harness import spawn


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_assigned_gradients_are_used(world_size: int) -> None:
    spawn(corner_workers.assigned_grads_worker, world_size)


def test_clipping_between_backward_and_step_equals_ddp() -> None:
    spawn(corner_workers.ddp_clip_worker, 3)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_changing_betas_and_dtypes_are_bitwise_torch(world_size: int, dtype: str, foreach: bool):
    spawn(corner_workers.schedule_worker, world_size, dtype, foreach)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_bitwise_through_both_formats(world_size: int, dtype: str, tmp_path) -> None:
    spawn(corner_workers.resume_worker, world_size, dtype, str(tmp_path))


@pytest.mark.parametrize("world_size", [1, 2])
def test_state_dict_contract_and_close(world_size: int) -> None:
    if world_size > 1:
        spawn(corner_workers.state_dict_contract_worker, world_size)
    spawn(corner_workers.close_worker, world_size)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_step_reads_at_most_one_value_to_the_host(world_size: int) -> None:
    spawn(corner_workers.host_reads_worker, world_size)


def test_options_that_would_do_nothing_raise() -> None:
    params = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="capturable=True is not supported by ZeroOptimizer"):
        ZeroOptimizer(params, Adamax, capturable=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported by ZeroOptimizer"):
        ZeroOptimizer(params, torch.optim.NAdam, differentiable=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        ZeroOptimizer(params, Nadam, compile="auto")


def test_state_does_not_grow_with_steps() -> None:
    # Nadam's mu_product is carried per parameter; nothing is appended per step.
    net = nn.Linear(5, 3)
    opt = ZeroOptimizer(net.parameters(), Nadam, lr=1e-2)

    def sizes() -> dict[str, int]:
        owners = {"opt": opt, "shard": opt.shard, "reducer": opt.reducer}
        return {
            f"{who}.{name}": len(value)
            for who, obj in owners.items()
            for name, value in vars(obj).items()
            if isinstance(value, list | dict)
        }

    def train(steps: int) -> None:
        for _ in range(steps):
            net(torch.randn(4, 5)).square().sum().backward()
            opt.step()

    train(3)
    before = sizes()
    train(200)
    assert sizes() == before
