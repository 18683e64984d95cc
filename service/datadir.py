"""The service's data directory: private to the service user, and its job store the one it used.

Layout (``--data-dir``)::

    jobs.db, jobs.db-wal, jobs.db-shm   the SQLite job store     (0600)
    ingest.secret                       derives ingest tokens   (0600)
    runs/<job id>/                      checkpoints, run files, the job's ingest token file

The directory is made 0700 and the files 0600 at start (SQLite gives its WAL
and shared-memory files the database file's mode). A data dir that shows
earlier use (an ``ingest.secret`` or a run directory) but whose ``jobs.db`` is
missing or empty would silently start over with no jobs: :func:`open_store`
refuses that, and a database SQLite cannot read, with one line naming the file
and the ``--reinitialize-store`` override (which moves the unusable files aside,
never deletes them).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

from zerotrain.service.auth import new_ingest_secret
from zerotrain.service.store import JobStore

__all__ = [
    "STORE_FILE",
    "StoreUnusable",
    "load_or_create_secret",
    "open_store",
    "prepare_data_dir",
    "warn_if_exposed",
]

log = logging.getLogger(__name__)

STORE_FILE = "jobs.db"
SECRET_FILE = "ingest.secret"
_STORE_COMPANIONS = ("-wal", "-shm")
_OVERRIDE = "--reinitialize-store"


class StoreUnusable(RuntimeError):
    """The job store cannot be used as it is; the one-line message says why and what to do."""


def prepare_data_dir(data_dir: Path) -> Path:
    """Create ``data_dir`` (0700) or tighten it to 0700 when it is ours; returns it."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = data_dir.stat()
    if info.st_uid == os.getuid():
        if stat.S_IMODE(info.st_mode) != 0o700:
            data_dir.chmod(0o700)
    else:
        log.warning(
            "data dir %s belongs to uid %d, not to the service (uid %d): its mode stays %o",
            data_dir, info.st_uid, os.getuid(), stat.S_IMODE(info.st_mode),
        )  # fmt: skip
    return data_dir


def _shows_earlier_use(data_dir: Path) -> bool:
    runs = data_dir / "runs"
    return (data_dir / SECRET_FILE).exists() or (runs.is_dir() and any(runs.iterdir()))


def _move_aside(path: Path) -> None:
    """Rename the store and its companions to ``<name>.unusable-<UTC time>``."""
    suffix = time.strftime(".unusable-%Y%m%dT%H%M%SZ", time.gmtime())
    for name in (path.name, *(path.name + c for c in _STORE_COMPANIONS)):
        source = path.with_name(name)
        if source.exists():
            source.rename(path.with_name(name + suffix))
            log.warning("%s: moved aside to %s (%s)", source, source.name + suffix, _OVERRIDE)


def _unusable(path: Path, why: str) -> StoreUnusable:
    return StoreUnusable(
        f"job store {path}: {why}; restore it from a backup, or pass {_OVERRIDE} to start "
        "with an empty store (the unusable file is moved aside, not deleted)"
    )


def open_store(data_dir: Path, *, reinitialize: bool = False) -> JobStore:
    """Open ``data_dir/jobs.db`` (0600), refusing an empty, missing or unreadable one.

    Raises:
        StoreUnusable: the data dir was used before but the store is missing or
            empty, or SQLite cannot read it; unless ``reinitialize``.
    """
    path = data_dir / STORE_FILE
    missing = not path.exists()
    empty = not missing and path.stat().st_size == 0
    if (missing or empty) and _shows_earlier_use(data_dir):
        if not reinitialize:
            why = "is missing" if missing else "is empty (0 bytes)"
            raise _unusable(path, f"{why}, but the data dir holds earlier jobs' files")
        if empty:
            _move_aside(path)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    try:
        store = _open(path)
    except sqlite3.DatabaseError as exc:
        if not reinitialize:
            raise _unusable(path, f"not a readable SQLite job store ({exc})") from None
        _move_aside(path)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        store = _open(path)
    for name in (path.name, *(path.name + c for c in _STORE_COMPANIONS)):
        _owner_only(path.with_name(name))
    return store


def _open(path: Path) -> JobStore:
    store = JobStore(path)
    try:
        store.count_by_state()  # reads a table: a garbage file fails here at the latest
    except sqlite3.DatabaseError:
        store.close()
        raise
    return store


def _owner_only(path: Path) -> None:
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:
        pass


def load_or_create_secret(path: Path) -> bytes:
    """Read the 32-byte secret at ``path``, creating it (0600, atomically) if missing."""
    if path.exists():
        secret = path.read_bytes()
        if len(secret) != 32:
            raise ValueError(f"{path}: corrupt ingest secret (expected 32 bytes); delete it")
        _owner_only(path)
        return secret
    secret = new_ingest_secret()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return secret


def warn_if_exposed(tokens_file: Path) -> bool:
    """Log a warning when the tokens file is readable by group or others; True if so."""
    mode = stat.S_IMODE(tokens_file.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "tokens file %s is readable by group or others (mode %o): it holds every API "
            "token; chmod 600 it", tokens_file, mode,
        )  # fmt: skip
        return True
    return False
