"""The maths of Adamax and Nadam, written once: step-size schedules and elementwise rules.

The schedules are functions of the step count, computed on the host in float64
exactly as torch computes them. The rules (``*_moments``, ``nadam_denominator``)
are written against a handful of tensor operations, ``ops``: ``PER_TENSOR``
runs them one tensor at a time with ATen's kernels (torch's for-loop path),
``FOREACH`` on lists with ``torch._foreach_*`` kernels (torch's multi-tensor
path), and ``zerotrain.optim._fused.FUSED_OPS`` traces them into one kernel.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FOREACH",
    "PER_TENSOR",
    "adamax_moments",
    "adamax_step_size",
    "advance_mu_product",
    "nadam_denominator",
    "nadam_moments",
    "nadam_momentum",
    "nadam_step_sizes",
]

Scalar = float | Tensor

# --------------------------------------------------------------- schedules


def adamax_step_size(lr: Scalar, beta1: float, step: Any) -> Scalar:
    """``-lr / (1 - beta1**step)``: only Adamax's first moment is bias corrected."""
    return -(lr / (1 - beta1**step))


def nadam_momentum(beta1: float, momentum_decay: float, step: Any) -> Any:
    """The momentum cache ``mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay))``
    (``step``: a number, or on the capturable path a tensor)."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def nadam_step_sizes(lr: Scalar, mu: Any, mu_next: Any, mu_product: Any) -> tuple[Any, Any]:
    """Step sizes of the gradient and momentum terms of the Nesterov update.

    ``mu_product`` is ``mu_1 * ... * mu_t`` including this step's ``mu``:
    ``(-lr (1 - mu_t) / (1 - prod_t), -lr mu_{t+1} / (1 - prod_t mu_{t+1}))``.
    """
    return -lr * (1.0 - mu) / (1.0 - mu_product), (-lr * mu_next) / (1.0 - mu_product * mu_next)


def advance_mu_product(mu_product: float, mu: float, dtype: torch.dtype) -> float:
    """``mu_product * mu`` rounded as torch rounds its 0-dim ``mu_product`` state of ``dtype``.

    torch multiplies the tensor in place by a python float, first cast to the
    tensor's dtype; in float32 the product of two float32 values is exact in
    float64, so rounding it once gives torch's bits without a tensor.
    """
    if dtype == torch.float64:
        return mu_product * mu
    if dtype != torch.float32:
        raise ValueError(f"mu_product dtype must be float32 or float64, got {dtype}")
    return _round_to_float32(_round_to_float32(mu_product) * _round_to_float32(mu))


def _round_to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


# ------------------------------------------------------------------- rules


def adamax_moments(ops, params, grads, exp_avgs, exp_infs, *, lerp_weight, beta2, eps,
                    weight_decay, maximize):  # fmt: skip
    """Adamax's ``m`` and ``u`` of this step, in place (``weight_decay`` None: off)."""
    if maximize:
        grads = ops.neg(grads)
    if weight_decay is not None:
        grads = ops.add(grads, params, weight_decay)
    # Update biased first moment estimate.
    ops.lerp_(exp_avgs, grads, lerp_weight)
    # Update the exponentially weighted infinity norm (eps inside the max).
    ops.mul_(exp_infs, beta2)
    bounded = ops.abs(grads)
    ops.add_(bounded, eps)
    ops.maximum_(exp_infs, bounded)


def nadam_moments(ops, params, grads, exp_avgs, exp_avg_sqs, *, lerp_weight, beta2,
                   one_minus_beta2, weight_decay, decay, maximize):  # fmt: skip
    """Nadam's ``m`` and ``v`` of this step, in place; returns the gradient the update uses.

    ``decay`` (``1 - lr * weight_decay``) set: decoupled weight decay (NAdamW);
    else ``weight_decay`` set: L2 penalty added to the gradient; both None: off.
    """
    if maximize:
        grads = ops.neg(grads)
    if decay is not None:
        ops.mul_(params, decay)  # decoupled (AdamW-style) weight decay
    elif weight_decay is not None:
        grads = ops.add(grads, params, weight_decay)
    # Decay the first and second moment running averages.
    ops.lerp_(exp_avgs, grads, lerp_weight)
    ops.mul_(exp_avg_sqs, beta2)
    ops.addcmul_(exp_avg_sqs, grads, grads, one_minus_beta2)
    return grads


def nadam_denominator(ops, exp_avg_sqs, bias_correction2, eps):
    """``sqrt(v / (1 - beta2**t)) + eps`` (torch's per-tensor form)."""
    denom = ops.sqrt(ops.div(exp_avg_sqs, bias_correction2))
    ops.add_(denom, eps)
    return denom


# One tensor at a time: ATen's ordinary kernels (torch's for-loop path).
PER_TENSOR = SimpleNamespace(
    neg=torch.neg, abs=torch.abs, sqrt=torch.sqrt, div=torch.div,
    add=lambda x, y, alpha: x.add(y, alpha=alpha),
    add_=lambda x, s: x.add_(s),
    mul_=lambda x, s: x.mul_(s),
    lerp_=lambda x, y, w: x.lerp_(y, w),
    maximum_=lambda x, y: torch.maximum(x, y, out=x),
    addcmul_=lambda x, a, b, value: x.addcmul_(a, b, value=value),
)  # fmt: skip

# Lists of tensors: torch._foreach_* kernels (torch's multi-tensor path).
FOREACH = SimpleNamespace(
    neg=torch._foreach_neg, abs=torch._foreach_abs,
    add=lambda x, y, alpha: list(torch._foreach_add(x, y, alpha=alpha)),
    add_=torch._foreach_add_, mul_=torch._foreach_mul_, lerp_=torch._foreach_lerp_,
    maximum_=torch._foreach_maximum_,
    addcmul_=lambda x, a, b, value: torch._foreach_addcmul_(x, a, b, value),
)  # fmt: skip
