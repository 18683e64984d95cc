"""The job store's SQL schema, and the mapping between its rows and the domain types.

:mod:`zerotrain.service.store` runs the transactions; this module says what the tables
look like and how a :class:`~zerotrain.service.model.JobRecord` or
:class:`~zerotrain.service.model.JobEvent` becomes a row and back (JSON columns,
non-finite floats, page tokens).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import sqlite3
from collections.abc import Mapping
from typing import Any

from zerotrain.service.errors import InvalidArgument
from zerotrain.service.model import CheckpointInfo, JobEvent, JobRecord, JobState
from zerotrain.service.spec import JobSpec

__all__ = [
    "JOB_COLUMNS",
    "SCHEMA",
    "UPDATABLE",
    "checkpoint_dict",
    "decode_token",
    "dumps",
    "encode_token",
    "event_from_row",
    "insert_event",
    "json_safe",
    "record_from_row",
]

MAX_SEQ = 2**63 - 1
"""The largest SQLite integer (signed 64-bit)."""

SCHEMA = """
CREATE TABLE jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order, pagination key
    job_id          TEXT NOT NULL UNIQUE,
    owner           TEXT NOT NULL,
    spec            TEXT NOT NULL,                      -- JobSpec.to_dict() as JSON
    state           TEXT NOT NULL,
    state_reason    TEXT NOT NULL DEFAULT '',
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    attempt         INTEGER NOT NULL DEFAULT 0,
    latest_metrics  TEXT,                               -- JSON
    checkpoint      TEXT,                               -- JSON {step, path, time}
    idempotency_key TEXT,
    ray_job_id      TEXT,
    last_sequence   INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_owner ON jobs(owner, seq);
CREATE INDEX jobs_state ON jobs(state, seq);
CREATE TABLE job_labels (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);
CREATE INDEX job_labels_kv ON job_labels(key, value);
CREATE TABLE events (
    job_id   TEXT NOT NULL REFERENCES jobs(job_id),
    sequence INTEGER NOT NULL,
    time     REAL NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('state', 'metrics')),
    state    TEXT,
    reason   TEXT NOT NULL DEFAULT '',
    metrics  TEXT,
    attempt  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
CREATE INDEX events_kind ON events(job_id, kind, sequence);
"""

JOB_COLUMNS = (
    "job_id, owner, spec, state, state_reason, created_at, updated_at, started_at, "
    "finished_at, attempt, latest_metrics, checkpoint, idempotency_key, ray_job_id"
)

# Fields update_job() may set, besides state/state_reason.
UPDATABLE = frozenset(
    {"started_at", "finished_at", "attempt", "latest_metrics", "checkpoint", "ray_job_id"}
)


def dumps(value: Any) -> str:
    """Compact, sorted JSON; NaN and infinities are refused."""
    # allow_nan=False: a NaN loss must not turn into invalid JSON for clients.
    return json.dumps(value, separators=(",", ":"), allow_nan=False, sort_keys=True)


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (NaN/Inf losses happen) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def encode_token(seq: int) -> str:
    """The opaque page token for "after the job with insertion order ``seq``"."""
    return base64.urlsafe_b64encode(dumps({"v": 1, "after": seq}).encode()).decode().rstrip("=")


def decode_token(token: str) -> int:
    """The ``seq`` a page token encodes; raises :class:`InvalidArgument` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after = data["after"]
        if data.get("v") != 1 or not isinstance(after, int) or isinstance(after, bool):
            raise ValueError
        if not 0 <= after <= MAX_SEQ:  # SQLite integers are signed 64-bit
            raise ValueError
        return after
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"page_token: not a token returned by a previous list call, got {token[:64]!r}"
        ) from exc


def insert_event(c: sqlite3.Connection, event: JobEvent) -> None:
    """Insert ``event`` into the ``events`` table (inside the caller's transaction)."""
    c.execute(
        "INSERT INTO events (job_id, sequence, time, kind, state, reason, metrics, attempt) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.job_id,
            event.sequence,
            event.time,
            event.kind,
            event.state.value if event.state is not None else None,
            event.reason,
            dumps(event.metrics) if event.metrics is not None else None,
            event.attempt,
        ),
    )


def checkpoint_dict(info: CheckpointInfo) -> dict:
    """The JSON form of a checkpoint column."""
    return {"step": info.step, "path": info.path, "time": info.time}


@functools.lru_cache(maxsize=4096)
def spec_from_json(text: str) -> JobSpec:
    """The stored spec, parsed and validated once per distinct text.

    Every read (GetJob, each job of a ListJobs page, watch) used to re-run
    ``JobSpec.from_dict`` (~95 us: the whole validation, the task registry
    included), most of the cost of a GetJob. A job's spec never changes once
    stored, and ``JobSpec`` is frozen, so readers share one instance; nothing
    in the service mutates a spec's ``labels``/``task_args`` dicts.
    """
    return JobSpec.from_dict(json.loads(text))


def record_from_row(row: sqlite3.Row) -> JobRecord:
    """The :class:`JobRecord` of a ``jobs`` row."""
    checkpoint = json.loads(row["checkpoint"]) if row["checkpoint"] else None
    return JobRecord(
        job_id=row["job_id"],
        owner=row["owner"],
        spec=spec_from_json(row["spec"]),
        state=JobState(row["state"]),
        state_reason=row["state_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempt=row["attempt"],
        latest_metrics=json.loads(row["latest_metrics"]) if row["latest_metrics"] else None,
        checkpoint=CheckpointInfo(**checkpoint) if checkpoint else None,
        idempotency_key=row["idempotency_key"],
        ray_job_id=row["ray_job_id"],
    )


def event_from_row(row: sqlite3.Row) -> JobEvent:
    """The :class:`JobEvent` of an ``events`` row."""
    return JobEvent(
        sequence=row["sequence"],
        job_id=row["job_id"],
        time=row["time"],
        kind=row["kind"],
        state=JobState(row["state"]) if row["state"] is not None else None,
        reason=row["reason"],
        metrics=json.loads(row["metrics"]) if row["metrics"] is not None else None,
        attempt=row["attempt"],
    )
