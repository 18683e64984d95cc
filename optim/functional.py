"""Pure Adamax / Nadam update steps over (flat) tensors.

Both functions update ``param`` and the optimizer state in place and never
modify ``grad``. They reproduce torch.optim's ``_single_tensor_adamax`` and
``_single_tensor_nadam`` operation by operation, so calling them on one flat
buffer that holds many parameters gives the same bits as torch gives per
parameter (every operation is elementwise).

``compile=True`` runs a fused kernel built with ``torch.compile`` instead: the
whole update in one pass over memory (read p, g, m, u once; write p, m, u once:
28 bytes per float32 element), meant for the sharded optimizer, which calls it
once on one contiguous shard. Every value that changes from step to step (the
learning rate, the bias corrections, Nadam's momentum cache) is computed on the
host exactly as in the eager path and handed to the kernel as one small tensor,
so stepping never recompiles. The kernel evaluates the same expressions in the
same order, with a fused multiply-add exactly where ATen's vectorised CPU
kernels use one (lerp, add with alpha, addcmul). On CPU the compiled Adamax is
bitwise equal to eager; the compiled Nadam differs only through ``sqrt``, which
eager CPU evaluates with a vectorised approximation (within 1 ulp) and the
compiled kernel rounds correctly, so the two agree to about 1 ulp. When
``torch.compile`` is unavailable the eager path runs instead.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = [
    "adamax_step",
    "adamax_step_capturable",
    "compile_available",
    "nadam_step",
    "nadam_step_capturable",
]

_log = logging.getLogger(__name__)


def adamax_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_inf: Tensor,
    *,
    step: int | float,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    compile: bool = False,
) -> None:
    """One Adamax update (Kingma & Ba 2015, section 7.1), in place.

    Args:
        param: parameters (any shape; typically one flat shard), updated in place.
        grad: gradient, same shape and dtype as ``param``; not modified.
        exp_avg: first moment ``m``, updated in place.
        exp_inf: exponentially weighted infinity norm ``u``, updated in place.
        step: the step number after incrementing (1 on the first update).
        lr: learning rate (float or 1-element tensor, as torch accepts).
        beta1, beta2, eps, weight_decay, maximize: as in ``torch.optim.Adamax``.
        compile: run the fused ``torch.compile`` kernel (opt-in).

    The update::

        g = -grad if maximize else grad;  g = g + weight_decay * p
        m = lerp(m, g, 1 - beta1)
        u = max(beta2 * u, |g| + eps)
        p = p - lr / (1 - beta1**step) * m / u
    """
    _check_same_layout("adamax_step", param, grad=grad, exp_avg=exp_avg, exp_inf=exp_inf)
    lr = _scalar_lr(lr)
    if torch.is_complex(param):
        param, grad, exp_avg, exp_inf = _view_as_real(param, grad, exp_avg, exp_inf)
    if compile and _fused_supported(param):
        clr = lr / (1 - beta1**step)
        scalars = _scalar_tensor(param, [-_to_float(clr), 1 - beta1, beta2, eps, weight_decay])
        kernel = _compiled("adamax", _adamax_fused)
        kernel(
            param, grad, exp_avg, exp_inf, scalars,
            maximize=maximize, weight_decay_on=weight_decay != 0,
            small_weight=_is_small_lerp_weight(1 - beta1),
        )  # fmt: skip
        return

    # Only the first moment is bias corrected.
    clr = lr / (1 - beta1**step)
    for chunk in _cache_sized_chunks(param, grad, exp_avg, exp_inf):
        _adamax_eager(*chunk, neg_clr=-clr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, maximize=maximize)  # fmt: skip


def _adamax_eager(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_inf: Tensor,
    *,
    neg_clr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    # torch's _single_tensor_adamax, operation by operation.
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    # Update biased first moment estimate.
    exp_avg.lerp_(grad, 1 - beta1)
    # Update the exponentially weighted infinity norm (eps inside the max).
    torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    param.addcdiv_(exp_avg, exp_inf, value=neg_clr)  # type: ignore[arg-type]  # tensor lr: as torch


def nadam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    mu_product: Tensor,
    *,
    step: int | float,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    compile: bool = False,
) -> None:
    """One Nadam update (Dozat 2016), in place, with torch's momentum schedule.

    Args:
        param: parameters (any shape; typically one flat shard), updated in place.
        grad: gradient, same shape and dtype as ``param``; not modified.
        exp_avg: first moment ``m``, updated in place.
        exp_avg_sq: second moment ``v``, updated in place.
        mu_product: 0-dim tensor, the product ``mu_1 * ... * mu_{step-1}`` on
            entry (1.0 before the first step); multiplied by ``mu_step`` in place,
            exactly as ``torch.optim.NAdam`` keeps its ``mu_product`` state.
        step: the step number after incrementing (1 on the first update).
        lr: learning rate (float or 1-element tensor, as torch accepts).
        beta1, beta2, eps, weight_decay, momentum_decay, decoupled_weight_decay,
            maximize: as in ``torch.optim.NAdam``.
        compile: run the fused ``torch.compile`` kernel (opt-in).

    The update, with ``mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay))``::

        g = -grad if maximize else grad
        p = p * (1 - lr * weight_decay)        if decoupled_weight_decay
        g = g + weight_decay * p               otherwise
        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        denom = sqrt(v / (1 - beta2**t)) + eps
        p = p - lr * (1 - mu_t) / (1 - prod_{i<=t} mu_i) * g / denom
              - lr * mu_{t+1} / (1 - prod_{i<=t+1} mu_i) * m / denom
    """
    _check_same_layout("nadam_step", param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    lr = _scalar_lr(lr)
    if torch.is_complex(param):
        param, grad, exp_avg, exp_avg_sq = _view_as_real(param, grad, exp_avg, exp_avg_sq)
    if mu_product.dim() != 0:
        raise ValueError(
            f"nadam_step: mu_product must be a 0-dim tensor, got shape {tuple(mu_product.shape)}"
        )
    bias_correction2 = 1 - beta2**step
    # The momentum cache mu_t and mu_{t+1}.
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    # In mu_product's own dtype, as torch's in-place product rounds it; stored
    # only once the update has run.
    new_mu_product = mu_product * mu
    mu_product_value = new_mu_product.item()
    mu_product_next = mu_product_value * mu_next
    grad_coeff = -lr * (1.0 - mu) / (1.0 - mu_product_value)
    exp_avg_coeff = (-lr * mu_next) / (1.0 - mu_product_next)
    decay = 1 - lr * weight_decay

    if compile and _fused_supported(param):
        scalars = _scalar_tensor(
            param,
            [
                _to_float(grad_coeff), _to_float(exp_avg_coeff), _to_float(decay),
                bias_correction2, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
            ],
        )  # fmt: skip
        kernel = _compiled("nadam", _nadam_fused)
        kernel(
            param, grad, exp_avg, exp_avg_sq, scalars,
            maximize=maximize,
            weight_decay_mode=_weight_decay_mode(weight_decay, decoupled_weight_decay),
            small_weight=_is_small_lerp_weight(1 - beta1),
        )  # fmt: skip
        mu_product.copy_(new_mu_product)
        return

    for chunk in _cache_sized_chunks(param, grad, exp_avg, exp_avg_sq):
        _nadam_eager(
            *chunk, grad_coeff=grad_coeff, exp_avg_coeff=exp_avg_coeff, decay=decay,
            bias_correction2=bias_correction2, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        )  # fmt: skip
    mu_product.copy_(new_mu_product)


def _nadam_eager(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    grad_coeff: float | Tensor,
    exp_avg_coeff: float | Tensor,
    decay: float | Tensor,
    bias_correction2: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    # torch's _single_tensor_nadam (non-capturable), operation by operation.
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            # Decoupled (AdamW-style) weight decay.
            param.mul_(decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    # Decay the first and second moment running averages.
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
    # The Nesterov step: the current gradient's share, then the momentum's.
    param.addcdiv_(grad, denom, value=grad_coeff)  # type: ignore[arg-type]
    param.addcdiv_(exp_avg, denom, value=exp_avg_coeff)  # type: ignore[arg-type]


def adamax_step_capturable(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_inf: Tensor,
    step_t: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """``adamax_step`` with the step count kept on the device (CUDA graph capture).

    ``step_t`` is the 0-dim step tensor on ``param``'s device, incremented in
    place; no value leaves the device. Follows ``torch.optim.Adamax``'s
    ``capturable=True`` arithmetic.
    """
    step_t += 1
    if torch.is_complex(param):
        param, grad, exp_avg, exp_inf = _view_as_real(param, grad, exp_avg, exp_inf)
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    # -(1 - beta1**t) / lr, so that addcdiv needs no host-side value (torch #121238).
    neg_bias_correction = beta1**step_t - 1
    neg_bias_correction.div_(lr)
    param.addcdiv_(exp_avg, exp_inf * neg_bias_correction)


def nadam_step_capturable(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    mu_product: Tensor,
    step_t: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """``nadam_step`` with the step count and ``mu_product`` kept on the device.

    ``step_t`` is incremented in place. Follows ``torch.optim.NAdam``'s
    ``capturable=True`` arithmetic.
    """
    step_t += 1
    if torch.is_complex(param):
        param, grad, exp_avg, exp_avg_sq = _view_as_real(param, grad, exp_avg, exp_avg_sq)
    if maximize:
        grad = -grad
    bias_correction2 = 1 - beta2**step_t
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step_t * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step_t + 1) * momentum_decay)))
    mu_product *= mu
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt().add(eps)
    mu_product_next = mu_product * mu_next
    param.addcdiv_(grad * (-lr * (1.0 - mu) / (1.0 - mu_product)), denom)
    param.addcdiv_(exp_avg * (-lr * mu_next / (1.0 - mu_product_next)), denom)


def compile_available() -> bool:
    """True when ``torch.compile`` can build the fused kernels here."""
    return _compile_probe()


# ---------------------------------------------------------------------------
# Fused kernels (compiled with torch.compile when asked for)
# ---------------------------------------------------------------------------


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a * b + c`` rounded once, as eager CPU kernels evaluate it when vectorised."""
    return torch.ops.prims.fma(a, b, c)


def _lerp(start: Tensor, end: Tensor, weight: Tensor, *, small_weight: bool) -> Tensor:
    # ATen's dual formula (aten/src/ATen/native/Lerp.h), in its vectorised form.
    if small_weight:
        return _fma(weight, end - start, start)
    return _fma(weight - 1, end - start, end)


def _adamax_fused(
    param: Tensor,  # (N,) float dtype; updated in place
    grad: Tensor,  # (N,)
    exp_avg: Tensor,  # (N,) updated in place
    exp_inf: Tensor,  # (N,) updated in place
    scalars: Tensor,  # (5,) [-lr/bc1, 1-beta1, beta2, eps, weight_decay], param dtype
    *,
    maximize: bool,
    weight_decay_on: bool,
    small_weight: bool,
) -> None:
    neg_clr, one_minus_beta1, beta2, eps, weight_decay = scalars.unbind()
    g = -grad if maximize else grad
    if weight_decay_on:
        g = _fma(param, weight_decay, g)
    m = _lerp(exp_avg, g, one_minus_beta1, small_weight=small_weight)
    u = torch.maximum(exp_inf * beta2, g.abs() + eps)
    param.copy_(param + (neg_clr * m) / u)
    exp_avg.copy_(m)
    exp_inf.copy_(u)


_DECAY_NONE, _DECAY_L2, _DECAY_DECOUPLED = 0, 1, 2


def _weight_decay_mode(weight_decay: float, decoupled: bool) -> int:
    if weight_decay == 0:
        return _DECAY_NONE
    return _DECAY_DECOUPLED if decoupled else _DECAY_L2


def _nadam_fused(
    param: Tensor,  # (N,) float dtype; updated in place
    grad: Tensor,  # (N,)
    exp_avg: Tensor,  # (N,) updated in place
    exp_avg_sq: Tensor,  # (N,) updated in place
    scalars: Tensor,  # (9,) see nadam_step, param dtype
    *,
    maximize: bool,
    weight_decay_mode: int,
    small_weight: bool,
) -> None:
    (
        grad_coeff, exp_avg_coeff, decay, bias_correction2,
        one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    ) = scalars.unbind()  # fmt: skip
    g = -grad if maximize else grad
    p = param
    if weight_decay_mode == _DECAY_DECOUPLED:
        p = p * decay
    elif weight_decay_mode == _DECAY_L2:
        g = _fma(p, weight_decay, g)
    m = _lerp(exp_avg, g, one_minus_beta1, small_weight=small_weight)
    v = _fma(one_minus_beta2 * g, g, exp_avg_sq * beta2)
    denom = torch.sqrt(v / bias_correction2) + eps
    p = p + (grad_coeff * g) / denom
    p = p + (exp_avg_coeff * m) / denom
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


_compiled_lock = threading.Lock()


@functools.cache
def _compile_probe() -> bool:
    try:
        probe = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
        return bool(torch.equal(probe(torch.ones(4)), torch.full((4,), 3.0)))
    except Exception as exc:  # compiler missing or broken: fall back to eager
        _log.warning("torch.compile unavailable (%s); fused optimizer kernels run eagerly", exc)
        return False


_compiled_kernels: dict[str, Callable[..., None]] = {}


def _compiled(name: str, fn: Callable[..., None]) -> Callable[..., None]:
    """The compiled ``fn``, built once per process (eager if compile is unavailable)."""
    kernel = _compiled_kernels.get(name)
    if kernel is None:
        with _compiled_lock:
            kernel = _compiled_kernels.get(name)
            if kernel is None:
                # Registers torch.ops.prims.fma, which the fused kernels use.
                from torch._inductor import inductor_prims  # noqa: F401

                kernel = torch.compile(fn, fullgraph=True)
                _compiled_kernels[name] = kernel
    return kernel


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


def _fused_supported(param: Tensor) -> bool:
    # Autograd-tracked tensors, or no working compiler: the eager path.
    if param.requires_grad and torch.is_grad_enabled():
        return False
    return _compile_probe()


def _is_small_lerp_weight(weight: float) -> bool:
    return abs(weight) < 0.5


def _view_as_real(*tensors: Tensor) -> tuple[Tensor, ...]:
    # Complex tensors update as pairs of reals, as torch.optim does.
    return tuple(torch.view_as_real(t) for t in tensors)


def _scalar_tensor(param: Tensor, values: list[float]) -> Tensor:
    # In param's dtype: eager casts its python-scalar operands the same way.
    return torch.tensor(values, dtype=param.dtype).to(param.device, non_blocking=True)


def _scalar_lr(lr: float | Tensor) -> float | Tensor:
    # A 1-element tensor lr (as a param group may hold) becomes 0-dim, as torch does.
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}"
            )
        return lr.reshape(())
    return lr


def _to_float(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)


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
