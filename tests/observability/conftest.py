"""Fixtures for the observability tests: promtool/prometheus binaries, deploy/generate.py."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

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


def load_generate() -> ModuleType:
    """deploy/generate.py (the dashboard definition), imported by path."""
    name = "zerotrain_deploy_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
