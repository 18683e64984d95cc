"""The data dir and the embedded Ray temp dir: private, and never silently started over.

The start-up refusals run the real ``python -m zerotrain.service serve`` as a subprocess
(they happen before Ray is contacted); the permission checks use the real
modules on real files.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from zerotrain.service.datadir import (
    StoreUnusable,
    load_or_create_secret,
    open_store,
    prepare_data_dir,
    warn_if_exposed,
)
from zerotrain.service.local_ray import LocalRay, start_local_ray

REPO = Path(__file__).resolve().parents[2]
OTHER_UID = 12345


def _used_data_dir(path: Path) -> Path:
    """A data dir a service has run in: its ingest secret and a job's run directory."""
    (path / "runs" / "j-0123456789abcdef").mkdir(parents=True)
    (path / "ingest.secret").write_bytes(os.urandom(32))
    return path


def _serve(data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "zerotrain.service", "serve", "--insecure-no-auth",
        "--data-dir", str(data_dir), "--metrics-port", "-1", "--health-port", "-1",
        "--address", "127.0.0.1:0", "--ray-address", "http://127.0.0.1:9", *extra,
    ]  # fmt: skip
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("zerotrain: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("store", ["empty", "missing", "garbage"])
def test_a_used_data_dir_with_a_lost_store_refuses_to_start(tmp_path: Path, store: str):
    """0 of 15 jobs listed after a 0-byte jobs.db: now a one-line error, exit 2."""
    data_dir = _used_data_dir(tmp_path / "data")
    db = data_dir / "jobs.db"
    if store == "empty":
        db.write_bytes(b"")
    elif store == "garbage":
        db.write_bytes(b"this is not an SQLite database, just garbage " * 200)
    result = _serve(data_dir)
    _one_line_error(result, str(db), "--reinitialize-store")
    assert not db.exists() if store == "missing" else db.exists()  # nothing was created


def test_reinitialize_store_moves_the_unusable_store_aside(tmp_path: Path):
    data_dir = _used_data_dir(tmp_path / "data")
    (data_dir / "jobs.db").write_bytes(b"garbage " * 100)
    with pytest.raises(StoreUnusable):
        open_store(data_dir)
    store = open_store(data_dir, reinitialize=True)
    try:
        assert store.count_by_state()["RUNNING"] == 0
    finally:
        store.close()
    kept = [p.name for p in data_dir.iterdir() if p.name.startswith("jobs.db.unusable-")]
    assert len(kept) == 1 and (data_dir / kept[0]).read_bytes() == b"garbage " * 100
    # The server flag gets there too: past the store, it stops only at the unreachable Ray.
    (data_dir / "jobs.db").write_bytes(b"")
    result = _serve(data_dir, "--reinitialize-store")
    assert result.returncode == 1 and "Ray" in result.stderr, result.stderr[-2000:]


def test_a_fresh_data_dir_starts_empty(tmp_path: Path):
    store = open_store(prepare_data_dir(tmp_path / "fresh"))
    store.close()


def test_data_dir_is_private_and_its_files_owner_only(tmp_path: Path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    prepare_data_dir(data_dir)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    store = open_store(data_dir)
    try:
        store.count_by_state()
        secret = load_or_create_secret(data_dir / "ingest.secret")
        assert len(secret) == 32
        names = {"jobs.db", "jobs.db-wal", "jobs.db-shm", "ingest.secret"}
        assert names <= {p.name for p in data_dir.iterdir()}
        for name in names:
            assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
    finally:
        store.close()
    # A store left 0644 by an older release is tightened at the next start.
    os.chmod(data_dir / "jobs.db", 0o644)
    open_store(data_dir).close()
    assert stat.S_IMODE((data_dir / "jobs.db").stat().st_mode) == 0o600


def test_a_readable_tokens_file_is_warned_about(tmp_path: Path, caplog):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens: []\n")
    os.chmod(tokens, 0o644)
    with caplog.at_level(logging.WARNING, logger="zerotrain.service.datadir"):
        assert warn_if_exposed(tokens)
    assert str(tokens) in caplog.text and "644" in caplog.text
    os.chmod(tokens, 0o600)
    caplog.clear()
    assert not warn_if_exposed(tokens) and not caplog.text


# ----------------------------------------------------------------------- Ray temp dir
def _state(path: Path) -> None:
    path.write_text(json.dumps({"pid": os.getpid(), "address": "http://127.0.0.1:9",
                                "token": "t"}))  # fmt: skip
    os.chmod(path, 0o600)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@needs_root
def test_a_head_state_file_of_another_user_is_refused(tmp_path: Path):
    temp_dir = tmp_path / "head"
    temp_dir.mkdir(mode=0o700)
    _state(temp_dir / "zerotrain_ray_head.json")
    os.chown(temp_dir / "zerotrain_ray_head.json", OTHER_UID, OTHER_UID)
    with pytest.raises(RuntimeError, match="not the service user's"):
        start_local_ray(temp_dir, timeout_s=1)


def test_a_symlinked_head_state_file_is_refused(tmp_path: Path):
    temp_dir = tmp_path / "head"
    temp_dir.mkdir(mode=0o700)
    _state(tmp_path / "planted.json")
    (temp_dir / "zerotrain_ray_head.json").symlink_to(tmp_path / "planted.json")
    with pytest.raises(RuntimeError, match="cannot be opened safely"):
        start_local_ray(temp_dir, timeout_s=1)


@needs_root
def test_a_temp_dir_of_another_user_or_a_symlink_is_refused(tmp_path: Path):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o777)
    os.chown(foreign, OTHER_UID, OTHER_UID)
    with pytest.raises(RuntimeError, match="belongs to uid 12345"):
        start_local_ray(foreign, timeout_s=1)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(RuntimeError, match="not a plain directory"):
        start_local_ray(tmp_path / "link", timeout_s=1)


@pytest.mark.ray
def test_the_embedded_heads_temp_dir_is_private(ray_head: LocalRay):
    """Ray makes its temp dir 0777: it lives one level below a 0700 dir of the service."""
    assert stat.S_IMODE(ray_head.temp_dir.stat().st_mode) == 0o700
    assert any(ray_head.ray_dir.glob("session_*")), "Ray's files are not under ray_dir"
    for name in ("auth_token", "zerotrain_ray_head.json", "head.log"):
        assert stat.S_IMODE((ray_head.temp_dir / name).stat().st_mode) == 0o600, name
