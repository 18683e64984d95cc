"""One sheet that shows a run: ``trainctl plot JOB_ID -o run.png``.

Panels, each drawn only when the job's records carry its data (a DeepSpeed job
has no update/param ratio or optimizer internals, a regression task no eval
loss): training and held-out loss; gradient norm; update/param ratio;
Adamax's refreshed-``u`` fraction or Nadam's mu_t and bias corrections;
throughput; optimizer-state bytes per rank. A restart (a new attempt) is a
dashed vertical line. When the store's cap dropped the oldest records, the
sheet says so.

Needs matplotlib (the ``plot`` extra: ``pip install 'zerotrain[plot]'``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from zerotrain.service.history import MetricsHistory

__all__ = ["PlotUnavailable", "plot_history"]

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True)
class _Series:
    label: str
    steps: list[int]
    values: list[float]


def plot_history(history: MetricsHistory, path: str | Path, *, dpi: int = 100) -> list[str]:
    """Draw ``history`` into the PNG file ``path``; return the titles of the panels drawn.

    Raises:
        PlotUnavailable: matplotlib is missing (install the ``plot`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'zerotrain[plot]' (make setup installs it)"
        ) from None

    records = _effective(history.records)
    panels = [p for p in _panels(history, records) if p[1]]
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.6 * columns, 2.7 * rows + 0.9), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    _title(figure, history, records[-1])
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    restarts = _restarts(records)
    for ax, (title, series, draw) in zip(axes, panels):
        draw(ax, series)
        ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
        _style(ax)
        if draw is not _bars:
            for step, attempt in restarts:
                ax.axvline(step, color="0.55", linestyle="--", linewidth=0.9)
                ax.annotate(f"attempt {attempt}", (step, 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -10), textcoords="offset points", fontsize=7, color="0.4")  # fmt: skip
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.savefig(path, format="png")
    return [title for title, _, _ in panels]


# ----------------------------------------------------------------------- records
def _effective(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the newest attempt's, in step order.

    A restarted attempt repeats the steps after its checkpoint; the records it
    replaces are not what the model went on from.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        by_step[int(record.get("step", 0))] = record
    return [by_step[step] for step in sorted(by_step)]


def _restarts(records: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(first step, attempt)`` of every attempt after the first one shown."""
    out = []
    for before, after in pairwise(records):
        if after.get("attempt", 0) > before.get("attempt", 0):
            out.append((int(after["step"]), int(after["attempt"])))
    return out


def _series(records: Sequence[dict[str, Any]], label: str, get: Callable[[dict], Any]) -> list:
    steps, values = [], []
    for record in records:
        value = get(record)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return [_Series(label, steps, values)] if values else []


def _top(key: str) -> Callable[[dict], Any]:
    return lambda record: record.get(key)


def _opt(key: str) -> Callable[[dict], Any]:
    return lambda record: (record.get("optimizer") or {}).get(key)


def _panels(history: MetricsHistory, records: list[dict[str, Any]]) -> list[tuple]:
    """``(title, data, draw)`` for every panel; panels without data have empty ``data``."""
    loss = [
        *_series(records, "training (window mean)", _top("loss")),
        *_series(records, "held-out", _top("eval_loss")),
    ]
    algorithm = str((history.spec.get("optimizer") or {}).get("algorithm", "")).lower()
    if algorithm == "adamax":
        title = "Adamax: fraction of u refreshed by |g|"
        internals = _series(records, "u refreshed", _opt("adamax_u_refreshed_fraction"))
    else:
        title = "Nadam: μ_t and bias corrections"
        internals = [
            *_series(records, "μ_t", _opt("nadam_mu_t")),
            *_series(records, "1 - Πμ (bias correction 1)", _opt("nadam_bias_correction1")),
            *_series(records, "1 - β₂ᵗ (bias correction 2)", _opt("nadam_bias_correction2")),
        ]
    ratio = _series(records, "‖Δθ‖ / ‖θ‖", _opt("update_param_ratio"))
    throughput = _series(records, "samples/s", _top("samples_per_second"))
    state_bytes = list(records[-1].get("state_bytes_per_rank") or [])
    return [
        ("loss", loss, _lines),
        ("gradient norm (before clipping)", _series(records, "‖g‖", _opt("grad_norm")), _lines),
        ("update / parameter norm", ratio, _lines),
        (title, internals, _fractions),
        ("throughput, samples/s (all workers)", throughput, _rates),
        (f"optimizer state per rank (step {records[-1]['step']})", state_bytes, _bars),
    ]


# ------------------------------------------------------------------------ drawing
def _lines(ax: Any, series: list[_Series]) -> None:
    """Values over steps; a log scale when they span more than a factor of 20."""
    for color, s in zip(_COLORS, series):
        ax.plot(s.steps, s.values, color=color, linewidth=1.6, label=s.label,
                marker="o" if len(s.values) < 30 else None, markersize=3)  # fmt: skip
    values = [v for s in series for v in s.values]
    if min(values) > 0 and max(values) / min(values) > 20:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        # Label 1, 2, 5 of every decade: decades alone leave a loss curve unreadable.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step", fontsize=8)
    if len(series) > 1:
        ax.legend(fontsize=7, frameon=False)


def _rates(ax: Any, series: list[_Series]) -> None:
    """A rate over steps, its axis from 0 (a busy machine's noise is not a trend)."""
    _lines(ax, series)
    if ax.get_yscale() == "linear":
        ax.set_ylim(bottom=0)


def _fractions(ax: Any, series: list[_Series]) -> None:
    """Values in [0, 1] over steps, on a fixed linear 0..1 axis."""
    _lines(ax, series)
    ax.set_yscale("linear")
    ax.set_ylim(-0.02, 1.05)
    if len(series) > 1:  # Nadam's curves sit near 0, 0.45 and 1: the legend goes between
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(0.0, 0.72))


def _bars(ax: Any, sizes: list[int]) -> None:
    unit, scale = _unit(max(sizes))
    ranks = [f"rank {r}" for r in range(len(sizes))]
    bars = ax.bar(ranks, [n / scale for n in sizes], color=_COLORS[0], width=0.5)
    ax.bar_label(bars, labels=[f"{n / scale:.3g} {unit}" for n in sizes], fontsize=8, padding=2)
    ax.set_ylabel(unit, fontsize=8)
    ax.margins(y=0.2)


def _unit(n: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return unit, float(scale)
    return "bytes", 1.0


def _style(ax: Any) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _title(figure: Any, history: MetricsHistory, last: dict[str, Any]) -> None:
    spec = history.spec
    optimizer, sharding = spec.get("optimizer") or {}, spec.get("sharding") or {}
    workers = (spec.get("scaling") or {}).get("num_workers", last.get("world_size", "?"))
    head = (
        f"{spec.get('name') or history.job_id}  ({history.job_id}, {history.state})  ·  "
        f"{spec.get('task', '')}, {optimizer.get('algorithm', '?')}, "
        f"{sharding.get('engine', '?')} ZeRO-{sharding.get('stage', '?')}, {workers} workers"
    )
    final = [f"step {last['step']}"]
    for key, label in (("loss", "loss"), ("eval_loss", "held-out loss"), ("accuracy", "accuracy")):
        if isinstance(last.get(key), int | float):
            final.append(f"{label} {last[key]:.4f}")
    lines = [head, "last record: " + ", ".join(final)]
    figure.suptitle("\n".join(lines), fontsize=10, x=0.01, ha="left")
    if history.truncated:
        first = min(int(r["step"]) for r in history.records)
        figure.supxlabel(
            f"history cut: the server keeps only a job's last {len(history.records):,} "
            f"metrics records; steps before {first} are not shown",
            fontsize=9, color="#b22222",
        )  # fmt: skip
