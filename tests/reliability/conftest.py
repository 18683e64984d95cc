"""Fixtures of the reliability suite (the Ray head is the session's: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def hermetic_client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Clients see no ZEROTRAIN_* settings or config file of the machine running the tests."""
    for name in ("ZEROTRAIN_ADDRESS", "ZEROTRAIN_TOKEN", "ZEROTRAIN_CA",
                 "ZEROTRAIN_CLIENT_CERT", "ZEROTRAIN_CLIENT_KEY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZEROTRAIN_CONFIG", str(tmp_path / "no-client-config.yaml"))
