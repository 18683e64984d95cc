"""Building the fused optimizer kernels with ``torch.compile``, and trusting them.

``zerotrain.optim.functional`` writes each update rule once against a few tensor
operations; ``FUSED_OPS`` are those operations as ``torch.compile`` should see
them (pure expressions, in place by copy, a fused multiply-add exactly where
ATen's vectorised CPU kernels use one), so the rule traces into one kernel.
``kernel`` compiles a rule once per process with dynamic shapes and checks it
against the same rule run eagerly before its first use on a dtype and device:
a toolchain that builds a wrong kernel (a stale inductor cache shared across
CPUs was seen to) is reported and never used.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from zerotrain.optim._rules import adamax_moments, nadam_denominator, nadam_moments

__all__ = [
    "FUSED_OPS",
    "adamax_fused",
    "compile_available",
    "compile_seconds",
    "kernel",
    "nadam_fused",
    "usable",
]

_log = logging.getLogger("zerotrain.optim.functional")


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a * b + c`` rounded once, as ATen's vectorised CPU kernels evaluate it."""
    return torch.ops.prims.fma(a, b, c)


def _fused_ops(small_lerp_weight: bool) -> SimpleNamespace:
    def lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
        # ATen's two formulas (aten/src/ATen/native/Lerp.h), in their vectorised form.
        if small_lerp_weight:
            return _fma(weight, end - start, start)
        return _fma(weight - 1, end - start, end)

    return SimpleNamespace(
        neg=torch.neg, abs=torch.abs, sqrt=torch.sqrt, div=torch.div,
        add=lambda x, y, alpha: _fma(y, alpha, x),
        add_=lambda x, s: x.copy_(x + s),
        mul_=lambda x, s: x.copy_(x * s),
        lerp_=lambda x, y, w: x.copy_(lerp(x, y, w)),
        maximum_=lambda x, y: x.copy_(torch.maximum(x, y)),
        addcmul_=lambda x, a, b, value: x.copy_(_fma(value * a, b, x)),
        addcdiv_=lambda x, a, b, value: x.copy_(x + value * a / b),
    )  # fmt: skip


FUSED_OPS = {small: _fused_ops(small) for small in (True, False)}
"""The rules' operations for tracing, by ATen's choice of lerp formula (|weight| < 0.5)."""


def adamax_fused(
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
    ops = FUSED_OPS[small_lerp_weight]
    adamax_moments(ops, param, grad, exp_avg, exp_inf, lerp_weight=lerp_weight, beta2=beta2,
                    eps=eps, weight_decay=weight_decay if weight_decay_on else None,
                    maximize=maximize)  # fmt: skip
    ops.addcdiv_(param, exp_avg, exp_inf, step_size)


def nadam_fused(
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
    ops = FUSED_OPS[small_lerp_weight]
    g = nadam_moments(ops, param, grad, exp_avg, exp_avg_sq, lerp_weight=lerp_weight,
                       beta2=beta2, one_minus_beta2=one_minus_beta2,
                       weight_decay=weight_decay if l2 else None,
                       decay=decay if decoupled else None, maximize=maximize)  # fmt: skip
    denom = nadam_denominator(ops, exp_avg_sq, bias_correction2, eps)
    ops.addcdiv_(param, g, denom, grad_size)
    ops.addcdiv_(param, exp_avg, denom, exp_avg_size)


def compile_available() -> bool:
    """True when ``torch.compile`` can build the fused kernels here."""
    return _probe()


def compile_seconds() -> float:
    """Seconds this process has spent building and checking fused kernels (monotonic)."""
    return _clock.total


def usable(params: list[Tensor]) -> bool:
    """Whether the fused path may run: no autograd through the step, a working compiler."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return False
    return _probe()


def kernel(name: str, fn: Callable[..., None], sample: tuple[Tensor, Tensor],
           **static: bool) -> Callable[..., None] | None:  # fmt: skip
    """``fn`` compiled for these static options, or None where it must not be used.

    ``sample`` is ``(a tensor like the operands, the scalars of a real call)``:
    the first use on each dtype and device runs the compiled and the eager
    ``fn`` on the same random data with those scalars and compares them.
    """
    key = (name, *sorted(static.items()))
    with _lock:
        compiled = _kernels.get(key)
        if compiled is None:
            from torch._inductor import inductor_prims  # noqa: F401  (registers prims.fma)

            compiled = torch.compile(functools.partial(fn, **static), fullgraph=True, dynamic=True)
            _kernels[key] = compiled
        like, scalars = sample
        where = (key, like.dtype, like.device)
        if where not in _trusted:
            start = time.perf_counter()
            _trusted[where] = _agrees(name, compiled, functools.partial(fn, **static), like, scalars)
            _clock.total += time.perf_counter() - start
    return compiled if _trusted[where] else None


class _Clock:
    total = 0.0


_clock = _Clock()
_lock = threading.Lock()
_kernels: dict[tuple[Any, ...], Callable[..., None]] = {}
_trusted: dict[tuple[Any, ...], bool] = {}


@functools.cache
def _probe() -> bool:
    try:
        probe = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
        return bool(torch.equal(probe(torch.ones(4)), torch.full((4,), 3.0)))
    except Exception as exc:  # compiler missing or broken: fall back to eager
        _log.warning("torch.compile unavailable (%s); fused optimizer kernels run eagerly", exc)
        return False


def _agrees(name: str, compiled: Callable[..., None], eager: Callable[..., None],
            like: Tensor, scalars: Tensor) -> bool:  # fmt: skip
    results = []
    for run in (compiled, eager):
        gen = torch.Generator().manual_seed(0)
        tensors = [torch.randn(4099, generator=gen, dtype=torch.float64) for _ in range(4)]
        tensors[3] = tensors[3].abs() + 0.5  # a second moment / infinity norm is positive
        tensors = [t.to(dtype=like.dtype, device=like.device) for t in tensors]
        run(*tensors, scalars)
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
