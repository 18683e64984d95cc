"""SQLite job store: job records, their event logs and idempotency keys.

One database file in WAL mode, so readers (GetJob, ListJobs, watchers) never
block the writer and a crashed process leaves a consistent database behind.

``synchronous=NORMAL``: in WAL mode a commit is appended to the WAL and
reaches the database file at checkpoints; NORMAL skips the fsync per commit.
The database stays consistent in every case, and a commit survives a crash of
the *process* (SIGKILL of the service, our fault model) because the WAL pages
are already in the OS page cache. Only an OS crash or power loss can drop the
last few commits, and such an event also kills the Ray jobs those commits
describe; the reconciliation loop then marks them failed. FULL would cost an
fsync for every ingested metrics record for no gain in that model.

Writes go through one connection guarded by a lock; each writing method is
one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), so a job row and the
event that describes its change are written together or not at all. Reads use
one connection per thread and never wait for a writer (WAL snapshots).

The store knows records, not Ray and not protobuf. It persists the domain
types of :mod:`service.model`; it does not define them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.errors import InvalidArgument, JobNotFound
from service.model import CheckpointInfo, JobEvent, JobRecord, JobState
from service.spec import JobSpec

__all__ = ["DEFAULT_MAX_METRICS_EVENTS", "SCHEMA_VERSION", "JobStore"]

SCHEMA_VERSION = 1
DEFAULT_MAX_METRICS_EVENTS = 10_000
MAX_PAGE_SIZE = 1000
_MAX_SEQ = 2**63 - 1


_SCHEMA = """
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

_JOB_COLUMNS = (
    "job_id, owner, spec, state, state_reason, created_at, updated_at, started_at, "
    "finished_at, attempt, latest_metrics, checkpoint, idempotency_key, ray_job_id"
)

# Fields update_job() may set, besides state/state_reason.
_UPDATABLE = frozenset(
    {"started_at", "finished_at", "attempt", "latest_metrics", "checkpoint", "ray_job_id"}
)


def _dumps(value: Any) -> str:
    # allow_nan=False: a NaN loss must not turn into invalid JSON for clients.
    return json.dumps(value, separators=(",", ":"), allow_nan=False, sort_keys=True)


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (NaN/Inf losses happen) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(_dumps({"v": 1, "after": seq}).encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after = data["after"]
        if data.get("v") != 1 or not isinstance(after, int) or isinstance(after, bool):
            raise ValueError
        if not 0 <= after <= _MAX_SEQ:  # SQLite integers are signed 64-bit
            raise ValueError
        return after
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"page_token: not a token returned by a previous list call, got {token[:64]!r}"
        ) from exc


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._migrate()
        # Readers get a connection per thread: in WAL mode they see the last
        # committed state and neither wait for nor block the writer.
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        # close() must not pull a connection out from under a reader in another
        # thread (sqlite3 can crash the process on that), so reads are counted.
        self._reads = threading.Condition()
        self._active_reads = 0

    # -- lifecycle -------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Close every connection (idempotent).

        Waits up to ``timeout_s`` for reads in flight on other threads; reads
        started afterwards raise ``sqlite3.ProgrammingError``.
        """
        with self._reads:
            self._closed = True
            self._reads.wait_for(lambda: self._active_reads == 0, timeout=timeout_s)
        with self._lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Opened outside the writer lock: under load a new gRPC worker thread's
            # first connect could stall behind (and then stall) every writer.
            conn = self._connect()
            with self._lock:
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run one read on this thread's connection, fenced against close()."""
        with self._reads:
            if self._closed:
                raise sqlite3.ProgrammingError("the job store is closed")
            self._active_reads += 1
        try:
            return self._reader().execute(sql, args).fetchall()
        finally:
            with self._reads:
                self._active_reads -= 1
                self._reads.notify_all()

    def _fetch_one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = self._fetch(sql, args)
        return rows[0] if rows else None

    def _migrate(self) -> None:
        with self._tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema version {version} is not supported "
                    f"(this build reads version {SCHEMA_VERSION}); use a matching release"
                )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- jobs ------------------------------------------------------------

    def create_job(self, record: JobRecord, *, reason: str = "") -> tuple[JobRecord, bool]:
        """Insert a new job and its first state event, atomically.

        If ``record.idempotency_key`` is set and the same owner already used
        it, nothing is written and the existing job is returned.

        Returns:
            ``(record, created)``: the stored record and whether it is new.
        """
        with self._tx() as c:
            if record.idempotency_key is not None:
                row = c.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ?",
                    (record.owner, record.idempotency_key),
                ).fetchone()
                if row is not None:
                    return _record_from_row(row), False
            c.execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}, last_sequence) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (
                    record.job_id,
                    record.owner,
                    _dumps(record.spec.to_dict()),
                    record.state.value,
                    record.state_reason,
                    record.created_at,
                    record.updated_at,
                    record.started_at,
                    record.finished_at,
                    record.attempt,
                    _dumps(_json_safe(record.latest_metrics))
                    if record.latest_metrics is not None
                    else None,
                    _dumps(_checkpoint_dict(record.checkpoint)) if record.checkpoint else None,
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
        row = self._fetch_one(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
        )
        if row is None:
            raise JobNotFound(job_id)
        return _record_from_row(row)

    def find_by_idempotency_key(self, owner: str, key: str) -> JobRecord | None:
        """The job ``owner`` created with idempotency ``key``, if any."""
        row = self._fetch_one(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ?",
            (owner, key),
        )
        return None if row is None else _record_from_row(row)

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
            args.append(_decode_token(page_token))
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
        sql = f"SELECT seq, {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(page_size + 1)
        rows = self._fetch(sql, args)
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = _encode_token(rows[-1]["seq"]) if more else ""
        return [_record_from_row(r) for r in rows], token

    def jobs_in_states(self, states: Iterable[JobState]) -> list[JobRecord]:
        """Every job currently in one of ``states``, oldest first."""
        values = [JobState(s).value for s in states]
        if not values:
            return []
        marks = ",".join("?" * len(values))
        rows = self._fetch(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seq", values
        )
        return [_record_from_row(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zero included)."""
        counts = {s.value: 0 for s in JobState}
        for row in self._fetch("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
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
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise TypeError(f"update_job: unknown fields {sorted(unknown)}")
        with self._tx() as c:
            row = c.execute(
                f"SELECT {_JOB_COLUMNS}, last_sequence FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if expect_states is not None and JobState(row["state"]) not in set(expect_states):
                return None
            sets: list[str] = ["updated_at = ?"]
            args: list[Any] = [now]
            for name, value in fields.items():
                if name == "latest_metrics" and value is not None:
                    value = _dumps(_json_safe(value))
                elif name == "checkpoint" and value is not None:
                    value = _dumps(_checkpoint_dict(value))
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
                _insert_event(c, event)
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", [*args, job_id])
            updated = c.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return _record_from_row(updated), event

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
        metrics = _json_safe(metrics)
        with self._tx() as c:
            row = c.execute(
                "SELECT last_sequence, attempt, checkpoint FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            sets = ["updated_at = ?", "latest_metrics = ?", "attempt = ?"]
            args: list[Any] = [now, _dumps(metrics), max(attempt, row["attempt"])]
            if checkpoint is not None:
                sets.append("checkpoint = ?")
                args.append(_dumps(_checkpoint_dict(checkpoint)))
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
                _insert_event(c, event)
                self._prune_metrics(c, job_id)
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", [*args, job_id])
            updated = c.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return _record_from_row(updated), event

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
        rows = self._fetch(
            "SELECT job_id, sequence, time, kind, state, reason, metrics, attempt "
            "FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            (job_id, after_sequence, limit),
        )
        return [_event_from_row(r) for r in rows]

    def last_sequence(self, job_id: str) -> int:
        """The sequence number of the job's newest event; raises :class:`JobNotFound`."""
        row = self._fetch_one(
            "SELECT last_sequence FROM jobs WHERE job_id = ?", (job_id,)
        )
        if row is None:
            raise JobNotFound(job_id)
        return int(row[0])


def _insert_event(c: sqlite3.Connection, event: JobEvent) -> None:
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
            _dumps(event.metrics) if event.metrics is not None else None,
            event.attempt,
        ),
    )


def _checkpoint_dict(info: CheckpointInfo) -> dict:
    return {"step": info.step, "path": info.path, "time": info.time}


@functools.lru_cache(maxsize=4096)
def _spec_from_json(text: str) -> JobSpec:
    """The stored spec, parsed and validated once per distinct text.

    Every read (GetJob, each job of a ListJobs page, watch) used to re-run
    ``JobSpec.from_dict`` (~95 us: the whole validation, the task registry
    included), most of the cost of a GetJob. A job's spec never changes once
    stored, and ``JobSpec`` is frozen, so readers share one instance; nothing
    in the service mutates a spec's ``labels``/``task_args`` dicts.
    """
    return JobSpec.from_dict(json.loads(text))


def _record_from_row(row: sqlite3.Row) -> JobRecord:
    checkpoint = json.loads(row["checkpoint"]) if row["checkpoint"] else None
    return JobRecord(
        job_id=row["job_id"],
        owner=row["owner"],
        spec=_spec_from_json(row["spec"]),
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


def _event_from_row(row: sqlite3.Row) -> JobEvent:
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
