"""Checkpoint staging happens inside the run directory, and leftovers are cleaned up.

A worker killed while it assembles a checkpoint (a cancel mid-checkpoint)
used to leave ``/tmp/zt-checkpoint_*`` directories on the node for good.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zerotrain.service.runtime.staging import STAGING_DIR, clean_stale_staging, staged_checkpoint
from zerotrain.service.runtime.trainer import run_job
from zerotrain.service.spec import JobSpec


def test_staging_is_inside_the_run_directory_and_removed_after(tmp_path: Path):
    run_dir = tmp_path / "runs" / "j-1"
    with staged_checkpoint(str(run_dir), 2, 1, "checkpoint_00000010") as path:
        assert path.parent == run_dir / STAGING_DIR / "attempt-2"
        assert path.name.startswith("checkpoint_00000010-rank1-")
        (path / "model.pt").write_bytes(b"x")
    assert not path.exists() and (run_dir / STAGING_DIR / "attempt-2").is_dir()


def test_an_attempt_removes_earlier_attempts_leftovers_only(tmp_path: Path):
    run_dir = tmp_path / "j-1"
    for attempt in (1, 2, 3):
        (run_dir / STAGING_DIR / f"attempt-{attempt}" / "checkpoint_x-rank0-a").mkdir(parents=True)
    removed = clean_stale_staging(str(run_dir), 3)
    assert sorted(p.name for p in removed) == ["attempt-1", "attempt-2"]
    assert [p.name for p in (run_dir / STAGING_DIR).iterdir()] == ["attempt-3"]
    assert clean_stale_staging(str(tmp_path / "never-ran"), 1) == []


def test_uri_storage_stages_in_the_system_temp_dir():
    with staged_checkpoint("s3://bucket/runs/j-1", 1, 0, "checkpoint_00000001") as path:
        assert path.is_dir() and "s3:" not in str(path)


@pytest.mark.ray
def test_a_real_run_stages_its_checkpoints_in_its_run_directory(ray_address, tmp_path: Path):
    spec = JobSpec.from_dict(
        {
            "name": "staging",
            "task": "regression",
            "task_args": {"hidden": 16, "num_samples": 256},
            "scaling": {"num_workers": 1},
            "training": {"max_steps": 4, "batch_size": 16, "checkpoint_every": 2,
                         "metrics_every": 2},
        }
    )  # fmt: skip
    result = run_job(spec, job_id="staging", storage=tmp_path)
    assert result.error is None
    run_dir = tmp_path / "staging"
    assert (run_dir / "checkpoint_00000004" / "model.pt").is_file()
    staging = run_dir / STAGING_DIR / "attempt-1"
    assert staging.is_dir(), "the checkpoints were not staged in the run directory"
    assert list(staging.iterdir()) == [], "a staging dir outlived its checkpoint"
