"""Rules for the metrics records workers report (``ReportMetrics``), before anything is stored.

:func:`check_record` validates one record on its own: types, sizes (key
count, key length), finite numbers, and that a reported checkpoint lies in the
job's run directory. :func:`check_late_record` bounds what may still arrive
after the job reached a terminal state: only the ending attempt's own records,
within a grace window, never moving ``step`` backwards or past the final
record. The job manager applies both; see docs/ARCHITECTURE.md, "Metrics record".
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from zerotrain.service.errors import InvalidArgument, RecordRefused
from zerotrain.service.model import CheckpointInfo, JobRecord

__all__ = [
    "MAX_KEYS",
    "MAX_KEY_CHARS",
    "PHASES",
    "check_late_record",
    "check_record",
]

MAX_KEYS = 64
"""Keys of a record, and of each of its maps (``phase_seconds``, ``optimizer``, ...)."""
MAX_KEY_CHARS = 64
MAX_LIST_ITEMS = 1024
"""Items of ``state_bytes_per_rank`` (one per worker)."""
PHASES = ("data", "forward", "backward", "communication", "optimizer", "compile")
"""Step phases of ``phase_seconds``, measured by the workers each step. ``communication``
is the time the optimizer step spent blocked on collectives (``Engine.collect_step_timings``;
reductions launched from backward hooks overlap backward, and only their remaining wait
counts), and ``compile`` the time it spent building the fused kernel (the first window
only); both are taken out of ``optimizer`` and appear only when the engine measures them
(native: yes; DeepSpeed: no, its communication stays inside ``backward`` and
``optimizer``). The exporter sums any other key into ``other``, so a misbehaving worker
cannot create unbounded label values."""
NON_FINITE_ALLOWED = frozenset({"loss"})
"""A diverged run reports a NaN or infinite loss: a result, stored as null."""


def check_record(job_id: str, record: Any, *, run_dir: Path) -> tuple[int, CheckpointInfo | None]:
    """Validate a metrics record of ``job_id``; returns ``(attempt, checkpoint)``.

    Raises:
        InvalidArgument: naming every bad field and its rule.
    """
    if not isinstance(record, dict):
        raise InvalidArgument(f"record: must be a JSON object, got {type(record).__name__}")
    errors: list[str] = []
    _check_sizes(record, "record", errors)

    def integer(name: str, value: Any, minimum: int) -> bool:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            errors.append(f"record.{name}: must be an integer >= {minimum}, got {value!r}")
            return False
        return True

    integer("step", record.get("step"), 0)
    attempt = record.get("attempt", 1)
    integer("attempt", attempt, 1)
    if record.get("job_id") not in (None, job_id):
        errors.append(f"record.job_id: must be the job's id {job_id!r}, got {record['job_id']!r}")
    checkpoint = None
    raw = record.get("checkpoint")
    if raw is not None:
        if not isinstance(raw, dict):
            errors.append(f"record.checkpoint: must be an object, got {type(raw).__name__}")
        else:
            ok = integer("checkpoint.step", raw.get("step"), 0)
            path = raw.get("path")
            if not isinstance(path, str) or not path:
                errors.append(f"record.checkpoint.path: must be a non-empty string, got {path!r}")
                ok = False
            elif not _inside(path, run_dir):
                errors.append(
                    f"record.checkpoint.path: must be inside the job's run directory "
                    f"{run_dir}, got {path[:200]!r}"
                )
                ok = False
            when = raw.get("time")
            if when is None:  # unset on the wire: the record's own time, else now
                when = record.get("time") or time.time()
            if isinstance(when, bool) or not isinstance(when, int | float):
                errors.append(f"record.checkpoint.time: must be a number, got {when!r}")
                ok = False
            if ok and isinstance(path, str) and isinstance(when, int | float):
                checkpoint = CheckpointInfo(step=raw["step"], path=path, time=float(when))
    if errors:
        raise InvalidArgument("; ".join(errors))
    return attempt, checkpoint


def _inside(path: str, run_dir: Path) -> bool:
    """Whether ``path`` (normalised, never resolved) names something under ``run_dir``.

    The run directory counts as given and with its symlinks resolved (workers
    report paths under the resolved storage path).
    """
    normal = os.path.normpath(path)
    roots = {str(run_dir).rstrip("/"), os.path.realpath(run_dir).rstrip("/")}
    return os.path.isabs(normal) and any(normal.startswith(root + "/") for root in roots)


def _check_sizes(value: dict, where: str, errors: list[str]) -> None:
    """Key count and length of ``value`` and its nested maps; finite numbers; short lists."""
    if len(value) > MAX_KEYS:
        errors.append(f"{where}: must have at most {MAX_KEYS} keys, got {len(value)}")
        return
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
            errors.append(
                f"{where}: keys must be 1-{MAX_KEY_CHARS} characters, got {str(key)[:80]!r}"
            )
            continue
        name = f"{where}.{key}"
        if isinstance(item, float) and not math.isfinite(item):
            if where != "record" or key not in NON_FINITE_ALLOWED:
                errors.append(f"{name}: must be finite, got {item!r}")
        elif isinstance(item, dict):
            _check_sizes(item, name, errors)
        elif isinstance(item, list) and len(item) > MAX_LIST_ITEMS:
            errors.append(f"{name}: must have at most {MAX_LIST_ITEMS} items, got {len(item)}")


def check_late_record(
    job: JobRecord, record: dict, attempt: int, *, now: float, grace_s: float
) -> None:
    """Refuse a record for a job in a terminal state unless it is the ending attempt's own.

    Accepted: within ``grace_s`` of the end, ``attempt`` equal to the job's,
    ``step`` not below the latest record's, and not above the final record's
    (or, with no final record yet, the spec's ``max_steps``).

    Raises:
        RecordRefused: why, and that nothing more will be accepted for the job.
    """
    ended = job.finished_at if job.finished_at is not None else job.updated_at
    if now - ended > grace_s:
        raise RecordRefused(
            job.job_id,
            f"ended ({job.state.value}) {now - ended:.0f} s ago; records are accepted for "
            f"{grace_s:g} s after the end and its ingest token ended with that window",
        )
    if attempt != job.attempt:
        raise RecordRefused(
            job.job_id,
            f"ended ({job.state.value}) with attempt {job.attempt}; record.attempt "
            f"{attempt} is not the ending attempt",
        )
    latest = job.latest_metrics or {}
    step = record["step"]
    low = latest.get("step", 0)
    high = low if latest.get("final") else job.spec.training.max_steps
    if not low <= step <= high:
        raise RecordRefused(
            job.job_id,
            f"ended ({job.state.value}); record.step must stay within [{low}, {high}] "
            f"(never backwards, never past the final record), got {step}",
        )
