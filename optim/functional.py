"""The Adamax and Nadam update rules, each written once, and the ways to run them.

``adamax`` and ``nadam`` update lists of tensors in place, like torch.optim's
functional API; the drop-in classes call them with one tensor per parameter,
``ZeroOptimizer`` with one flat run of elements per call. Three layers:

* **Schedules**: the scalars that change from step to step (Adamax's step size,
  Nadam's momentum cache ``mu_t`` and its step sizes), computed on the host in
  float64 exactly as torch computes them, the same for every path.
* **Rules**: the elementwise update of each algorithm, written once against a
  handful of tensor operations (the ``_moments`` and ``_denominator`` functions).
* **Ways to run a rule**: one tensor at a time with ATen's kernels (torch's
  for-loop path, the default), whole lists with ``torch._foreach_*`` kernels
  (torch's multi-tensor path, ``foreach=True``), or traced by ``torch.compile``
  into one fused kernel per tensor that reads and writes every operand once
  (``compile=True``, 28 bytes per float32 element; see ``zerotrain.optim._fused``). The
  step-dependent scalars reach the fused kernel as one small tensor, so stepping
  never recompiles. ``capturable=True`` keeps the step counts on the device.

Parity: the for-loop, foreach and capturable paths run torch's operations in
torch's order, so each gives torch's bits for the same options. (torch's paths
differ in Nadam's denominator, ``sqrt(v / bc2)`` per tensor and ``sqrt(v) /
sqrt(bc2)`` for lists, and in the capturable arithmetic; all are kept.) The
fused kernel evaluates the for-loop formula with correctly rounded float32
operations and a fused multiply-add where ATen's vectorised CPU kernels use one
(lerp, add with alpha, addcmul): it matches the for-loop path bit for bit except
through ``sqrt``, which ATen's vectorised CPU kernel approximates within 1 ulp.
Where ``torch.compile`` does not work, or builds a kernel that fails its check,
the for-loop path runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from zerotrain.optim import _fused
from zerotrain.optim._fused import compile_available, compile_seconds
from zerotrain.optim._rules import (
    FOREACH,
    PER_TENSOR,
    adamax_moments,
    adamax_step_size,
    advance_mu_product,
    nadam_denominator,
    nadam_moments,
    nadam_momentum,
    nadam_step_sizes,
)

__all__ = [
    "adamax",
    "adamax_step",
    "adamax_step_size",
    "advance_mu_product",
    "compile_available",
    "compile_seconds",
    "nadam",
    "nadam_momentum",
    "nadam_step",
    "nadam_step_sizes",
]

Scalar = float | Tensor
# ------------------------------------------------------------------ Adamax


def adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: Sequence[Any],
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool = False,
    capturable: bool = False,
    compile: bool = False,
) -> None:
    """Adamax (Kingma & Ba 2015, section 7.1) on lists of tensors, in place.

    Args:
        params: parameters, updated in place; ``grads`` are never modified.
        grads, exp_avgs, exp_infs: the gradient, first moment ``m`` and
            infinity norm ``u`` of each parameter (same shapes and dtypes).
        steps: each tensor's step number after incrementing (1 on the first
            update); with ``capturable``, torch's 0-dim step tensors on the
            device, incremented here (nothing is read back to the host).
        lr, beta1, beta2, eps, weight_decay, maximize: as in ``torch.optim.Adamax``.
        foreach: torch's multi-tensor path (``torch._foreach_*`` kernels).
        capturable: torch's CUDA-graph-capturable arithmetic.
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
    static = {"maximize": maximize, "weight_decay_on": weight_decay != 0,
              "small_lerp_weight": abs(1 - beta1) < 0.5}  # fmt: skip
    if capturable:
        for p, g, m, u, step_t in zip(*tensors, steps, strict=True):
            step_t += 1
            adamax_moments(PER_TENSOR, p, g, m, u, **options)
            # -(1 - beta1**t) / lr, so that addcdiv needs no host-side value (torch #121238).
            neg_bias_correction = (beta1**step_t - 1).div_(lr)
            p.addcdiv_(m, u * neg_bias_correction)
    elif compile and _fused.usable(params):
        for p, g, m, u, step in zip(*tensors, steps, strict=True):
            scalars = _scalar_tensor(p, [adamax_step_size(lr, beta1, step), 1 - beta1, beta2,
                                         eps, weight_decay])  # fmt: skip
            kernel = _fused.kernel("adamax", _fused.adamax_fused, (p, scalars), **static)
            if kernel is not None and p.numel() > 1:  # sizes 0, 1 would specialise the kernel
                kernel(p, g, m, u, scalars)
            else:
                adamax([p], [g], [m], [u], [step], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, maximize=maximize)  # fmt: skip
    elif foreach:
        for (p, g, m, u), group_steps in _by_device_and_dtype(tensors, steps):
            adamax_moments(FOREACH, p, g, m, u, **options)
            step_sizes = [adamax_step_size(_host(lr), beta1, s) for s in group_steps]
            torch._foreach_addcdiv_(p, m, u, step_sizes)  # type: ignore[arg-type]
    else:
        for *tensor, step in zip(*tensors, steps, strict=True):
            step_size = adamax_step_size(lr, beta1, step)
            for p, g, m, u in _cache_sized_chunks(*tensor):
                adamax_moments(PER_TENSOR, p, g, m, u, **options)
                p.addcdiv_(m, u, value=step_size)  # type: ignore[arg-type]  # tensor lr: as torch


# ------------------------------------------------------------------- Nadam


def nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: Sequence[Any],
    steps: Sequence[Any],
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
    capturable: bool = False,
    compile: bool = False,
) -> None:
    """Nadam (Dozat 2016) with torch's momentum schedule, on lists of tensors, in place.

    Args:
        params: parameters, updated in place; ``grads`` are never modified.
        grads, exp_avgs, exp_avg_sqs: the gradient, first moment ``m`` and
            second moment ``v`` of each parameter (same shapes and dtypes).
        mu_products: each tensor's ``mu_1 * ... * mu_t`` *including* this step's
            ``mu_t`` (the caller carries it as state: see ``advance_mu_product``);
            with ``capturable``, torch's 0-dim state tensors *before* this step,
            advanced here on the device.
        steps: as for ``adamax``.
        lr, beta1, beta2, eps, weight_decay, momentum_decay, decoupled_weight_decay,
            maximize: as in ``torch.optim.NAdam``.
        foreach, capturable, compile: as for ``adamax``.

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
        raise ValueError(f"nadam: got {len(mu_products)} mu_products for {len(params)} parameters")
    lr = _scalar_lr(lr)
    decoupled = weight_decay != 0 and decoupled_weight_decay
    l2 = weight_decay != 0 and not decoupled_weight_decay
    options = {"lerp_weight": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2,
               "weight_decay": weight_decay if l2 else None,
               "decay": 1 - lr * weight_decay if decoupled else None, "maximize": maximize}  # fmt: skip
    static = {"maximize": maximize, "decoupled": decoupled, "l2": l2,
              "small_lerp_weight": abs(1 - beta1) < 0.5}  # fmt: skip

    def step_sizes(step: Any, mu_product: Any, lr: Scalar = lr) -> tuple[Any, Any]:
        mu, mu_next = (nadam_momentum(beta1, momentum_decay, t) for t in (step, step + 1))
        return nadam_step_sizes(lr, mu, mu_next, mu_product)

    if capturable:
        for p, g, m, v, mu_product, step_t in zip(*tensors, mu_products, steps, strict=True):
            step_t += 1
            g = nadam_moments(PER_TENSOR, p, g, m, v, **options)
            mu_product *= nadam_momentum(beta1, momentum_decay, step_t)
            denom = nadam_denominator(PER_TENSOR, v, 1 - beta2**step_t, eps)
            grad_size, exp_avg_size = step_sizes(step_t, mu_product)
            p.addcdiv_(g * grad_size, denom)
            p.addcdiv_(m * exp_avg_size, denom)
    elif compile and _fused.usable(params):
        for p, g, m, v, mu_product, step in zip(*tensors, mu_products, steps, strict=True):
            scalars = _scalar_tensor(p, [*step_sizes(step, mu_product), 1 - lr * weight_decay,
                                         1 - beta2**step, 1 - beta1, beta2, 1 - beta2, eps,
                                         weight_decay])  # fmt: skip
            kernel = _fused.kernel("nadam", _fused.nadam_fused, (p, scalars), **static)
            if kernel is not None and p.numel() > 1:  # sizes 0, 1 would specialise the kernel
                kernel(p, g, m, v, scalars)
            else:
                nadam([p], [g], [m], [v], [mu_product], [step], lr=lr, beta1=beta1, beta2=beta2,
                      eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)  # fmt: skip
    elif foreach:
        for (p, g, m, v), group_steps, products in _by_device_and_dtype(tensors, steps, mu_products):
            g = nadam_moments(FOREACH, p, g, m, v, **options)
            # torch's multi-tensor denominator: sqrt(v) / sqrt(1 - beta2**t) + eps.
            denoms = torch._foreach_sqrt(v)
            torch._foreach_div_(denoms, [(1 - beta2**s) ** 0.5 for s in group_steps])
            torch._foreach_add_(denoms, eps)
            sizes = [step_sizes(s, mp, _host(lr)) for s, mp in zip(group_steps, products)]
            # The Nesterov step: the current gradient's share, then the momentum's.
            torch._foreach_addcdiv_(p, g, denoms, [float(size[0]) for size in sizes])
            torch._foreach_addcdiv_(p, m, denoms, [float(size[1]) for size in sizes])
    else:
        for *tensor, mu_product, step in zip(*tensors, mu_products, steps, strict=True):
            grad_size, exp_avg_size = step_sizes(step, mu_product)
            for p, g, m, v in _cache_sized_chunks(*tensor):
                g = nadam_moments(PER_TENSOR, p, g, m, v, **options)
                denom = nadam_denominator(PER_TENSOR, v, 1 - beta2**step, eps)
                # The Nesterov step: the current gradient's share, then the momentum's.
                p.addcdiv_(g, denom, value=grad_size)
                p.addcdiv_(m, denom, value=exp_avg_size)


# ------------------------------------------------- one tensor (tests, benches)


def adamax_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_inf: Tensor, *,
                step: float, compile: bool = False, **options: Any) -> None:  # fmt: skip
    """``adamax`` on one tensor (``options``: ``lr``, ``beta1``, ``beta2``, ``eps``,
    ``weight_decay``, ``maximize``)."""
    _check_same_layout("adamax_step", param, grad=grad, exp_avg=exp_avg, exp_inf=exp_inf)
    adamax([param], [grad], [exp_avg], [exp_inf], [step], compile=compile, **options)


def nadam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               mu_product: Tensor, *, step: float, compile: bool = False,
               **options: Any) -> None:  # fmt: skip
    """``nadam`` on one tensor; ``mu_product`` is torch's 0-dim state, advanced in place
    (``options``: as ``nadam``'s hyperparameters)."""
    if mu_product.dim() != 0:
        raise ValueError(
            f"nadam_step: mu_product must be a 0-dim tensor, got shape {tuple(mu_product.shape)}"
        )
    _check_same_layout("nadam_step", param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    mu_product *= nadam_momentum(options["beta1"], options["momentum_decay"], step)
    nadam([param], [grad], [exp_avg], [exp_avg_sq], [mu_product.item()], [step],
          compile=compile, **options)  # fmt: skip


# ----------------------------------------------------------------- helpers

# Elements per piece of the eager CPU step: the operands and temporaries of one
# piece (~7 x 256 KiB in fp32) stay in L2 across the step's ~8 passes. Measured on
# the development machine (bench/optim_step.py): a tensor of 8M elements steps 2.3x
# faster in pieces, one of 2-4M the same, one of 1M (a typical weight) slower.
_EAGER_CHUNK = 1 << 16
_CHUNK_FROM = 1 << 22


def _cache_sized_chunks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Huge contiguous CPU buffers (a sharded optimizer's flat shard) in cache-sized
    pieces; anything else whole.

    Every operation of the step is elementwise, so piecewise evaluation gives the
    same bits; it keeps the eager multi-pass step of a huge buffer in cache (and
    its temporaries small).
    """
    first = tensors[0]
    if (first.device.type != "cpu" or first.numel() < _CHUNK_FROM
            or not all(t.is_contiguous() for t in tensors)):  # fmt: skip
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, first.numel(), _EAGER_CHUNK):
        yield tuple(f[start : start + _EAGER_CHUNK] for f in flat)


def _by_device_and_dtype(
    tensors: tuple[list[Tensor], ...], *per_tensor: Sequence[Any]
) -> Iterator[tuple[Any, ...]]:
    """torch's grouping for the foreach path, with each group's per-tensor numbers."""
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        list(tensors), with_indices=True  # type: ignore[arg-type]
    )
    for lists, indices in grouped.values():
        yield (lists, *([values[i] for i in indices] for values in per_tensor))


def _prepare(fn: str, params: list[Tensor], *others: list[Tensor],
             steps: Sequence[Any]) -> tuple[list[Tensor], ...]:  # fmt: skip
    """Check that the lists line up; complex tensors become real views, as in torch.optim."""
    names = ("grads", "exp_avgs", "exp_infs" if fn == "adamax" else "exp_avg_sqs", "steps")
    for name, values in zip(names, (*others, steps)):
        if len(values) != len(params):
            raise ValueError(f"{fn}: got {len(values)} {name} for {len(params)} parameters")
    for i, p in enumerate(params):
        _check_same_layout(fn, p, **{f"{name}[{i}]": t[i] for name, t in zip(names, others)})
    lists = (list(params), *(list(t) for t in others))
    for values in lists:
        for i, t in enumerate(values):
            if torch.is_complex(t):
                values[i] = torch.view_as_real(t)
    return lists


def _check_same_layout(fn: str, param: Tensor, **others: Tensor) -> None:
    for name, tensor in others.items():
        if tensor.shape != param.shape:
            raise ValueError(f"{fn}: {name} must have the shape of param "
                             f"{tuple(param.shape)}, got {tuple(tensor.shape)}")  # fmt: skip
        if tensor.dtype != param.dtype:
            raise ValueError(f"{fn}: {name} must have the dtype of param ({param.dtype}), "
                             f"got {tensor.dtype}")  # fmt: skip


def _scalar_tensor(param: Tensor, values: list[Scalar]) -> Tensor:
    # In param's dtype: eager casts its python-scalar operands the same way.
    floats = [v.item() if isinstance(v, Tensor) else float(v) for v in values]
    return torch.tensor(floats, dtype=param.dtype).to(param.device, non_blocking=True)


def _scalar_lr(lr: Scalar) -> Scalar:
    # A 1-element tensor lr (as a param group may hold) becomes 0-dim, as torch does.
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}")
        return lr.reshape(())
    return lr


def _host(value: Scalar) -> float:
    return value.item() if isinstance(value, Tensor) else value
