"""The Adamax and Nadam update rules, each written once, and the ways to run them.

``adamax`` and ``nadam`` update lists of tensors in place, like torch.optim's
functional API; the drop-in classes call them with one tensor per parameter,
``ZeroOptimizer`` with one flat run of elements per call. Three layers:

* **Schedules**: the scalars that change from step to step (Adamax's step size,
  Nadam's momentum cache ``mu_t`` and its step sizes), computed on the host in
  float64 exactly as torch computes them, the same for every path.
* **Rules**: the elementwise update of each algorithm, written once against a
  handful of tensor operations (``_moments`` and ``_denominator`` functions).
* **Ways to run a rule**: one tensor at a time with ATen's kernels (torch's
  for-loop path, the default), whole lists with ``torch._foreach_*`` kernels
  (torch's multi-tensor path, ``foreach=True``), or traced by ``torch.compile``
  into one fused kernel per tensor that reads and writes every operand once
  (``compile=True``; 28 bytes per float32 element). The step-dependent scalars
  reach the fused kernel as one small tensor, so stepping never recompiles.

Parity: the for-loop and foreach paths run torch's operations in torch's order,
so each gives torch's bits for the same ``foreach`` setting. (torch's two paths
differ in Nadam's denominator, ``sqrt(v / bc2)`` per tensor and
``sqrt(v) / sqrt(bc2)`` for lists; both are kept.) The fused kernel evaluates the
for-loop formula with correctly rounded float32 operations and a fused
multiply-add exactly where ATen's vectorised CPU kernels use one (lerp, add with
alpha, addcmul). It therefore matches the for-loop path bit for bit except
through ``sqrt``, which ATen's vectorised CPU kernel approximates within 1 ulp.
Before a fused kernel is first used it is checked against the for-loop path on a
sample; a toolchain that produces a wrong kernel is reported and the eager path
runs instead, as it does when ``torch.compile`` is unavailable.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "adamax",
    "adamax_capturable",
    "adamax_step",
    "adamax_step_size",
    "advance_mu_product",
    "compile_available",
    "compile_seconds",
    "nadam",
    "nadam_capturable",
    "nadam_momentum",
    "nadam_step",
    "nadam_step_sizes",
]

_log = logging.getLogger(__name__)

Scalar = float | Tensor

# ---------------------------------------------------------------------------
# Schedules: functions of the step count, computed on the host
# ---------------------------------------------------------------------------


def adamax_step_size(lr: Scalar, beta1: float, step: float) -> Scalar:
    """``-lr / (1 - beta1**step)``: only Adamax's first moment is bias corrected."""
    return -(lr / (1 - beta1**step))


def nadam_momentum(beta1: float, momentum_decay: float, step: Any) -> Any:
    """The momentum cache ``mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay))``.

    ``step`` may be a python number or (capturable path) a tensor.
    """
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def nadam_step_sizes(
    lr: Scalar, mu: float, mu_next: float, mu_product: float
) -> tuple[Scalar, Scalar]:
    """Step sizes of the gradient and momentum terms of the Nesterov update.

    ``mu_product`` is ``mu_1 * ... * mu_t`` including this step's ``mu``:
    ``(-lr (1 - mu_t) / (1 - prod_t), -lr mu_{t+1} / (1 - prod_t mu_{t+1}))``.
    """
    return -lr * (1.0 - mu) / (1.0 - mu_product), (-lr * mu_next) / (1.0 - mu_product * mu_next)


def advance_mu_product(mu_product: float, mu: float, dtype: torch.dtype) -> float:
    """``mu_product * mu`` rounded as torch rounds its 0-dim ``mu_product`` state of ``dtype``.

    torch multiplies the tensor in place by a python float, which is first cast
    to the tensor's dtype; in float32 the product of two float32 values is
    exact in float64, so rounding it once gives torch's bits without a tensor.
    """
    if dtype == torch.float64:
        return mu_product * mu
    if dtype != torch.float32:
        raise ValueError(f"mu_product dtype must be float32 or float64, got {dtype}")
    return _round_to_float32(_round_to_float32(mu_product) * _round_to_float32(mu))


def _round_to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


# ---------------------------------------------------------------------------
# Rules: each update written once, against the operations of one way to run it
# ---------------------------------------------------------------------------


def _adamax_moments(ops, params, grads, exp_avgs, exp_infs, *, lerp_weight, beta2, eps,
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


def _nadam_moments(ops, params, grads, exp_avgs, exp_avg_sqs, *, lerp_weight, beta2,
                   one_minus_beta2, weight_decay, decay, maximize):  # fmt: skip
    """Nadam's ``m`` and ``v`` of this step, in place; returns the gradient the update uses.

    ``decay`` (``1 - lr * weight_decay``) set: decoupled weight decay (NAdamW);
    else ``weight_decay`` set: L2 penalty added to the gradient; both None: off.
    """
    if maximize:
        grads = ops.neg(grads)
    if decay is not None:
        # Decoupled (AdamW-style) weight decay.
        ops.mul_(params, decay)
    elif weight_decay is not None:
        grads = ops.add(grads, params, weight_decay)
    # Decay the first and second moment running averages.
    ops.lerp_(exp_avgs, grads, lerp_weight)
    ops.mul_(exp_avg_sqs, beta2)
    ops.addcmul_(exp_avg_sqs, grads, grads, one_minus_beta2)
    return grads


def _nadam_denominator(ops, exp_avg_sqs, bias_correction2, eps):
    """``sqrt(v / (1 - beta2**t)) + eps`` (torch's per-tensor form)."""
    denom = ops.sqrt(ops.div(exp_avg_sqs, bias_correction2))
    ops.add_(denom, eps)
    return denom


def _nadam_denominator_foreach(exp_avg_sqs, bias_correction2_sqrts, eps):
    """``sqrt(v) / sqrt(1 - beta2**t) + eps`` (torch's multi-tensor form)."""
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrts)
    torch._foreach_add_(denoms, eps)
    return denoms


# One tensor at a time: ATen's ordinary kernels (torch's for-loop path).
_PER_TENSOR = SimpleNamespace(
    neg=torch.neg,
    abs=torch.abs,
    sqrt=torch.sqrt,
    div=torch.div,
    add=lambda x, y, alpha: x.add(y, alpha=alpha),
    add_=lambda x, s: x.add_(s),
    mul_=lambda x, s: x.mul_(s),
    lerp_=lambda x, y, w: x.lerp_(y, w),
    maximum_=lambda x, y: torch.maximum(x, y, out=x),
    addcmul_=lambda x, a, b, value: x.addcmul_(a, b, value=value),
    addcdiv_=lambda x, a, b, value: x.addcdiv_(a, b, value=value),
)

# Lists of tensors: torch._foreach_* kernels (torch's multi-tensor path).
_FOREACH = SimpleNamespace(
    neg=torch._foreach_neg,
    abs=torch._foreach_abs,
    add=lambda x, y, alpha: list(torch._foreach_add(x, y, alpha=alpha)),
    add_=torch._foreach_add_,
    mul_=torch._foreach_mul_,
    lerp_=torch._foreach_lerp_,
    maximum_=torch._foreach_maximum_,
    addcmul_=lambda x, a, b, value: torch._foreach_addcmul_(x, a, b, value),
    addcdiv_=torch._foreach_addcdiv_,
)


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a * b + c`` rounded once, as ATen's vectorised CPU kernels evaluate it."""
    return torch.ops.prims.fma(a, b, c)


def _make_fused_ops(small_lerp_weight: bool) -> SimpleNamespace:
    """The operations as ``torch.compile`` traces them: pure expressions, in-place by copy.

    Where ATen's vectorised kernels use a fused multiply-add, so do these.
    """

    def lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
        # ATen's two formulas (aten/src/ATen/native/Lerp.h), in their vectorised form.
        if small_lerp_weight:
            return _fma(weight, end - start, start)
        return _fma(weight - 1, end - start, end)

    return SimpleNamespace(
        neg=torch.neg,
        abs=torch.abs,
        sqrt=torch.sqrt,
        div=torch.div,
        add=lambda x, y, alpha: _fma(y, alpha, x),
        add_=lambda x, s: x.copy_(x + s),
        mul_=lambda x, s: x.copy_(x * s),
        lerp_=lambda x, y, w: x.copy_(lerp(x, y, w)),
        maximum_=lambda x, y: x.copy_(torch.maximum(x, y)),
        addcmul_=lambda x, a, b, value: x.copy_(_fma(value * a, b, x)),
        addcdiv_=lambda x, a, b, value: x.copy_(x + value * a / b),
    )


# By ATen's choice of lerp formula (|weight| < 0.5 or not).
_FUSED = {small: _make_fused_ops(small) for small in (True, False)}


# ---------------------------------------------------------------------------
# Adamax
# ---------------------------------------------------------------------------


def adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: Sequence[float],
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool = False,
    compile: bool = False,
) -> None:
    """Adamax (Kingma & Ba 2015, section 7.1) on lists of tensors, in place.

    Args:
        params: parameters, updated in place; ``grads`` are never modified.
        grads, exp_avgs, exp_infs: the gradient, first moment ``m`` and
            infinity norm ``u`` of each parameter (same shapes and dtypes).
        steps: each tensor's step number after incrementing (1 on the first update).
        lr, beta1, beta2, eps, weight_decay, maximize: as in ``torch.optim.Adamax``.
        foreach: torch's multi-tensor path (``torch._foreach_*`` kernels).
        compile: the fused ``torch.compile`` kernel (takes precedence over ``foreach``).

    The update::

        g = -grad if maximize else grad;  g = g + weight_decay * p
        m = lerp(m, g, 1 - beta1)
        u = max(beta2 * u, |g| + eps)
        p = p - lr / (1 - beta1**step) * m / u
    """
    tensors = _prepare("adamax", params, grads, exp_avgs, exp_infs, steps=steps)
    lr = _scalar_lr(lr)
    options = {"lerp_weight": 1 - beta1, "beta2": beta2, "eps": eps,
               "weight_decay": weight_decay or None, "maximize": maximize}  # fmt: skip

    def scalars(p: Tensor, step: float) -> Tensor:  # the fused kernel's, in param's dtype
        return _scalar_tensor(p, [adamax_step_size(lr, beta1, step), 1 - beta1, beta2, eps,
                                  weight_decay])  # fmt: skip

    static = {"maximize": maximize, "weight_decay_on": weight_decay != 0,
              "small_lerp_weight": _is_small(1 - beta1)}  # fmt: skip
    if compile and _fused_usable(params):
        for p, g, m, u, step in zip(*tensors, steps, strict=True):
            values = scalars(p, step)
            kernel = _fused_kernel("adamax", _adamax_fused, (p, values), **static)
            if kernel is not None and p.numel() > 1:  # sizes 0, 1 would specialise the kernel
                kernel(p, g, m, u, values)
            else:
                adamax([p], [g], [m], [u], [step], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, maximize=maximize)  # fmt: skip
    elif foreach:
        for (p, g, m, u), group_steps in _by_device_and_dtype(tensors, steps):
            _adamax_moments(_FOREACH, p, g, m, u, **options)
            step_sizes = [adamax_step_size(_host(lr), beta1, s) for s in group_steps]
            torch._foreach_addcdiv_(p, m, u, step_sizes)  # type: ignore[arg-type]
    else:
        for *tensor, step in zip(*tensors, steps, strict=True):
            step_size = adamax_step_size(lr, beta1, step)
            for p, g, m, u in _cache_sized_chunks(*tensor):
                _adamax_moments(_PER_TENSOR, p, g, m, u, **options)
                p.addcdiv_(m, u, value=step_size)  # type: ignore[arg-type]  # tensor lr: as torch


def _adamax_fused(
    param: Tensor,  # (N,) float dtype; updated in place
    grad: Tensor,  # (N,)
    exp_avg: Tensor,  # (N,) updated in place
    exp_inf: Tensor,  # (N,) updated in place
    scalars: Tensor,  # (5,) [step_size, 1 - beta1, beta2, eps, weight_decay], param dtype
    *,
    maximize: bool,
    weight_decay_on: bool,
    small_lerp_weight: bool,
) -> None:
    step_size, lerp_weight, beta2, eps, weight_decay = scalars.unbind()
    ops = _FUSED[small_lerp_weight]
    _adamax_moments(ops, param, grad, exp_avg, exp_inf, lerp_weight=lerp_weight, beta2=beta2,
                    eps=eps, weight_decay=weight_decay if weight_decay_on else None,
                    maximize=maximize)  # fmt: skip
    ops.addcdiv_(param, exp_avg, exp_inf, step_size)


def adamax_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """``adamax`` with each step count a tensor on the parameter's device (CUDA graph capture).

    Increments ``state_steps`` in place and reads nothing back to the host;
    follows ``torch.optim.Adamax(capturable=True)``'s arithmetic.
    """
    tensors = _prepare("adamax_capturable", params, grads, exp_avgs, exp_infs)
    options = {"lerp_weight": 1 - beta1, "beta2": beta2, "eps": eps,
               "weight_decay": weight_decay or None, "maximize": maximize}  # fmt: skip
    for p, g, m, u, step_t in zip(*tensors, state_steps, strict=True):
        step_t += 1
        _adamax_moments(_PER_TENSOR, p, g, m, u, **options)
        # -(1 - beta1**t) / lr, so that addcdiv needs no host-side value (torch #121238).
        neg_bias_correction = beta1**step_t - 1
        neg_bias_correction.div_(lr)
        p.addcdiv_(m, u * neg_bias_correction)


# ---------------------------------------------------------------------------
# Nadam
# ---------------------------------------------------------------------------


def nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: Sequence[float],
    steps: Sequence[float],
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    foreach: bool = False,
    compile: bool = False,
) -> None:
    """Nadam (Dozat 2016) with torch's momentum schedule, on lists of tensors, in place.

    Args:
        params: parameters, updated in place; ``grads`` are never modified.
        grads, exp_avgs, exp_avg_sqs: the gradient, first moment ``m`` and
            second moment ``v`` of each parameter (same shapes and dtypes).
        mu_products: each tensor's ``mu_1 * ... * mu_t`` *including* this step's
            ``mu_t`` (the caller keeps it as state: see ``advance_mu_product``).
        steps: each tensor's step number after incrementing (1 on the first update).
        lr, beta1, beta2, eps, weight_decay, momentum_decay, decoupled_weight_decay,
            maximize: as in ``torch.optim.NAdam``.
        foreach: torch's multi-tensor path (``torch._foreach_*`` kernels).
        compile: the fused ``torch.compile`` kernel (takes precedence over ``foreach``).

    The update, with ``mu_t = nadam_momentum(beta1, momentum_decay, t)``::

        g = -grad if maximize else grad
        p = p * (1 - lr * weight_decay)        if decoupled_weight_decay
        g = g + weight_decay * p               otherwise
        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        denom = sqrt(v / (1 - beta2**t)) + eps
        p = p - lr * (1 - mu_t) / (1 - prod_{i<=t} mu_i) * g / denom
              - lr * mu_{t+1} / (1 - prod_{i<=t+1} mu_i) * m / denom
    """
    tensors = _prepare("nadam", params, grads, exp_avgs, exp_avg_sqs, steps=steps)
    if len(mu_products) != len(params):
        raise ValueError(
            f"nadam: got {len(mu_products)} mu_products for {len(params)} parameters"
        )
    lr = _scalar_lr(lr)
    decoupled = weight_decay != 0 and decoupled_weight_decay
    l2 = weight_decay != 0 and not decoupled_weight_decay
    options = {"lerp_weight": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2,
               "weight_decay": weight_decay if l2 else None,
               "decay": 1 - lr * weight_decay if decoupled else None,
               "maximize": maximize}  # fmt: skip

    def step_sizes(step: float, mu_product: float, lr: Scalar = lr) -> tuple[Scalar, Scalar]:
        mu = nadam_momentum(beta1, momentum_decay, step)
        return nadam_step_sizes(lr, mu, nadam_momentum(beta1, momentum_decay, step + 1), mu_product)

    def scalars(p: Tensor, step: float, mu_product: float) -> Tensor:
        return _scalar_tensor(p, [*step_sizes(step, mu_product), 1 - lr * weight_decay,
                                  1 - beta2**step, 1 - beta1, beta2, 1 - beta2, eps,
                                  weight_decay])  # fmt: skip

    static = {"maximize": maximize, "decoupled": decoupled, "l2": l2,
              "small_lerp_weight": _is_small(1 - beta1)}  # fmt: skip
    if compile and _fused_usable(params):
        for p, g, m, v, mu_product, step in zip(*tensors, mu_products, steps, strict=True):
            values = scalars(p, step, mu_product)
            kernel = _fused_kernel("nadam", _nadam_fused, (p, values), **static)
            if kernel is not None and p.numel() > 1:  # sizes 0, 1 would specialise the kernel
                kernel(p, g, m, v, values)
            else:
                nadam([p], [g], [m], [v], [mu_product], [step], lr=lr, beta1=beta1, beta2=beta2,
                      eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)  # fmt: skip
    elif foreach:
        for (p, g, m, v), group_steps, products in _by_device_and_dtype(tensors, steps, mu_products):
            g = _nadam_moments(_FOREACH, p, g, m, v, **options)
            denoms = _nadam_denominator_foreach(v, [(1 - beta2**s) ** 0.5 for s in group_steps], eps)
            sizes = [step_sizes(s, mp, _host(lr)) for s, mp in zip(group_steps, products)]
            # The Nesterov step: the current gradient's share, then the momentum's.
            torch._foreach_addcdiv_(p, g, denoms, [float(size[0]) for size in sizes])
            torch._foreach_addcdiv_(p, m, denoms, [float(size[1]) for size in sizes])
    else:
        for *tensor, mu_product, step in zip(*tensors, mu_products, steps, strict=True):
            grad_size, exp_avg_size = step_sizes(step, mu_product)
            for p, g, m, v in _cache_sized_chunks(*tensor):
                g = _nadam_moments(_PER_TENSOR, p, g, m, v, **options)
                denom = _nadam_denominator(_PER_TENSOR, v, 1 - beta2**step, eps)
                # The Nesterov step: the current gradient's share, then the momentum's.
                p.addcdiv_(g, denom, value=grad_size)  # type: ignore[arg-type]
                p.addcdiv_(m, denom, value=exp_avg_size)  # type: ignore[arg-type]


def _nadam_fused(
    param: Tensor,  # (N,) float dtype; updated in place
    grad: Tensor,  # (N,)
    exp_avg: Tensor,  # (N,) updated in place
    exp_avg_sq: Tensor,  # (N,) updated in place
    scalars: Tensor,  # (9,) see nadam(), param dtype
    *,
    maximize: bool,
    decoupled: bool,
    l2: bool,
    small_lerp_weight: bool,
) -> None:
    (
        grad_size, exp_avg_size, decay, bias_correction2,
        lerp_weight, beta2, one_minus_beta2, eps, weight_decay,
    ) = scalars.unbind()  # fmt: skip
    ops = _FUSED[small_lerp_weight]
    g = _nadam_moments(ops, param, grad, exp_avg, exp_avg_sq, lerp_weight=lerp_weight,
                       beta2=beta2, one_minus_beta2=one_minus_beta2,
                       weight_decay=weight_decay if l2 else None,
                       decay=decay if decoupled else None, maximize=maximize)  # fmt: skip
    denom = _nadam_denominator(ops, exp_avg_sq, bias_correction2, eps)
    ops.addcdiv_(param, g, denom, grad_size)
    ops.addcdiv_(param, exp_avg, denom, exp_avg_size)


def nadam_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """``nadam`` with the step counts and ``mu_products`` as tensors on the device.

    Increments ``state_steps`` and advances ``mu_products`` in place, reading
    nothing back to the host; follows ``torch.optim.NAdam(capturable=True)``'s
    arithmetic.
    """
    tensors = _prepare("nadam_capturable", params, grads, exp_avgs, exp_avg_sqs)
    decoupled = weight_decay != 0 and decoupled_weight_decay
    l2 = weight_decay != 0 and not decoupled_weight_decay
    for p, g, m, v, mu_product, step_t in zip(*tensors, mu_products, state_steps, strict=True):
        step_t += 1
        g = _nadam_moments(_PER_TENSOR, p, g, m, v, lerp_weight=1 - beta1, beta2=beta2,
                           one_minus_beta2=1 - beta2, weight_decay=weight_decay if l2 else None,
                           decay=1 - lr * weight_decay if decoupled else None,
                           maximize=maximize)  # fmt: skip
        mu = nadam_momentum(beta1, momentum_decay, step_t)
        mu_next = nadam_momentum(beta1, momentum_decay, step_t + 1)
        mu_product *= mu
        denom = _nadam_denominator(_PER_TENSOR, v, 1 - beta2**step_t, eps)
        grad_size, exp_avg_size = nadam_step_sizes(lr, mu, mu_next, mu_product)  # type: ignore[arg-type]
        p.addcdiv_(g * grad_size, denom)
        p.addcdiv_(m * exp_avg_size, denom)


# ---------------------------------------------------------------------------
# One tensor at a time (benchmarks, tests, quick experiments)
# ---------------------------------------------------------------------------


def adamax_step(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_inf: Tensor, *, step: float,
    compile: bool = False, **options: Any,
) -> None:  # fmt: skip
    """``adamax`` on one tensor (``options``: ``lr``, ``beta1``, ``beta2``, ``eps``,
    ``weight_decay``, ``maximize``)."""
    _check_same_layout("adamax_step", param, grad=grad, exp_avg=exp_avg, exp_inf=exp_inf)
    adamax([param], [grad], [exp_avg], [exp_inf], [step], compile=compile, **options)


def nadam_step(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, mu_product: Tensor, *,
    step: float, compile: bool = False, **options: Any,
) -> None:  # fmt: skip
    """``nadam`` on one tensor; ``mu_product`` is torch's 0-dim state, advanced in place.

    ``options``: ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``,
    ``momentum_decay``, ``decoupled_weight_decay``, ``maximize``.
    """
    if mu_product.dim() != 0:
        raise ValueError(
            f"nadam_step: mu_product must be a 0-dim tensor, got shape {tuple(mu_product.shape)}"
        )
    _check_same_layout("nadam_step", param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    mu_product *= nadam_momentum(options["beta1"], options["momentum_decay"], step)
    nadam([param], [grad], [exp_avg], [exp_avg_sq], [mu_product.item()], [step],
          compile=compile, **options)  # fmt: skip


# ---------------------------------------------------------------------------
# The fused kernels: built once per variant, checked before first use
# ---------------------------------------------------------------------------


def compile_available() -> bool:
    """True when ``torch.compile`` can build the fused kernels here."""
    return _compile_probe()


def compile_seconds() -> float:
    """Seconds this process has spent building and checking fused kernels so far.

    Monotonic; the difference around a call is the compile time it caused.
    """
    return _compile_clock.total


class _CompileClock:
    total = 0.0


_compile_clock = _CompileClock()
_kernels: dict[tuple[Any, ...], Callable[..., None]] = {}
_kernels_lock = threading.Lock()


@functools.cache
def _compile_probe() -> bool:
    try:
        probe = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
        return bool(torch.equal(probe(torch.ones(4)), torch.full((4,), 3.0)))
    except Exception as exc:  # compiler missing or broken: fall back to eager
        _log.warning("torch.compile unavailable (%s); fused optimizer kernels run eagerly", exc)
        return False


def _fused_usable(params: list[Tensor]) -> bool:
    # Autograd-tracked tensors, or no working compiler: the eager path.
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return False
    return _compile_probe()


def _fused_kernel(
    name: str, fn: Callable[..., None], sample: tuple[Tensor, Tensor], **static: bool
) -> Callable[..., None] | None:
    """The compiled ``fn`` for these static options, or None where it must not be used.

    Built once per process with dynamic shapes (one kernel for every length).
    Before its first use on a (dtype, device) it runs beside the same function
    evaluated eagerly on random data with ``sample``'s scalars: a toolchain
    that builds a wrong kernel is reported, and the eager path runs instead.
    """
    key = (name, *sorted(static.items()))
    with _kernels_lock:
        kernel = _kernels.get(key)
        if kernel is None:
            # Registers torch.ops.prims.fma, which the fused kernels use.
            from torch._inductor import inductor_prims  # noqa: F401

            kernel = torch.compile(functools.partial(fn, **static), fullgraph=True, dynamic=True)
            _kernels[key] = kernel
        like, scalars = sample
        where = (key, like.dtype, like.device)
        if where not in _checked:
            start = time.perf_counter()
            _checked[where] = _agrees(name, kernel, functools.partial(fn, **static), like, scalars)
            _compile_clock.total += time.perf_counter() - start
    return kernel if _checked[where] else None


_checked: dict[tuple[Any, ...], bool] = {}


def _agrees(name: str, compiled: Callable[..., None], eager: Callable[..., None],
            like: Tensor, scalars: Tensor) -> bool:  # fmt: skip
    """Compiled and eager evaluations of one fused function agree on a random sample."""
    results = []
    for kernel in (compiled, eager):
        gen = torch.Generator().manual_seed(0)
        tensors = [torch.randn(4099, generator=gen, dtype=torch.float64) for _ in range(4)]
        tensors[3] = tensors[3].abs() + 0.5  # a second moment / infinity norm is positive
        tensors = [t.to(dtype=like.dtype, device=like.device) for t in tensors]
        kernel(*tensors, scalars)
        results.append(tensors)
    for c, e in zip(*results):
        if not torch.allclose(c, e, rtol=1e-4, atol=1e-6):
            _log.error(
                "torch.compile built a %s kernel that disagrees with the eager step (max "
                "error %.3g, %s on %s); the fused step is off in this process and the eager "
                "path runs. A stale inductor cache (TORCHINDUCTOR_CACHE_DIR) shared across "
                "CPUs or ATEN_CPU_CAPABILITY settings is a known cause.",
                name, float((c.double() - e.double()).abs().max()), like.dtype, like.device,
            )  # fmt: skip
            return False
    return True


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# Elements per piece of the eager CPU step: the operands and temporaries of one
# piece (~7 x 256 KiB in fp32) stay in L2 across the step's ~8 passes.
_EAGER_CHUNK = 1 << 16


def _cache_sized_chunks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Large contiguous CPU buffers in cache-sized pieces; anything else whole.

    Every operation of the step is elementwise, so piecewise evaluation gives the
    same bits; it only keeps the eager multi-pass step out of main memory (and
    its temporaries small) when the sharded optimizer steps one huge flat shard.
    """
    first = tensors[0]
    if (
        first.device.type != "cpu"
        or first.numel() <= 2 * _EAGER_CHUNK
        or not all(t.is_contiguous() for t in tensors)
    ):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, first.numel(), _EAGER_CHUNK):
        yield tuple(f[start : start + _EAGER_CHUNK] for f in flat)


def _by_device_and_dtype(
    tensors: tuple[list[Tensor], ...], *per_tensor: Sequence[float]
) -> Iterator[tuple[Any, ...]]:
    """torch's grouping for the foreach path, with each group's per-tensor numbers."""
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        list(tensors), with_indices=True  # type: ignore[arg-type]
    )
    for lists, indices in grouped.values():
        yield (lists, *([values[i] for i in indices] for values in per_tensor))


def _prepare(fn: str, params: list[Tensor], *others: list[Tensor],
             steps: Sequence[float] | None = None) -> tuple[list[Tensor], ...]:  # fmt: skip
    """Check the lists line up; complex tensors become real views, as torch.optim does."""
    second = "exp_infs" if fn.startswith("adamax") else "exp_avg_sqs"
    names = ("grads", "exp_avgs", second)
    for name, tensors in zip(names, others):
        if len(tensors) != len(params):
            raise ValueError(f"{fn}: got {len(tensors)} {name} for {len(params)} parameters")
    if steps is not None and len(steps) != len(params):
        raise ValueError(f"{fn}: got {len(steps)} steps for {len(params)} parameters")
    for i, p in enumerate(params):
        _check_same_layout(fn, p, **{f"{name}[{i}]": t[i] for name, t in zip(names, others)})
    lists = (list(params), *(list(t) for t in others))
    for tensors in lists:
        for i, t in enumerate(tensors):
            if torch.is_complex(t):
                tensors[i] = torch.view_as_real(t)
    return lists


def _check_same_layout(fn: str, param: Tensor, **others: Tensor) -> None:
    for name, tensor in others.items():
        if tensor.shape != param.shape:
            raise ValueError(
                f"{fn}: {name} must have the shape of param {tuple(param.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.dtype != param.dtype:
            raise ValueError(
                f"{fn}: {name} must have the dtype of param ({param.dtype}), got {tensor.dtype}"
            )


def _is_small(weight: float) -> bool:
    return abs(weight) < 0.5


def _scalar_tensor(param: Tensor, values: list[Scalar]) -> Tensor:
    # In param's dtype: eager casts its python-scalar operands the same way.
    floats = [v.item() if isinstance(v, Tensor) else float(v) for v in values]
    return torch.tensor(floats, dtype=param.dtype).to(param.device, non_blocking=True)


def _scalar_lr(lr: Scalar) -> Scalar:
    # A 1-element tensor lr (as a param group may hold) becomes 0-dim, as torch does.
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}"
            )
        return lr.reshape(())
    return lr


def _host(value: Scalar) -> float:
    return value.item() if isinstance(value, Tensor) else value
