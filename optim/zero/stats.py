"""Monitoring statistics of a ZeroOptimizer: computed on the shard, reduced in one collective."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from optim.zero.zero_optimizer import ZeroOptimizer

__all__ = ["compute_stats"]

# Columns of the per-rank vector gathered in one collective.
_PARAM_SQ, _UPDATE_SQ, _REFRESHED, _UPDATED, _U_SUM, _U_MAX, _COUNT, _SQRT_V = range(8)


def compute_stats(opt: ZeroOptimizer) -> dict[str, float]:
    """Return ``opt``'s statistics as a dict of floats (collective: one small all-gather).

    ``grad_norm`` is the global L2 norm of the averaged gradient of the last step
    (before clipping); ``update_norm`` the L2 norm of that step's parameter
    change. Adamax adds the max and mean of ``u`` (``exp_inf``) and the fraction
    of elements updated last step whose ``u`` was refreshed by ``|g| + eps``.
    Nadam adds, for the first param group at the current step ``t``: ``mu_t``,
    ``mu_product`` (prod of mu_1..mu_t), ``bias_correction1`` = 1 - mu_product
    (the divisor of the gradient term), ``bias_correction2`` = 1 - beta2**t, and
    the mean over elements of sqrt(v / (1 - beta2**step)).
    """
    last = opt._last_step_stats
    local = torch.zeros(8, dtype=torch.float64)
    local[_UPDATE_SQ] = last.get("update_sumsq", 0.0)
    local[_REFRESHED] = last.get("refreshed", 0.0)
    local[_UPDATED] = last.get("updated_elements", 0.0)
    u_max = 0.0
    for bucket in opt.layout.buckets:
        local[_PARAM_SQ] += float(opt._param_piece(bucket).double().square().sum())
    for seg in opt._segments:
        step = opt._steps[seg.slot]
        if step == 0:
            continue
        bucket = opt.layout.buckets[seg.bucket]
        lo = seg.shard_lo - bucket.shard_offset
        second = opt._state_pieces(bucket)[1][lo : lo + seg.numel]
        local[_COUNT] += seg.numel
        if opt.algorithm.name == "adamax":
            local[_U_SUM] += float(second.double().sum())
            u_max = max(u_max, float(second.max()))
        else:
            beta2 = opt.param_groups[opt.layout.slots[seg.slot].group]["betas"][1]
            local[_SQRT_V] += float((second.double() / (1 - beta2**step)).sqrt().sum())
    local[_U_MAX] = u_max
    table = opt.comm.all_gather_small(local)
    totals = table.sum(0).tolist()
    g_max = float(table[:, _U_MAX].max())

    group = opt.param_groups[0]
    step = max(opt._steps, default=0)
    param_norm = math.sqrt(totals[_PARAM_SQ])
    update_norm = math.sqrt(totals[_UPDATE_SQ])
    count = totals[_COUNT]
    out = {
        "step": float(step),
        "lr": float(group["lr"]),
        "grad_norm": float(last.get("grad_norm", 0.0)),
        "param_norm": param_norm,
        "update_norm": update_norm,
        "update_param_ratio": update_norm / param_norm if param_norm > 0 else 0.0,
        "state_bytes_per_rank": float(opt.state_bytes()),
        "skipped_steps": float(opt.skipped_steps),
    }
    if opt.algorithm.name == "adamax":
        updated = totals[_UPDATED]
        out["adamax_u_max"] = g_max
        out["adamax_u_mean"] = totals[_U_SUM] / count if count else 0.0
        out["adamax_u_refreshed_fraction"] = totals[_REFRESHED] / updated if updated else 0.0
    else:
        beta1, beta2 = group["betas"]
        mu_t = beta1 * (1.0 - 0.5 * (0.96 ** (step * group["momentum_decay"]))) if step else 0.0
        mu_product = float(opt._mu_product(0, step)) if opt.param_groups else 1.0
        out["nadam_mu_t"] = mu_t
        out["nadam_mu_product"] = mu_product
        out["nadam_bias_correction1"] = 1.0 - mu_product
        out["nadam_bias_correction2"] = 1.0 - beta2**step
        out["nadam_sqrt_v_hat_mean"] = totals[_SQRT_V] / count if count else 0.0
    return out
