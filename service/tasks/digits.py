"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images), MLP classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from zerotrain.service.tasks.base import Task, TensorDataset, init_module, seeded_generator

__all__ = ["build"]

# The held-out split is fixed (seed 0) so that every job measures accuracy on the same images.
_SPLIT_SEED = 0


def build(args: dict[str, Any], *, seed: int) -> Task:
    """Build the digits task: inputs scaled to [0, 1], a fixed held-out split, accuracy metric."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=seeded_generator(_SPLIT_SEED))
    n_test = round(len(x) * args["test_fraction"])
    test_idx, train_idx = order[:n_test], order[n_test:]
    x_test, y_test = x[test_idx], y[test_idx]

    layers: list[nn.Module] = []
    width = x.shape[1]
    for _ in range(args["depth"]):
        layers += [nn.Linear(width, args["hidden"]), nn.ReLU()]
        width = args["hidden"]
    layers.append(nn.Linear(width, 10))
    model = init_module(nn.Sequential(*layers), seeded_generator(seed, stream=1))

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        logits = m(x_test)
        return {
            "accuracy": (logits.argmax(dim=1) == y_test).float().mean().item(),
            "eval_loss": F.cross_entropy(logits, y_test).item(),
        }

    return Task(
        model=model,
        train=TensorDataset(x[train_idx], y[train_idx]),
        loss=F.cross_entropy,
        evaluate=evaluate,
        kind="classification",
        info={"train_samples": len(train_idx), "test_samples": n_test},
    )
