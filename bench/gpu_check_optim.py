"""The ``parity`` and ``timing`` sections of ``bench/gpu_check.py``, on any device.

``parity``: the drop-in optimizers, ``ZeroOptimizer`` (one process; fp32, and
bf16 over an fp32 master) and its fused step against ``torch.optim`` on the
same gradients. ``timing``: one optimizer step per way of running it on a
GPT-like parameter list, against the copy floor.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from gpu_check_group import ALGORITHMS, Row, guard, make_mlp, mlp_loss, rel_error
from optim_step import BYTES_PER_PARAM, gpt_like_shapes

from zerotrain import optim
from zerotrain.optim import functional

__all__ = ["check_parity", "check_timing"]

FUSED = "ours flat fused (compile=True)"


# ------------------------------------------------------------------- parity


def check_parity(device: torch.device, steps: int) -> list[Row]:
    """Drop-ins, ZeroOptimizer (fp32, bf16 + fp32 master) and the fused step vs torch.optim."""
    rows = []
    zero = optim.ZeroOptimizer
    for algorithm, (ours_cls, torch_cls, options) in ALGORITHMS.items():
        for mode, extra in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                            ("capturable", {"foreach": False, "capturable": True})):  # fmt: skip
            name = f"{algorithm} drop-in {mode} vs torch.optim"
            if mode == "capturable" and device.type != "cuda":
                rows.append({"check": name, "ok": None, "detail": "skipped: capturable needs CUDA"})
                continue
            kwargs = {**options, **extra}
            rows.append(guard(name, _compare, name, device, steps, 0.0,
                              (ours_cls, kwargs), (torch_cls, kwargs)))  # fmt: skip
        ours = (zero, {"optimizer_class": ours_cls, **options})
        name = f"{algorithm} ZeroOptimizer fp32 vs torch.optim"
        rows.append(guard(name, _compare, name, device, steps, 1e-6, ours, (torch_cls, options)))
        name = f"{algorithm} ZeroOptimizer bf16 + fp32 master vs fp32 torch.optim"
        rows.append(guard(name, _compare, name, device, steps, 2**-7, ours, (torch_cls, options),
                          dtype=torch.bfloat16))  # fmt: skip
        name = f"{algorithm} ZeroOptimizer fused (compile=True) vs eager"
        rows.append(guard(name, _compare_fused, name, device, steps, algorithm))
    return rows


def _train_on_ref_grads(ref: torch.nn.Sequential, ref_opt: torch.optim.Optimizer,
                        others: list[tuple[torch.nn.Module, torch.optim.Optimizer]], steps: int,
                        round_to: torch.dtype = torch.float32) -> None:  # fmt: skip
    """Step every optimizer on the reference model's gradient (cast to each model's dtype).

    ``round_to`` bf16: the reference steps on the gradient rounded as the others get it.
    """
    for step in range(steps):
        ref_opt.zero_grad()
        mlp_loss(ref, step).backward()
        if round_to != torch.float32:
            for q in ref.parameters():
                q.grad.copy_(q.grad.to(round_to))
        for model, opt in others:
            opt.zero_grad()
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                p.grad = q.grad.to(p.dtype, copy=True)
            opt.step()
        ref_opt.step()
    if ref_opt.param_groups[0]["params"][0].is_cuda:
        torch.cuda.synchronize()


def _compare(name: str, device: torch.device, steps: int, tolerance: float,
             ours: tuple[type, dict[str, Any]], ref: tuple[type, dict[str, Any]],
             dtype: torch.dtype = torch.float32) -> Row:  # fmt: skip
    """Two optimizers (class, options) on the same gradients; ok within ``tolerance`` (0: bitwise).

    With bf16 parameters ``ours`` keeps an fp32 master: the fp32 reference
    starts from the same rounded values and steps on the same rounded
    gradients, and ours must then equal its parameters rounded to bf16 (1 ulp).
    """
    model, ref_model = make_mlp(device, dtype), make_mlp(device)
    if dtype != torch.float32:
        with torch.no_grad():
            for q in ref_model.parameters():
                q.copy_(q.to(dtype))  # the rounded start ours has
    opt, ref_opt = ours[0](_groups(model), **ours[1]), ref[0](_groups(ref_model), **ref[1])
    _train_on_ref_grads(ref_model, ref_opt, [(model, opt)], steps, round_to=dtype)
    if isinstance(opt, optim.ZeroOptimizer):
        opt.close()
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    error, bitwise = rel_error(params, ref_params)
    row = {"check": name, "max_rel_err": error, "bitwise": bitwise, "steps": steps}
    if dtype == torch.float32:
        expect = "bitwise" if tolerance == 0 else f"<= {tolerance:g}"
        return row | {"ok": bitwise if tolerance == 0 else error <= tolerance,
                      "detail": f"max rel err {error:.2e}{' (bitwise)' if bitwise else ''}, "
                                f"expected {expect}"}  # fmt: skip
    rounded = [q.detach().to(dtype) for q in ref_params]
    _, same = rel_error(params, rounded)
    within = all(torch.allclose(p.float(), r.float(), rtol=tolerance, atol=1e-30)
                 for p, r in zip(params, rounded, strict=True))  # fmt: skip
    return row | {"ok": within, "bitwise_after_rounding": same,
                  "detail": f"{'equal to' if same else 'within 1 ulp of' if within else 'NOT within 1 ulp of'}"
                            f" fp32 torch.optim rounded to {str(dtype)[6:]}; max rel err {error:.2e} "
                            "vs its fp32 params"}  # fmt: skip


def _compare_fused(name: str, device: torch.device, steps: int, algorithm: str) -> Row:
    """ZeroOptimizer(compile=True) against compile=False and torch.optim, on the same gradients."""
    ours_cls, torch_cls, options = ALGORITHMS[algorithm]
    fused_model, eager_model, ref_model = (make_mlp(device) for _ in range(3))
    fused = optim.ZeroOptimizer(_groups(fused_model), ours_cls, compile=True, **options)
    eager = optim.ZeroOptimizer(_groups(eager_model), ours_cls, **options)
    ref_opt = torch_cls(_groups(ref_model), **options)
    before = functional.compile_seconds()
    with _logged("zerotrain.optim.functional") as problems:
        _train_on_ref_grads(ref_model, ref_opt, [(fused_model, fused), (eager_model, eager)], steps)
    compile_s = functional.compile_seconds() - before
    error, bitwise = rel_error(list(fused_model.parameters()), list(eager_model.parameters()))
    vs_torch, _ = rel_error(list(fused_model.parameters()), list(ref_model.parameters()))
    fused.close()
    eager.close()
    fallback = _fallback_reasons(problems)
    detail = (f"max rel err {error:.2e}{' (bitwise)' if bitwise else ''} vs eager (<= 1e-5), "
              f"{vs_torch:.2e} vs torch; built and checked in {compile_s:.1f} s")  # fmt: skip
    if fallback:
        detail = "the fused kernel was NOT used, the eager step ran: " + "; ".join(fallback)
    return {"check": name, "ok": not fallback and error <= 1e-5, "max_rel_err": error,
            "max_rel_err_vs_torch": vs_torch, "compile_s": compile_s, "detail": detail}  # fmt: skip


def _fallback_reasons(logged: list[str]) -> list[str]:
    """Why fused steps ran eagerly: what zerotrain.optim.functional logged, or no torch.compile here."""
    return logged + ([] if functional.compile_available() else ["torch.compile unavailable"])


def _groups(model: torch.nn.Sequential) -> list[dict[str, Any]]:
    """Two param groups: the first layer at half the learning rate."""
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return [{"params": first, "lr": 5e-3}, {"params": rest}]


@contextlib.contextmanager
def _logged(logger_name: str) -> Iterator[list[str]]:
    """Messages of WARNING and above that ``logger_name`` logs in the block."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------- timing


class _Variant:
    """One way of running the step: ``run()`` does one step; times in ms."""

    def __init__(self, name: str, run: Callable[[], Any]) -> None:
        self.name, self.run = name, run
        self.times_ms: list[float] = []
        self.error: str | None = None


def check_timing(device: torch.device, quick: bool, repeats: int, warmup: int) -> list[Row]:
    """ms, GB/s and x floor per variant of one step, for each algorithm."""
    shapes = gpt_like_shapes(layers=2, d=128, vocab=1024, context=128) if quick else gpt_like_shapes()
    rows = []
    for algorithm in ALGORITHMS:
        found = guard(f"{algorithm} timing", _time_algorithm, algorithm, shapes, device, repeats, warmup)
        rows += found if isinstance(found, list) else [found]
    return rows


def _time_algorithm(algorithm: str, shapes: list[tuple[int, ...]], device: torch.device,
                    repeats: int, warmup: int) -> list[Row]:  # fmt: skip
    numel = sum(torch.Size(s).numel() for s in shapes)
    variants, skipped = _timing_variants(algorithm, shapes, device)
    with _logged("zerotrain.optim.functional") as logged:
        _measure(variants, device, warmup, repeats)
    fallback = _fallback_reasons(logged)
    prefix = f"{algorithm} {len(shapes)} tensors {numel / 1e6:.1f}M"
    ms = {v.name: statistics.median(v.times_ms) for v in variants if v.error is None}
    floor = ms.get(variants[0].name, float("nan"))
    rows: list[Row] = []
    for v in variants:
        if v.error is not None:
            rows.append({"check": f"{prefix}: {v.name}", "ok": False, "detail": v.error})
            continue
        eager_instead = v.name == FUSED and bool(fallback)
        gbs = BYTES_PER_PARAM * numel / ms[v.name] / 1e6
        rows.append({"check": f"{prefix}: {v.name}", "ok": False if eager_instead else None,
                     "ms_median": ms[v.name], "ms_min": min(v.times_ms), "gb_per_s": gbs,
                     "x_floor": ms[v.name] / floor, "params": numel, "tensors": len(shapes),
                     "detail": f"{ms[v.name]:8.3f} ms {gbs:7.1f} GB/s {ms[v.name] / floor:6.2f}x floor"
                               + (f"; EAGER FALLBACK: {fallback[0]}" if eager_instead else "")})  # fmt: skip
    rows += [{"check": f"{prefix}: {name}", "ok": None, "detail": why} for name, why in skipped]
    best = min(((t, n) for n, t in ms.items() if n.startswith("torch")), default=None)
    if FUSED in ms and best is not None:
        rows.append({"check": f"{prefix}: ours fused vs torch's best", "ok": None,
                     "detail": f"{best[0] / ms[FUSED]:.2f}x the speed of {best[1]}; "
                               f"{ms[FUSED] / floor:.2f}x floor (target <= 1.2x)"})  # fmt: skip
    return rows


def _timing_variants(algorithm: str, shapes: list[tuple[int, ...]],
                     device: torch.device) -> tuple[list[_Variant], list[tuple[str, str]]]:  # fmt: skip
    """The variants to time (the copy floor first) and those skipped, with why."""
    ours_cls, torch_cls, options = ALGORITHMS[algorithm]
    numel = sum(torch.Size(s).numel() for s in shapes)

    def params() -> list[torch.nn.Parameter]:
        out = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        for p in out:
            p.grad = torch.randn_like(p)
        return out

    # The floor: a copy moving 28 B/param, 14 read and 14 written.
    src, dst = (torch.randn(BYTES_PER_PARAM * numel // 8, device=device) for _ in range(2))
    variants = [_Variant("copy floor (28 B/param)", lambda: dst.copy_(src)),
                _Variant("torch foreach", torch_cls(params(), foreach=True, **options).step)]  # fmt: skip
    skipped = []
    if "fused" in inspect.signature(torch_cls).parameters:
        variants.append(_Variant("torch fused", torch_cls(params(), fused=True, **options).step))
    else:
        skipped.append(("torch fused", f"skipped: torch {torch.__version__}'s "
                        f"torch.optim.{torch_cls.__name__} has no fused=True"))  # fmt: skip
    compiled_opt = torch_cls(params(), foreach=True, **options)
    variants += [
        _Variant("torch foreach, torch.compile'd", torch.compile(compiled_opt.step, fullgraph=False)),
        _Variant("ours drop-in foreach", ours_cls(params(), foreach=True, **options).step),
        _Variant("ours flat eager", _flat_step(algorithm, numel, device, compile=False)),
        _Variant(FUSED, _flat_step(algorithm, numel, device, compile=True)),
    ]
    return variants, skipped


def _flat_step(algorithm: str, numel: int, device: torch.device, compile: bool) -> Callable[[], None]:
    """One step of ``zerotrain.optim.functional`` on one flat buffer, as ZeroOptimizer runs its shard."""
    p, g = torch.randn(numel, device=device), torch.randn(numel, device=device)
    m, u = torch.zeros_like(p), torch.zeros_like(p)
    mu_product = torch.tensor(1.0)  # on the host, as ZeroOptimizer keeps it: no device read
    options = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "maximize": False,
               "weight_decay": 0.0, **ALGORITHMS[algorithm][2]}  # fmt: skip
    step = [0]

    def run() -> None:
        step[0] += 1
        if algorithm == "adamax":
            functional.adamax_step(p, g, m, u, step=step[0], compile=compile, **options)
        else:
            functional.nadam_step(p, g, m, u, mu_product, step=step[0], compile=compile,
                                  momentum_decay=4e-3, **options)  # fmt: skip

    return run


def _measure(variants: list[_Variant], device: torch.device, warmup: int, repeats: int) -> None:
    """Warm up, then time the variants round by round (CUDA events on CUDA); keep every time."""
    cuda = device.type == "cuda"
    for v in variants:
        try:
            for _ in range(warmup):
                v.run()
        except Exception as exc:
            v.error = f"{type(exc).__name__}: {exc}"
    live = [v for v in variants if v.error is None]
    events: dict[str, list[tuple[Any, Any]]] = {v.name: [] for v in live}
    for _ in range(repeats):
        for v in live:
            if cuda:
                torch.cuda.synchronize()  # each step starts on an idle device: launches count
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                v.run()
                end.record()
                events[v.name].append((start, end))
            else:
                t0 = time.perf_counter()
                v.run()
                v.times_ms.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        for v in live:
            v.times_ms = [start.elapsed_time(end) for start, end in events[v.name]]
