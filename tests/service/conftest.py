"""Shared fixtures of the service tests: one private local Ray head per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ray_jobs import LocalRay, start_local_ray


@pytest.fixture(scope="session")
def ray_head() -> Iterator[LocalRay]:
    """A local Ray head with its dashboard, 2 CPUs, in a private temp dir.

    Its auth token is exported as ``RAY_AUTH_TOKEN_PATH`` for the session, so
    ``RayJobs(address)`` (and Ray's own clients) authenticate without more setup.
    """
    # Short path: Ray puts unix sockets under the temp dir.
    root = Path(tempfile.mkdtemp(prefix="ztray-", dir="/tmp"))
    temp_dir = root / "h"  # created by start_local_ray itself (private, 0700)
    head = start_local_ray(temp_dir, num_cpus=2)
    previous = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(temp_dir / "auth_token")
    try:
        yield head
    finally:
        head.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = previous
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_head: LocalRay) -> str:
    """The dashboard address (``http://127.0.0.1:PORT``) of the session's Ray head."""
    return ray_head.address
