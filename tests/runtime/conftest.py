"""Fixtures for the runtime tests: one local Ray per session, in a private temp dir."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """Start a local Ray (4 CPUs) once per session; yield its GCS address."""
    import ray

    # DeepSpeed's CPU op is JIT-compiled once (~30 s) and cached here across sessions.
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "zt-torch-extensions")
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Train V2's poll interval is short for every test (tests/conftest.py).
    for attempt in (1, 2):
        temp_dir = tempfile.mkdtemp(prefix="zt-ray-")
        try:
            ray.init(num_cpus=4, _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            # Seen once in a full run: Ray's dashboard process aborted as the node
            # started, and the raylet never came up ("node timed out during startup").
            # That is Ray's start-up, not the code under test: one more try, logged.
            if attempt == 2:
                raise
            logging.getLogger(__name__).warning("ray.init failed; retrying", exc_info=True)
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
