"""Small files in a run's storage directory: the attempt counter and per-worker info.

They live next to Ray Train's checkpoints (a local path or any filesystem Ray's
storage supports), so they survive worker restarts and are visible to the
service and to tests.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs as pafs

__all__ = ["RunFiles"]


class RunFiles:
    """Files under ``experiment_path`` on ``filesystem`` (from Ray Train's StorageContext)."""

    def __init__(self, filesystem: pafs.FileSystem, experiment_path: str):
        self.fs = filesystem
        self.root = PurePosixPath(experiment_path)

    @classmethod
    def from_train_context(cls) -> RunFiles:
        """The current Ray Train run's files (call inside a training worker)."""
        import ray.train

        storage = ray.train.get_context().get_storage()
        return cls(storage.storage_filesystem, storage.experiment_fs_path)

    def _read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(str(self.root / name)) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def _write_atomic(self, name: str, data: bytes) -> None:
        path = self.root / name
        self.fs.create_dir(str(path.parent), recursive=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(str(tmp)) as f:
            f.write(data)
        self.fs.move(str(tmp), str(path))  # rename: readers see the old or the new file

    def next_attempt(self) -> int:
        """Increment and return the 1-based count of worker-group starts (rank 0 only)."""
        raw = self._read("attempt")
        attempt = int(raw.decode()) + 1 if raw else 1
        self._write_atomic("attempt", str(attempt).encode())
        return attempt

    def write_worker(self, attempt: int, rank: int, info: dict[str, Any]) -> None:
        """Record a worker process (``workers/attempt-<a>-rank-<r>.json``: pid, host, ...)."""
        info = {"attempt": attempt, "rank": rank, "pid": os.getpid(), **info}
        self._write_atomic(f"workers/attempt-{attempt}-rank-{rank}.json", json.dumps(info).encode())
