"""Optimizer step benchmark: our Adamax/Nadam against torch.optim and the memory floor.

Measures ms per optimizer step and effective bandwidth (28 bytes per float32
parameter: p, g, m, u read once and p, m, u written once, divided by the step
time) for

* torch.optim.Adamax / NAdam, for-loop (foreach=False), foreach=True, and its
  step compiled with ``torch.compile`` (PyTorch's recipe for a fused step);
* optim.Adamax / optim.Nadam (the drop-in classes), for-loop and foreach;
* the flat-buffer step (zerotrain.optim.functional on one contiguous buffer, as the
  sharded optimizer runs it), eager and compiled;
* ``ZeroOptimizer.step()`` in one process (defaults; ``compile=True``) on
  assigned gradients: its time includes copying them into the gradient buckets
  (8 more bytes per parameter), which a real backward does in its hooks instead;
* the floor: one plain tensor copy moving the same 28 bytes per parameter,

on (a) one 16M-element tensor and (b) the parameter list of a GPT-like model
(148 tensors, 10.6M parameters). Variants are interleaved round by round and the
median is reported, so a load change on a shared machine hits all of them alike.

    python bench/optim_step.py [--threads N] [--repeats R] [--device cpu|cuda]

Writes bench/results/optim_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from zerotrain import optim
from zerotrain.optim.functional import adamax_step, compile_available, nadam_step
from zerotrain.optim.zero import ZeroOptimizer

BYTES_PER_PARAM = 28  # float32: read p, g, m, u; write p, m, u
RESULTS = Path(__file__).resolve().parent / "results" / "optim_step.json"


def gpt_like_shapes(
    layers: int = 12, d: int = 256, vocab: int = 4096, context: int = 512
) -> list[tuple[int, ...]]:
    """Parameter shapes of a small GPT (nanoGPT layout): 148 tensors, 10.6M parameters."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln_1, attn
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln_2, mlp
    return [*shapes, (d,), (d,)]  # ln_f


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One way of running the step: ``run()`` performs one step, after ``prepare()``
    (untimed) puts the gradients in place."""

    def __init__(self, name: str, run: Callable[[], None],
                 prepare: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.name, self.run, self.times_ms = name, run, []
        self.prepare = prepare or (lambda: None)


def _params(shapes, device) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _torch_like(cls, shapes, device, foreach: bool) -> Callable[[], None]:
    opt = cls(_params(shapes, device), lr=1e-3, weight_decay=0.0, foreach=foreach)
    return opt.step


def _torch_compiled(cls, shapes, device) -> Callable[[], None]:
    """torch.optim's step under torch.compile, as PyTorch's tutorial compiles it."""
    opt = cls(_params(shapes, device), lr=1e-3, weight_decay=0.0, foreach=True)
    return torch.compile(opt.step, fullgraph=False)


def _zero(cls, shapes, device, compile: bool) -> Variant:
    """ZeroOptimizer.step() on gradients assigned before each step (step() consumes them)."""
    params = _params(shapes, device)
    grads = [p.grad for p in params]
    opt = ZeroOptimizer(params, cls, lr=1e-3, compile=compile)

    def prepare() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g

    name = "ZeroOptimizer compile=True" if compile else "ZeroOptimizer (defaults)"
    return Variant(name, opt.step, prepare)


def _flat(algorithm: str, numel: int, device, compile: bool) -> Callable[[], None]:
    p, g = torch.randn(numel, device=device), torch.randn(numel, device=device)
    m, u = torch.zeros_like(p), torch.zeros_like(p)
    mu_product = torch.tensor(1.0)  # on the host, as torch keeps it (no device read per step)
    step = [0]
    options = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}

    def run() -> None:
        step[0] += 1
        if algorithm == "adamax":
            adamax_step(p, g, m, u, step=step[0], maximize=False, compile=compile, **options)
        else:
            nadam_step(
                p, g, m, u, mu_product, step=step[0], momentum_decay=4e-3,
                decoupled_weight_decay=False, maximize=False, compile=compile, **options,
            )  # fmt: skip

    return run


def _copy_floor(numel: int, device) -> Callable[[], None]:
    # 28 bytes per parameter: read 14 and write 14 (3.5 float32 each way).
    half = BYTES_PER_PARAM * numel // 8
    src, dst = torch.randn(half, device=device), torch.empty(half, device=device)
    return lambda: dst.copy_(src)


def build_variants(algorithm: str, shapes, device, with_compile: bool) -> list[Variant]:
    ours_cls = optim.Adamax if algorithm == "adamax" else optim.Nadam
    torch_cls = torch.optim.Adamax if algorithm == "adamax" else torch.optim.NAdam
    numel = sum(torch.Size(s).numel() for s in shapes)
    variants = [
        Variant("copy floor (28 B/param)", _copy_floor(numel, device)),
        Variant("torch for-loop", _torch_like(torch_cls, shapes, device, foreach=False)),
        Variant("torch foreach", _torch_like(torch_cls, shapes, device, foreach=True)),
        Variant("ours drop-in for-loop", _torch_like(ours_cls, shapes, device, foreach=False)),
        Variant("ours drop-in foreach", _torch_like(ours_cls, shapes, device, foreach=True)),
        Variant("ours flat eager", _flat(algorithm, numel, device, compile=False)),
        _zero(ours_cls, shapes, device, compile=False),
    ]
    if with_compile:
        variants += [
            Variant("torch compiled step", _torch_compiled(torch_cls, shapes, device)),
            Variant("ours flat compiled", _flat(algorithm, numel, device, compile=True)),
            _zero(ours_cls, shapes, device, compile=True),
        ]
    return variants


def measure(variants: list[Variant], device, warmup: int, repeats: int) -> None:
    """Interleave the variants round by round; keep every timing."""
    for v in variants:
        for _ in range(warmup):
            v.prepare()
            v.run()
    _sync(device)
    for _ in range(repeats):
        for v in variants:
            v.prepare()
            _sync(device)
            start = time.perf_counter()
            v.run()
            _sync(device)
            v.times_ms.append((time.perf_counter() - start) * 1e3)


def _machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch intra-op threads"
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    with_compile = not args.no_compile and compile_available()
    cases = {"a: one 16M tensor": [(16 * 2**20,)], "b: GPT-like params": gpt_like_shapes()}

    rows = []
    load_before = _loadavg()
    for case, shapes in cases.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        for algorithm in ("adamax", "nadam"):
            variants = build_variants(algorithm, shapes, device, with_compile)
            measure(variants, device, args.warmup, args.repeats)
            floor_ms = statistics.median(variants[0].times_ms)
            for v in variants:
                ms = statistics.median(v.times_ms)
                rows.append({
                    "case": case, "tensors": len(shapes), "params": numel,
                    "optimizer": algorithm, "variant": v.name,
                    "ms_median": ms, "ms_min": min(v.times_ms),
                    "gb_per_s": BYTES_PER_PARAM * numel / ms / 1e6,
                    "x_floor": ms / floor_ms,
                })  # fmt: skip
            del variants

    targets = _targets(rows)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": str(device),
        "threads": args.threads,
        "repeats": args.repeats,
        "compiled": with_compile,
        "loadavg_1min": {"before": load_before, "after": _loadavg()},
        "machine": _machine(),
        "results": rows,
        "targets": targets,
    }
    _write_json(args.out, report)
    _print_table(report)
    return 0


def _targets(rows: list[dict]) -> dict:
    """Case (b): flat compiled step within 1.2x of the floor and faster than torch's best."""
    out = {}
    for algorithm in ("adamax", "nadam"):
        by_variant = {
            r["variant"]: r
            for r in rows
            if r["optimizer"] == algorithm and r["case"].startswith("b")
        }
        flat = by_variant.get("ours flat compiled") or by_variant["ours flat eager"]
        torch_best = min(
            by_variant[name]["ms_median"]
            for name in ("torch for-loop", "torch foreach", "torch compiled step")
            if name in by_variant
        )
        out[algorithm] = {
            "flat_variant": flat["variant"],
            "flat_x_floor": flat["x_floor"],
            "within_1.2x_floor": flat["x_floor"] <= 1.2,
            "speedup_vs_torch_best": torch_best / flat["ms_median"],
            "faster_than_torch_best": flat["ms_median"] < torch_best,
        }
    return out


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=2)
        tmp = Path(f.name)
    tmp.chmod(0o644)
    tmp.replace(path)  # atomic: a reader never sees half a file


def _print_table(report: dict) -> None:
    m = report["machine"]
    print(f"{m['cpu_model']} ({m['nproc']} CPUs), torch {m['torch']}, device {report['device']}, "
          f"threads {report['threads']}, {report['repeats']} rounds, "
          f"load {report['loadavg_1min']['before']:.1f} -> {report['loadavg_1min']['after']:.1f}")  # fmt: skip
    header = f"{'case':<22}{'opt':<8}{'variant':<30}{'ms (median)':>12}{'GB/s':>8}{'x floor':>9}"
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        print(
            f"{r['case']:<22}{r['optimizer']:<8}{r['variant']:<30}"
            f"{r['ms_median']:>12.2f}{r['gb_per_s']:>8.1f}{r['x_floor']:>9.2f}"
        )
    for algorithm, t in report["targets"].items():
        print(
            f"target (b) {algorithm}: {t['flat_variant']} = {t['flat_x_floor']:.2f}x floor "
            f"({'ok' if t['within_1.2x_floor'] else 'MISSED'} <= 1.2x), "
            f"{t['speedup_vs_torch_best']:.2f}x vs torch's best "
            f"({'ok' if t['faster_than_torch_best'] else 'MISSED'})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
