"""Monitoring a ZeroOptimizer, kept off the hot path.

``UpdateTracker`` measures a step's update (the norm of the parameter change
and Adamax's refreshed-``u`` count) only on the steps it is enabled for,
accumulating on the device; ``compute_stats`` reads everything back in one
small collective when asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from zerotrain.optim import functional
from zerotrain.optim.zero.comm import Communicator
from zerotrain.optim.zero.shard import Run, ShardedState

__all__ = ["UpdateTracker", "compute_stats"]

# Columns of the per-rank vector gathered in one collective.
_PARAM_SQ, _UPDATE_SQ, _REFRESHED, _UPDATED, _U_SUM, _U_MAX, _COUNT, _SQRT_V = range(8)


class UpdateTracker:
    """Accumulates the last step's update statistics on the device (only when enabled)."""

    def __init__(self) -> None:
        self.measured = False
        self._sums: torch.Tensor | None = None  # [update_sumsq, refreshed, updated]

    def start_step(self, device: torch.device) -> None:
        """Forget the previous step; measure the coming one."""
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.measured = True

    def skip_step(self) -> None:
        """The coming step is not measured (its statistics read as NaN)."""
        self._sums, self.measured = None, False

    def observe(self, run: Run, params: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor],
                beta2: float, adamax: bool) -> Callable[[], None]:  # fmt: skip
        """Call before a run's update; call the result after it."""
        before = params.clone()
        u_before = states[1].clone() if adamax else None
        sums = self._sums
        assert sums is not None

        def done() -> None:
            sums[0] += torch.dist(before, params).double().square()
            if u_before is not None:
                sums[1] += (states[1] != u_before.mul_(beta2)).sum()
            sums[2] += run.hi - run.lo

        return done

    def totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(update_sumsq, refreshed, updated)`` on the device, or None when not measured."""
        if self._sums is None:
            return None
        return self._sums[0], self._sums[1], self._sums[2]


def compute_stats(shard: ShardedState, groups: list[dict[str, Any]], comm: Communicator, *,
                  grad_norm: float, skipped_steps: int,
                  tracker: UpdateTracker) -> dict[str, float]:  # fmt: skip
    """Statistics of the last step (collective: one small all-gather, one read to the host).

    ``update_norm``, ``update_param_ratio`` and Adamax's refreshed fraction are
    NaN when the last step was not measured (``track_update_stats`` off).
    """
    device = shard.flat[0].device if shard.flat else torch.device("cpu")
    local = torch.zeros(8, dtype=torch.float64, device=device)
    measured = tracker.totals()
    if measured is not None:
        local[_UPDATE_SQ], local[_REFRESHED], local[_UPDATED] = measured
    adamax = shard.algorithm.name == "adamax"
    count = 0
    for bucket in shard.layout.buckets:
        local[_PARAM_SQ] += shard.param_piece(bucket).double().square().sum()
    for seg in shard.segments:
        step = shard.steps[seg.slot]
        if step == 0:
            continue
        bucket = shard.layout.buckets[seg.bucket]
        lo = seg.shard_lo - bucket.shard_offset
        second = shard.state_pieces(bucket)[1][lo : lo + seg.numel]
        count += seg.numel
        if adamax:
            local[_U_SUM] += second.double().sum()
            local[_U_MAX] = torch.maximum(local[_U_MAX], second.max().double())
        else:
            beta2 = groups[shard.layout.slots[seg.slot].group]["betas"][1]
            local[_SQRT_V] += (second.double() / (1 - beta2**step)).sqrt().sum()
    local[_COUNT] = count
    table = comm.all_gather_small(local).cpu()  # the one read to the host
    totals = table.sum(0).tolist()
    u_max = float(table[:, _U_MAX].max())

    step = max(shard.steps, default=0)
    param_norm = math.sqrt(totals[_PARAM_SQ])
    update_norm = math.sqrt(totals[_UPDATE_SQ]) if measured is not None else math.nan
    count_all = totals[_COUNT]
    out = {
        "step": float(step),
        "lr": float(groups[0]["lr"]),
        "grad_norm": float(grad_norm),
        "param_norm": param_norm,
        "update_norm": update_norm,
        "update_param_ratio": update_norm / param_norm if param_norm > 0 else 0.0,
        "state_bytes_per_rank": float(shard.state_bytes()),
        "skipped_steps": float(skipped_steps),
    }
    if adamax:
        updated = totals[_UPDATED]
        refreshed = totals[_REFRESHED] / updated if updated else 0.0
        out["adamax_u_max"] = u_max
        out["adamax_u_mean"] = totals[_U_SUM] / count_all if count_all else 0.0
        out["adamax_u_refreshed_fraction"] = refreshed if measured is not None else math.nan
    else:
        beta1, beta2 = groups[0]["betas"]
        mu_product = _first_group_mu_product(shard)
        out["nadam_mu_t"] = (
            functional.nadam_momentum(beta1, groups[0]["momentum_decay"], step) if step else 0.0
        )
        out["nadam_mu_product"] = mu_product
        out["nadam_bias_correction1"] = 1.0 - mu_product
        out["nadam_bias_correction2"] = 1.0 - beta2**step
        out["nadam_sqrt_v_hat_mean"] = totals[_SQRT_V] / count_all if count_all else 0.0
    return out


def _first_group_mu_product(shard: ShardedState) -> float:
    """``mu_product`` of the most-updated parameter of the first param group (1.0 before any)."""
    best_step, product = 0, 1.0
    for s, slot in enumerate(shard.layout.slots):
        if slot.group == 0 and shard.steps[s] > best_step:
            best_step, product = shard.steps[s], shard.mu_products[s]
    return product
