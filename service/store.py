"""SQLite job store: job records, their event logs and idempotency keys.

Each writing method is one transaction, so a job row and the event that
describes its change are written together or not at all; reads never wait
for a writer. The SQLite plumbing (WAL, ``synchronous=NORMAL`` and why, the
per-thread readers) lives in :mod:`zerotrain.service.sqlite_db`.

The store knows records, not Ray and not protobuf. It persists the domain
types of :mod:`zerotrain.service.model`; it does not define them. The schema and the
row mapping live in :mod:`zerotrain.service.store_rows`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zerotrain.service.errors import InvalidArgument, JobNotFound
from zerotrain.service.model import CheckpointInfo, JobEvent, JobRecord, JobState
from zerotrain.service.sqlite_db import Database
from zerotrain.service.store_rows import (
    JOB_COLUMNS,
    SCHEMA,
    UPDATABLE,
    checkpoint_dict,
    decode_token,
    dumps,
    encode_token,
    event_from_row,
    insert_event,
    json_safe,
    record_from_row,
)

__all__ = ["DEFAULT_MAX_METRICS_EVENTS", "SCHEMA_VERSION", "JobStore"]

SCHEMA_VERSION = 1
DEFAULT_MAX_METRICS_EVENTS = 10_000
MAX_PAGE_SIZE = 1000


class JobStore:
    """Durable job records and per-job event logs in one SQLite database.

    Args:
        path: database file; created (with its parent directory) if missing.
        max_metrics_events: metrics events kept per job; older ones are pruned.
            State events are always kept, so a watcher resuming from an old
            sequence number still sees every transition.

    Thread-safe: one writer connection serialised by a lock, plus one reader
    connection per thread.
    """

    def __init__(
        self, path: str | Path, *, max_metrics_events: int = DEFAULT_MAX_METRICS_EVENTS
    ) -> None:
        if max_metrics_events < 1:
            raise ValueError(f"max_metrics_events: must be >= 1, got {max_metrics_events}")
        self.path = Path(path)
        self.max_metrics_events = max_metrics_events
        self._db = Database(self.path, migrate=self._migrate)

    def close(self, timeout_s: float = 10.0) -> None:
        """Close every connection (idempotent).

        Waits up to ``timeout_s`` for reads in flight on other threads; reads
        started afterwards raise ``sqlite3.ProgrammingError``.
        """
        self._db.close(timeout_s)

    def _migrate(self, c: sqlite3.Connection) -> None:
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: schema version {version} is not supported "
                f"(this build reads version {SCHEMA_VERSION}); use a matching release"
            )

    # -- jobs ------------------------------------------------------------

    def create_job(self, record: JobRecord, *, reason: str = "") -> tuple[JobRecord, bool]:
        """Insert a new job and its first state event, atomically.

        If ``record.idempotency_key`` is set and the same owner already used
        it, nothing is written and the existing job is returned.

        Returns:
            ``(record, created)``: the stored record and whether it is new.
        """
        with self._db.tx() as c:
            if record.idempotency_key is not None:
                row = c.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ?",
                    (record.owner, record.idempotency_key),
                ).fetchone()
                if row is not None:
                    return record_from_row(row), False
            c.execute(
                f"INSERT INTO jobs ({JOB_COLUMNS}, last_sequence) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (
                    record.job_id,
                    record.owner,
                    dumps(record.spec.to_dict()),
                    record.state.value,
                    record.state_reason,
                    record.created_at,
                    record.updated_at,
                    record.started_at,
                    record.finished_at,
                    record.attempt,
                    dumps(json_safe(record.latest_metrics))
                    if record.latest_metrics is not None
                    else None,
                    dumps(checkpoint_dict(record.checkpoint)) if record.checkpoint else None,
                    record.idempotency_key,
                    record.ray_job_id,
                ),
            )
            c.executemany(
                "INSERT INTO job_labels (job_id, key, value) VALUES (?, ?, ?)",
                [(record.job_id, k, v) for k, v in record.spec.labels.items()],
            )
            c.execute(
                "INSERT INTO events (job_id, sequence, time, kind, state, reason, attempt) "
                "VALUES (?, 1, ?, 'state', ?, ?, ?)",
                (
                    record.job_id,
                    record.created_at,
                    record.state.value,
                    reason or record.state_reason,
                    record.attempt,
                ),
            )
        return record, True

    def get_job(self, job_id: str) -> JobRecord:
        """The job's record; raises :class:`JobNotFound`."""
        row = self._db.fetch_one(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
        )
        if row is None:
            raise JobNotFound(job_id)
        return record_from_row(row)

    def find_by_idempotency_key(self, owner: str, key: str) -> JobRecord | None:
        """The job ``owner`` created with idempotency ``key``, if any."""
        row = self._db.fetch_one(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ?",
            (owner, key),
        )
        return None if row is None else record_from_row(row)

    def list_jobs(
        self,
        *,
        owner: str | None = None,
        state: JobState | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """Jobs matching every given filter, newest first, one page at a time.

        Keyset pagination: the opaque ``page_token`` encodes the position of
        the last job returned, so pages stay stable while jobs are added.

        Returns:
            ``(records, next_page_token)``; the token is ``""`` on the last page.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not (
            1 <= page_size <= MAX_PAGE_SIZE
        ):
            raise InvalidArgument(
                f"page_size: must be an integer in [1, {MAX_PAGE_SIZE}], got {page_size!r}"
            )
        where: list[str] = []
        args: list[Any] = []
        if page_token:
            where.append("seq < ?")
            args.append(decode_token(page_token))
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if state is not None:
            where.append("state = ?")
            args.append(JobState(state).value)
        for key, value in (labels or {}).items():
            where.append(
                "EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = jobs.job_id "
                "AND l.key = ? AND l.value = ?)"
            )
            args.extend((key, value))
        sql = f"SELECT seq, {JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(page_size + 1)
        rows = self._db.fetch(sql, args)
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = encode_token(rows[-1]["seq"]) if more else ""
        return [record_from_row(r) for r in rows], token

    def jobs_in_states(self, states: Iterable[JobState]) -> list[JobRecord]:
        """Every job currently in one of ``states``, oldest first."""
        values = [JobState(s).value for s in states]
        if not values:
            return []
        marks = ",".join("?" * len(values))
        rows = self._db.fetch(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seq", values
        )
        return [record_from_row(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zero included)."""
        counts = {s.value: 0 for s in JobState}
        for row in self._db.fetch("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[row[0]] = row[1]
        return counts

    def update_job(
        self,
        job_id: str,
        *,
        state: JobState | None = None,
        reason: str = "",
        expect_states: Iterable[JobState] | None = None,
        now: float,
        event_time: float | None = None,
        **fields: Any,
    ) -> tuple[JobRecord, JobEvent | None] | None:
        """Change a job, optionally as a state transition, atomically.

        Args:
            state: the new state. When given, ``state_reason`` is set to
                ``reason`` and a ``"state"`` event is appended in the same
                transaction.
            expect_states: compare-and-set: change nothing and return ``None``
                unless the job is currently in one of these states. This is how
                racing writers (cancel vs. reconciliation) stay consistent.
            now: the update time (``updated_at``).
            event_time: the event's time if not ``now`` (e.g. Ray's start time).
            fields: any of ``started_at``, ``finished_at``, ``attempt``,
                ``latest_metrics``, ``checkpoint`` (a :class:`CheckpointInfo`),
                ``ray_job_id``.

        Returns:
            ``(record, event)`` after the change (``event`` is ``None`` for a
            change without a state), or ``None`` if ``expect_states`` did not match.
        """
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise TypeError(f"update_job: unknown fields {sorted(unknown)}")
        with self._db.tx() as c:
            row = c.execute(
                f"SELECT {JOB_COLUMNS}, last_sequence FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if expect_states is not None and JobState(row["state"]) not in set(expect_states):
                return None
            sets: list[str] = ["updated_at = ?"]
            args: list[Any] = [now]
            for name, value in fields.items():
                if name == "latest_metrics" and value is not None:
                    value = dumps(json_safe(value))
                elif name == "checkpoint" and value is not None:
                    value = dumps(checkpoint_dict(value))
                sets.append(f"{name} = ?")
                args.append(value)
            event = None
            if state is not None:
                sequence = row["last_sequence"] + 1
                attempt = fields.get("attempt", row["attempt"])
                sets += ["state = ?", "state_reason = ?", "last_sequence = ?"]
                args += [JobState(state).value, reason, sequence]
                event = JobEvent(
                    sequence=sequence,
                    job_id=job_id,
                    time=now if event_time is None else event_time,
                    kind="state",
                    state=JobState(state),
                    reason=reason,
                    metrics=None,
                    attempt=attempt,
                )
                insert_event(c, event)
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", [*args, job_id])
            updated = c.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return record_from_row(updated), event

    def append_metrics(
        self,
        job_id: str,
        metrics: dict,
        *,
        now: float,
        attempt: int,
        checkpoint: CheckpointInfo | None = None,
        append_event: bool = True,
    ) -> tuple[JobRecord, JobEvent | None]:
        """Record a metrics record: the job's latest metrics, attempt, checkpoint, and an event.

        Old metrics events beyond ``max_metrics_events`` are pruned. With
        ``append_event=False`` only the job row is updated (used for records
        that arrive after the job's terminal event).
        """
        metrics = json_safe(metrics)
        with self._db.tx() as c:
            row = c.execute(
                "SELECT last_sequence, attempt, checkpoint FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            sets = ["updated_at = ?", "latest_metrics = ?", "attempt = ?"]
            args: list[Any] = [now, dumps(metrics), max(attempt, row["attempt"])]
            if checkpoint is not None:
                sets.append("checkpoint = ?")
                args.append(dumps(checkpoint_dict(checkpoint)))
            event = None
            if append_event:
                sequence = row["last_sequence"] + 1
                sets.append("last_sequence = ?")
                args.append(sequence)
                event = JobEvent(
                    sequence=sequence,
                    job_id=job_id,
                    time=now,
                    kind="metrics",
                    state=None,
                    reason="",
                    metrics=metrics,
                    attempt=attempt,
                )
                insert_event(c, event)
                self._prune_metrics(c, job_id)
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", [*args, job_id])
            updated = c.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return record_from_row(updated), event

    def _prune_metrics(self, c: sqlite3.Connection, job_id: str) -> None:
        # The cutoff is the sequence of the oldest metrics event we keep.
        cutoff = c.execute(
            "SELECT sequence FROM events WHERE job_id = ? AND kind = 'metrics' "
            "ORDER BY sequence DESC LIMIT 1 OFFSET ?",
            (job_id, self.max_metrics_events - 1),
        ).fetchone()
        if cutoff is not None:
            c.execute(
                "DELETE FROM events WHERE job_id = ? AND kind = 'metrics' AND sequence < ?",
                (job_id, cutoff[0]),
            )

    # -- events ----------------------------------------------------------

    def events(self, job_id: str, after_sequence: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events with ``sequence > after_sequence``, in order (at most ``limit``)."""
        rows = self._db.fetch(
            "SELECT job_id, sequence, time, kind, state, reason, metrics, attempt "
            "FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            (job_id, after_sequence, limit),
        )
        return [event_from_row(r) for r in rows]

    def last_sequence(self, job_id: str) -> int:
        """The sequence number of the job's newest event; raises :class:`JobNotFound`."""
        row = self._db.fetch_one(
            "SELECT last_sequence FROM jobs WHERE job_id = ?", (job_id,)
        )
        if row is None:
            raise JobNotFound(job_id)
        return int(row[0])
