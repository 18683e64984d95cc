"""What a person sees of a job: the progress bar, the summary line, plain text for pipes.

``trainctl submit --watch`` / ``trainctl watch`` and a bare ``python -m
zerotrain.service.runtime`` run show the same progress bar (:func:`job_progress`, fed
with :func:`progress_fields`) and end with the same summary
(:func:`summary_line`). Everything here takes metrics-record dicts (see
docs/ARCHITECTURE.md, "Metrics record"), never protobuf messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = [
    "STATE_STYLE",
    "job_progress",
    "progress_fields",
    "state_markup",
    "strip_ansi",
    "summary_line",
]

STATE_STYLE = {
    "PENDING": "yellow", "RUNNING": "cyan", "SUCCEEDED": "green", "FAILED": "red",
    "CANCELLING": "magenta", "CANCELLED": "magenta",
}  # fmt: skip
"""Rich style of each job state's name."""

# CSI sequences (colours, cursor movement) and the two-character escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (the colours Ray puts into its log lines)."""
    return _ANSI.sub("", text)


def state_markup(state: str) -> str:
    """The state's name in its colour (rich markup)."""
    return f"[{STATE_STYLE.get(state, '')}]{state}[/]"


def job_progress(console: Console) -> Progress:
    """A progress bar: name, bar, ``step n/total``, loss, samples/s, elapsed time.

    Add the job with ``progress.add_task("train", total=max_steps, name=...,
    loss="-", rate="")`` and update it with :func:`progress_fields`. It never
    redirects ``sys.stdout``/``sys.stderr`` (a bare runtime run captures those).
    """
    return Progress(
        TextColumn("[bold]{task.fields[name]}"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        redirect_stdout=False,
        redirect_stderr=False,
    )


def _number(record: Mapping[str, Any], key: str, fmt: str) -> str:
    value = record.get(key)
    return fmt.format(value) if isinstance(value, int | float) else "-"


def progress_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """``Progress.update`` arguments for a metrics record: step, loss and samples/s."""
    return {
        "completed": record.get("step", 0),
        "loss": _number(record, "loss", "{:.4f}"),
        "rate": _number(record, "samples_per_second", "{:.0f} samples/s"),
    }


def summary_line(
    job_id: str,
    state: str,
    metrics: Mapping[str, Any] | None,
    *,
    seconds: float | None = None,
    attempts: int = 1,
) -> str:
    """``job ID: STATE, step N, loss L, accuracy A, R samples/s, T s`` (rich markup).

    ``metrics`` is the job's latest metrics record (``None`` before the first);
    accuracy appears for tasks that report it, the attempt count after a restart.
    """
    parts = [state_markup(state)]
    if metrics:
        parts.append(f"step {metrics.get('step', 0)}")
        parts.append(f"loss {_number(metrics, 'loss', '{:.4f}')}")
        if "accuracy" in metrics:
            parts.append(f"accuracy {_number(metrics, 'accuracy', '{:.4f}')}")
        parts.append(_number(metrics, "samples_per_second", "{:.0f} samples/s"))
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    if attempts > 1:
        parts.append(f"{attempts} attempts")
    return f"job {escape(job_id)}: " + ", ".join(parts)
