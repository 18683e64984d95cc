"""Which update rule an ``optimizer_class`` stands for, and how to run it on a shard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from optim import functional

__all__ = ["Algorithm", "resolve_algorithm"]


@dataclass(frozen=True)
class Algorithm:
    """An update rule: its name and the names of its per-element state tensors."""

    name: str  # "adamax" | "nadam"
    state_names: tuple[str, str]  # torch state-dict keys of the two moment tensors

    def step(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        states: tuple[torch.Tensor, torch.Tensor],
        mu_product: torch.Tensor | None,
        *,
        step: int,
        group: dict[str, Any],
        compile: bool,
    ) -> None:
        """Apply one update to a flat run of elements that share ``group`` and ``step``."""
        beta1, beta2 = group["betas"]
        if self.name == "adamax":
            functional.adamax_step(
                param, grad, states[0], states[1],
                step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], maximize=group["maximize"], compile=compile,
            )  # fmt: skip
        else:
            assert mu_product is not None
            functional.nadam_step(
                param, grad, states[0], states[1], mu_product,
                step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], momentum_decay=group["momentum_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                maximize=group["maximize"], compile=compile,
            )  # fmt: skip


ADAMAX = Algorithm("adamax", ("exp_avg", "exp_inf"))
NADAM = Algorithm("nadam", ("exp_avg", "exp_avg_sq"))


def resolve_algorithm(optimizer_class: object) -> Algorithm:
    """Map ``optim.Adamax`` / ``optim.Nadam`` (or torch's twins) to their update rule.

    Raises ``TypeError`` for any other class.
    """
    candidates: dict[object, Algorithm] = {
        torch.optim.Adamax: ADAMAX,
        torch.optim.NAdam: NADAM,
    }
    try:  # the drop-in classes (imported lazily: optim/__init__ imports this package)
        from optim.adamax import Adamax
        from optim.nadam import Nadam
    except ImportError:
        pass
    else:
        candidates[Adamax] = ADAMAX
        candidates[Nadam] = NADAM
    if optimizer_class in candidates:
        return candidates[optimizer_class]
    raise TypeError(
        "optimizer_class must be optim.Adamax or optim.Nadam "
        f"(or torch.optim.Adamax / torch.optim.NAdam), got {optimizer_class!r}"
    )
