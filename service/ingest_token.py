"""Handing a job's ingest token to its workers through a file, never through Ray.

Anything in a Ray job's runtime env (environment variables included) is logged
by Ray (``runtime_env_agent.log``) and shown to whoever can read the job's
metadata. So the service writes the token to ``<run dir>/.ingest-token`` (mode
0600, atomically, never through a symlink) and puts only that file's *path* in
the runtime env (``ZEROTRAIN_INGEST_TOKEN_FILE``). Workers read it when their
reporter starts; the service removes it when the job ends.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["ENV_TOKEN_FILE", "TOKEN_FILE", "read_token_file", "remove_token_file", "write_token_file"]

ENV_TOKEN_FILE = "ZEROTRAIN_INGEST_TOKEN_FILE"
TOKEN_FILE = ".ingest-token"


def write_token_file(run_dir: Path, token: str) -> Path:
    """Write ``token`` to ``run_dir/.ingest-token`` (0600; ``run_dir`` made 0700); returns the path."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = run_dir / TOKEN_FILE
    tmp = run_dir / f"{TOKEN_FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.replace(tmp, path)
    return path


def read_token_file(path: str | Path) -> str:
    """The token in ``path``; ``ValueError`` naming the file (never its content) if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"{ENV_TOKEN_FILE}: cannot read {path} ({exc.strerror})") from None
    if not token:
        raise ValueError(f"{ENV_TOKEN_FILE}: {path} is empty")
    return token


def remove_token_file(run_dir: Path) -> None:
    """Delete the job's token file, if any (its token is refused from now on anyway)."""
    with contextlib.suppress(FileNotFoundError):
        (run_dir / TOKEN_FILE).unlink()
