"""SQLite plumbing of the job store: WAL mode, one writer, one reader per thread.

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
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Database"]


class Database:
    """One SQLite database file, opened for many reader threads and one writer.

    Args:
        path: database file; created (with its parent directory) if missing.
        migrate: run once in the first transaction to create or check the schema.
    """

    def __init__(self, path: Path, *, migrate: Callable[[sqlite3.Connection], None]) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode=WAL")
        with self.tx() as c:
            migrate(c)
        # Readers get a connection per thread: in WAL mode they see the last
        # committed state and neither wait for nor block the writer.
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        # close() must not pull a connection out from under a reader in another
        # thread (sqlite3 can crash the process on that), so reads are counted.
        self._reads = threading.Condition()
        self._active_reads = 0

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

    def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
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

    def fetch_one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row of :meth:`fetch`, or ``None``."""
        rows = self.fetch(sql, args)
        return rows[0] if rows else None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
