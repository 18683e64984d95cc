"""What a task builds: :class:`Task` (model, in-memory dataset, loss, evaluation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from zerotrain.service.seeds import derive_seed

__all__ = ["Dataset", "Task", "TensorDataset", "init_module", "seeded_generator"]


class Dataset(Protocol):
    """Indexable training data: workers draw batches by sample index."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``indices`` (1-D int64) as ``(inputs, targets)``."""
        ...


@dataclass(frozen=True)
class TensorDataset:
    """An in-memory dataset: row ``i`` of every tensor is sample ``i``."""

    inputs: torch.Tensor
    """Model inputs, first dimension = samples."""
    targets: torch.Tensor
    """Loss targets, first dimension = samples."""

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(
                f"inputs and targets differ in length: {len(self.inputs)} != {len(self.targets)}"
            )

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``indices`` (a 1-D int64 tensor) as ``(inputs, targets)``."""
        return self.inputs[indices], self.targets[indices]


@dataclass
class Task:
    """A built task. Training calls ``loss(model(inputs), targets)``."""

    model: nn.Module
    """Freshly initialised model (same weights for the same seed)."""
    train: Dataset
    """Training samples; workers draw batches from it by index."""
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """Mean loss over a batch: ``loss(outputs, targets) -> scalar``."""
    evaluate: Callable[[nn.Module], dict[str, float]]
    """Held-out metrics (e.g. ``{"accuracy": 0.95}``), computed without gradients."""
    kind: str = "regression"
    """``classification``, ``language_model`` or ``regression``."""
    info: dict[str, float] = field(default_factory=dict)
    """Sizes for logs (samples, parameters, ...)."""


def seeded_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for ``(seed, stream)``: model init and data use separate streams."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, stream))
    return g


def init_module(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every parameter from ``generator`` (independent of global RNG state)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.normal_(0.0, fan_in**-0.5, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return module
