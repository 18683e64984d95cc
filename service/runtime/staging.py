"""Where a worker assembles a checkpoint before Ray Train persists it: inside the run directory.

A rank writes its part of checkpoint ``checkpoint_NNNNNNNN`` into
``<run dir>/.staging/attempt-<a>/checkpoint_NNNNNNNN-rank<r>-<random>/`` and
hands that to ``ray.train.report``, which copies it into the checkpoint; the
staging dir is deleted right after. A worker killed in between (a cancel
mid-checkpoint) leaves its staging dir behind *in the run directory*, not in a
shared ``/tmp``: rank 0 removes earlier attempts' leftovers when an attempt
starts, and the service removes ``.staging`` when the job ends. Storage given
as a URI (``s3://...``) has no local run directory: staging then falls back to
the system temp dir.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STAGING_DIR", "clean_stale_staging", "staged_checkpoint"]

STAGING_DIR = ".staging"
_ATTEMPT = re.compile(r"^attempt-(\d+)$")


def _local_run_dir(storage: str) -> Path | None:
    return None if not storage or "://" in storage else Path(storage)


@contextmanager
def staged_checkpoint(storage: str, attempt: int, rank: int, name: str) -> Iterator[Path]:
    """A fresh, private staging directory for rank ``rank``'s part of checkpoint ``name``."""
    run_dir = _local_run_dir(storage)
    root = None
    if run_dir is not None:
        root = run_dir / STAGING_DIR / f"attempt-{attempt}"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-rank{rank}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_staging(storage: str, attempt: int) -> list[Path]:
    """Remove the staging dirs of attempts before ``attempt`` (their workers are gone)."""
    run_dir = _local_run_dir(storage)
    staging = run_dir / STAGING_DIR if run_dir is not None else None
    if staging is None or not staging.is_dir():
        return []
    removed = []
    for entry in staging.iterdir():
        match = _ATTEMPT.match(entry.name)
        if match and int(match.group(1)) < attempt:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
