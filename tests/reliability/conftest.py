"""Fixtures of the reliability suite: one private Ray head per session, real servers."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ray_jobs import LocalRay, start_local_ray

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def hermetic_client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Clients see no ZEROTRAIN_* settings or config file of the machine running the tests."""
    for name in ("ZEROTRAIN_ADDRESS", "ZEROTRAIN_TOKEN", "ZEROTRAIN_CA",
                 "ZEROTRAIN_CLIENT_CERT", "ZEROTRAIN_CLIENT_KEY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZEROTRAIN_CONFIG", str(tmp_path / "no-client-config.yaml"))


@pytest.fixture(scope="session")
def ray_head() -> Iterator[LocalRay]:
    """A private local Ray head (dashboard on loopback, 2 CPUs, own temp dir and token).

    ``tests/reliability`` is on the head's ``PYTHONPATH`` so jobs can run the
    suite's custom tasks (``faulty_tasks:...``) when a server allows them.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="ztrel-", dir="/tmp"))  # short: unix sockets
    previous = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_AUTH_TOKEN_PATH")}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), str(HERE.parents[1]), previous["PYTHONPATH"]) if p
    )
    head = start_local_ray(temp_dir, num_cpus=2)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(temp_dir / "auth_token")
    try:
        yield head
    finally:
        head.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)
