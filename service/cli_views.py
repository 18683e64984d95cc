"""What ``trainctl`` prints about jobs: the job table, the list, the live watch.

:mod:`zerotrain.service.cli` parses the command and calls the server; this module turns
the answers into text. The progress bar and the summary line themselves come
from :mod:`zerotrain.service.display` (shared with a bare ``python -m zerotrain.service.runtime`` run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from zerotrain.service.client import TERMINAL_STATES, JobClient
from zerotrain.service.convert_json import job_to_json
from zerotrain.service.display import (
    STATE_STYLE,
    job_progress,
    progress_fields,
    state_markup,
    summary_line,
)
from zerotrain.service.model import JobRecord, JobState

__all__ = ["LIST_COLUMNS", "fit_columns", "job_json", "print_job", "print_list", "watch_job"]


def _fmt_time(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(seconds)))


def _metric(record: dict[str, Any], name: str, fmt: str = "{:.4f}") -> str:
    return fmt.format(record[name]) if record.get(name) is not None else "-"


def print_job(console: Console, job: JobRecord) -> None:
    """``trainctl get`` / ``cancel``: the job as a two-column table."""
    state = job.state.value
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    spec = job.spec
    rows = [
        ("job", job.job_id), ("name", spec.name), ("owner", job.owner),
        ("state", state_markup(state)
                  + (f"  ({escape(job.state_reason)})" if job.state_reason else "")),
        ("task", spec.task),
        ("optimizer", f"{spec.optimizer.algorithm} lr={spec.optimizer.lr:g}"),
        ("sharding", f"{spec.sharding.engine} stage {spec.sharding.stage}"),
        ("workers", str(spec.scaling.num_workers)),
        ("attempt", str(job.attempt)),
        ("created", _fmt_time(job.created_at)), ("started", _fmt_time(job.started_at)),
        ("finished", _fmt_time(job.finished_at)),
    ]  # fmt: skip
    if job.latest_metrics is not None:
        m = job.latest_metrics
        rows.append(("step", f"{m.get('step', 0)} / {spec.training.max_steps}"))
        rows.append(("loss", _metric(m, "loss")))
        if m.get("accuracy") is not None:
            rows.append(("accuracy", _metric(m, "accuracy")))
        rows.append(("throughput", _metric(m, "samples_per_second", "{:.0f} samples/s")))
    if job.checkpoint is not None:
        rows.append(("checkpoint", f"step {job.checkpoint.step}: {job.checkpoint.path}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def job_json(job: JobRecord) -> str:
    """``--json``: the job as indented JSON (the API's field names)."""
    return json.dumps(job_to_json(job), indent=2)


def watch_job(
    client: JobClient, job_id: str, console: Console, *, from_sequence: int = 0
) -> JobRecord:
    """Show a live progress bar (step, loss, throughput) until the job ends.

    State changes are printed above the bar with their time; returns the
    finished job after printing a summary.
    """
    job = client.get(job_id)
    total = job.spec.training.max_steps or None
    with job_progress(console) as progress:
        bar = progress.add_task(
            "train", total=total, name=escape(job.spec.name or job_id), loss="-", rate=""
        )
        for event in client.watch(job_id, from_sequence):
            if event.state is None:  # a metrics record
                progress.update(bar, **progress_fields(event.metrics or {}))
                continue
            when = time.strftime("%H:%M:%S", time.localtime(int(event.time)))
            reason = f": {escape(event.reason)}" if event.reason else ""
            progress.console.print(f"[dim]{when}[/] {state_markup(event.state.value)}{reason}")
            if event.state in TERMINAL_STATES:
                break
    job = client.get(job_id)
    print_summary(console, job)
    return job


def print_summary(console: Console, job: JobRecord) -> None:
    """The one-line summary of an ended job, and the reason unless it succeeded."""
    seconds = None
    if job.started_at is not None and job.finished_at is not None:
        seconds = job.finished_at - job.started_at
    console.print(
        summary_line(
            job.job_id, job.state.value, job.latest_metrics, seconds=seconds, attempts=job.attempt
        )
    )
    if job.state_reason and job.state != JobState.SUCCEEDED:
        console.print(f"reason: {escape(job.state_reason)}")


# Columns of `trainctl list`, most important first: when the terminal is too
# narrow, the columns from the first one that does not fit on are dropped.
# NAME is cut (with "…") to the width left over, never below _NAME_MIN.
LIST_COLUMNS = ("JOB", "STATE", "NAME", "STEP", "LOSS", "CREATED", "OWNER")
_RIGHT_ALIGNED = frozenset({"STEP", "LOSS"})
_NAME_MIN = 20
_GAP = 2


def _list_rows(jobs: Sequence[JobRecord]) -> list[dict[str, str]]:
    rows = []
    for job in jobs:
        m = job.latest_metrics
        rows.append({
            "JOB": job.job_id, "STATE": job.state.value, "NAME": job.spec.name,
            "STEP": f"{m.get('step', 0)}/{job.spec.training.max_steps}" if m is not None else "-",
            "LOSS": f"{m['loss']:.4g}" if m is not None and m.get("loss") is not None else "-",
            "CREATED": _short_time(int(job.created_at)), "OWNER": job.owner,
        })  # fmt: skip
    return rows


def _short_time(seconds: int) -> str:
    if seconds == 0:
        return "-"
    same_year = time.localtime(seconds).tm_year == time.localtime().tm_year
    return time.strftime("%m-%d %H:%M" if same_year else "%Y-%m-%d", time.localtime(seconds))


def fit_columns(widths: dict[str, int], order: Sequence[str], total: int) -> dict[str, int]:
    """The leading columns of ``order`` that fit in ``total`` characters, with their widths.

    ``widths`` holds each column's natural width (its widest cell or header).
    Columns are taken in ``order`` until one does not fit with NAME at least
    ``_NAME_MIN`` wide (or its natural width if smaller); NAME then gets the
    width left over, up to its natural width. The first column is always kept.
    """

    def need(columns: list[str]) -> int:
        fixed = sum(widths[c] for c in columns if c != "NAME")
        name = min(widths["NAME"], _NAME_MIN) if "NAME" in columns else 0
        return fixed + name + _GAP * (len(columns) - 1)

    chosen = [order[0]]
    for column in order[1:]:
        if need([*chosen, column]) > total:
            break
        chosen.append(column)
    fitted = {c: widths[c] for c in chosen}
    if "NAME" in fitted:
        spare = total - need([c for c in chosen if c != "NAME"]) - _GAP
        fitted["NAME"] = max(min(widths["NAME"], spare), min(widths["NAME"], _NAME_MIN))
    return fitted


def print_list(console: Console, jobs: Sequence[JobRecord]) -> None:
    """``trainctl list``: one row per job, the columns that fit the terminal."""
    if not jobs:
        console.print("no jobs", style="dim")
        return
    rows = _list_rows(jobs)
    order = list(LIST_COLUMNS)
    if len({row["OWNER"] for row in rows}) > 1:  # an admin's list: who owns what matters
        order.remove("OWNER")
        order.insert(order.index("NAME") + 1, "OWNER")
    natural = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in order}
    widths = fit_columns(natural, order, console.width)
    columns = [c for c in order if c in widths]

    def cell(column: str, text: str, header: bool = False) -> str:
        width = widths[column]
        if len(text) > width:
            text = text[: width - 1] + "…"
        padded = text.rjust(width) if column in _RIGHT_ALIGNED and not header else text.ljust(width)
        if column == "STATE" and not header:
            return f"[{STATE_STYLE.get(text, '')}]{padded}[/]"
        return escape(padded)

    gap = " " * _GAP
    console.print("[bold]" + gap.join(cell(c, c, True) for c in columns).rstrip() + "[/]",
                  soft_wrap=True)  # fmt: skip
    for row in rows:
        console.print(gap.join(cell(c, row[c]) for c in columns).rstrip(), soft_wrap=True)
