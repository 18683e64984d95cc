"""Fixtures for the observability tests: promtool/prometheus binaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def find_prometheus_tool(name: str) -> str | None:
    """Path of ``promtool``/``prometheus``: the project's ``.prometheus/`` (make prometheus), else PATH."""
    local = ROOT / ".prometheus" / "usr" / "bin" / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


@pytest.fixture(scope="session")
def promtool() -> str:
    path = find_prometheus_tool("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make prometheus` (installs it into .prometheus/)")
    return path


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    path = find_prometheus_tool("prometheus")
    if path is None:
        pytest.fail("prometheus not found: run `make prometheus` (installs it into .prometheus/)")
    return path
