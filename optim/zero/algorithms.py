"""Which update rule an ``optimizer_class`` stands for, and how to run it on shard runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zerotrain.optim import functional
from zerotrain.optim.adamax import Adamax
from zerotrain.optim.nadam import Nadam

__all__ = ["Algorithm", "resolve_algorithm"]


@dataclass(frozen=True)
class Algorithm:
    """An update rule: its name and the torch state-dict keys of its two moment tensors."""

    name: str  # "adamax" | "nadam"
    state_names: tuple[str, str]

    def update(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        firsts: list[torch.Tensor],
        seconds: list[torch.Tensor],
        *,
        steps: list[int],
        mu_products: list[float],
        group: dict[str, Any],
        foreach: bool,
        compile: bool,
    ) -> None:
        """One update of flat runs that share ``group``; ``steps``/``mu_products`` per run."""
        beta1, beta2 = group["betas"]
        options = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                   "weight_decay": group["weight_decay"], "maximize": group["maximize"],
                   "foreach": foreach, "compile": compile}  # fmt: skip
        if self.name == "adamax":
            functional.adamax(params, grads, firsts, seconds, steps, **options)
        else:
            functional.nadam(
                params, grads, firsts, seconds, mu_products, steps, **options,
                momentum_decay=group["momentum_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
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
        Adamax: ADAMAX,
        Nadam: NADAM,
    }
    if optimizer_class in candidates:
        return candidates[optimizer_class]
    raise TypeError(
        "optimizer_class must be optim.Adamax or optim.Nadam "
        f"(or torch.optim.Adamax / torch.optim.NAdam), got {optimizer_class!r}"
    )
