"""Settings for the whole suite."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from zerotrain.service.local_ray import LocalRay, start_local_ray

ROOT = Path(__file__).resolve().parents[1]

# torch.compile's on-disk caches (kernels, precompiled headers) are not keyed by
# ATEN_CPU_CAPABILITY: a run with another capability can reuse an artifact built
# for a different vector width and compute garbage. One cache per capability
# (inherited by the Ray jobs and subprocesses the tests start) keeps them apart.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"zt-inductor-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}",
    ),
)

# Ray Train V2's controller polls its workers (and blocks ray.train.report) on this
# interval, 2 s by default: a short one ends each test job seconds sooner. Ray heads
# started by the tests pass it on to every job's driver and controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

_RAY_FIXTURES = {"ray_head", "ray_cluster", "ray_address"}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that uses a Ray cluster fixture ``ray`` (``make test-fast`` skips them)."""
    for item in items:
        if _RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[LocalRay]:
    """One private local Ray head for every suite that runs jobs through the service.

    2 CPUs, dashboard on loopback, its own temp dir and auth token, exported as
    ``RAY_AUTH_TOKEN_PATH`` for the session so ``RayJobs(address)`` (and Ray's own
    clients) authenticate. ``tests/reliability`` is on the head's ``PYTHONPATH`` so
    jobs can run that suite's custom tasks (``faulty_tasks:...``) when a server
    allows them.
    """
    root = Path(tempfile.mkdtemp(prefix="ztray-", dir="/tmp"))  # short: Ray's unix sockets
    temp_dir = root / "h"  # created by start_local_ray itself (private, 0700)
    previous = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_AUTH_TOKEN_PATH")}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "tests" / "reliability"), previous["PYTHONPATH"]) if p
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
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_head: LocalRay) -> str:
    """The dashboard address (``http://127.0.0.1:PORT``) of the session's Ray head."""
    return ray_head.address
