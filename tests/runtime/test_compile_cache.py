"""Where the runtime keeps torch.compile's kernels: beside the runs, keyed by machine."""

from __future__ import annotations

import os

import pytest

from zerotrain.service.runtime import compile_cache


def test_cache_goes_beside_the_runs_keyed_by_machine(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    used = compile_cache.use_shared_cache(str(tmp_path / "runs" / "job-1"))
    key = compile_cache.machine_key()
    assert used == str(tmp_path / "runs" / ".cache" / "inductor" / key)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == used and os.path.isdir(used)
    assert key == compile_cache.machine_key() and len(key) == 16
    # Another ATEN_CPU_CAPABILITY (another vector width) gets another cache.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert compile_cache.machine_key() != key


@pytest.mark.parametrize("storage", ["s3://bucket/runs/job-1", ""])
def test_uri_storage_keeps_torchs_default(storage, monkeypatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_cache.use_shared_cache(storage) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_a_cache_the_user_chose_is_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.use_shared_cache(str(tmp_path / "runs" / "job-1")) is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
