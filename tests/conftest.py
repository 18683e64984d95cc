"""Settings for the whole suite."""

from __future__ import annotations

import os
import tempfile

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

_RAY_FIXTURES = {"ray_head", "ray_cluster", "ray_address"}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that uses a Ray cluster fixture ``ray`` (``make test-fast`` skips them)."""
    import pytest

    for item in items:
        if _RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
