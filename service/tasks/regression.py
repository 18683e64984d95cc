"""``regression``: synthetic data from a fixed random teacher MLP; sizes set by task_args."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from zerotrain.service.tasks.base import Task, TensorDataset, init_module, seeded_generator

__all__ = ["build"]

# The teacher and the data depend only on the task arguments, never on the job seed:
# two jobs with different seeds fit the same function.
_DATA_SEED = 1234


def _mlp(n_in: int, hidden: int, depth: int, n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def build(args: dict[str, Any], *, seed: int) -> Task:
    """Build the regression task: ``y = teacher(x) + noise``, a held-out 10% for ``eval_mse``."""
    n_in, n_out, n = args["in_features"], args["out_features"], args["num_samples"]
    g = seeded_generator(_DATA_SEED)
    teacher = init_module(_mlp(n_in, 64, 2, n_out), g)
    with torch.no_grad():
        x = torch.randn(n, n_in, generator=g)
        y = teacher(x) + args["noise"] * torch.randn(n, n_out, generator=g)
    n_test = max(1, n // 10)
    x_test, y_test = x[:n_test], y[:n_test]
    student = init_module(
        _mlp(n_in, args["hidden"], args["depth"], n_out), seeded_generator(seed, stream=1)
    )

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"eval_mse": F.mse_loss(m(x_test), y_test).item()}

    return Task(
        model=student,
        train=TensorDataset(x[n_test:], y[n_test:]),
        loss=F.mse_loss,
        evaluate=evaluate,
        kind="regression",
        info={"train_samples": n - n_test, "test_samples": n_test},
    )
