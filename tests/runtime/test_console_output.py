"""A bare ``python -m zerotrain.service.runtime`` run as a person sees it, on a real local Ray.

By default: a progress bar and a summary with loss, accuracy, throughput and the
checkpoint; none of Ray's chatter and none of the machine-readable lines, which
all land in ``ray.log`` in the run directory. ``--verbose`` shows Ray's output
too. (``--machine``, what the service runs, is covered by test_ray_runtime.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

SPEC = {
    "name": "quiet-run",
    "task": "digits",
    "task_args": {"hidden": 32, "depth": 1},
    "scaling": {"num_workers": 2},
    "training": {"max_steps": 8, "batch_size": 16, "metrics_every": 2, "checkpoint_every": 4},
}
RAY_INTERNALS = ("PlacementGroupCleaner", "core_worker", "TrainController", "RayTrainWorker")


def run_runtime(storage: Path, job_id: str, ray_address: str, *extra: str) -> tuple[int, str, str]:
    """Run the entry point on the test cluster; returns (exit code, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "zerotrain.service.runtime", "--spec-json", json.dumps(SPEC),
         "--job-id", job_id, "--storage", str(storage), *extra],
        env={**os.environ, "RAY_ADDRESS": ray_address}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def test_default_output_is_progress_and_a_summary(ray_address, tmp_path: Path):
    code, out, err = run_runtime(tmp_path, "quiet", ray_address)
    assert code == 0, out + err
    run_dir = tmp_path / "quiet"
    lines = out.splitlines()
    assert lines[0] == (
        f"zerotrain: job quiet: task digits, 2 workers, nadam on native ZeRO-2; files in {run_dir}"
    )
    assert "quiet-run" in lines[1] and "step 8/8" in lines[1]  # the bar's last state
    summary = lines[2]
    assert summary.startswith("job quiet: SUCCEEDED, step 8, loss ")
    assert "accuracy " in summary and "samples/s" in summary
    assert lines[3] == f"checkpoint: {run_dir}/checkpoint_00000008"
    assert lines[4].startswith(f"Ray's log: {run_dir}/ray.log")
    assert len(lines) == 5 and err == ""
    for noise in (*RAY_INTERNALS, "ZEROTRAIN_METRICS", "ZEROTRAIN_RESULT", "\x1b["):
        assert noise not in out, noise

    log = (run_dir / "ray.log").read_text()
    assert log.count("ZEROTRAIN_METRICS ") == 4  # steps 2, 4, 6, 8: every record arrived
    assert "TrainController" in log and "\x1b[" not in log
    assert log.count("zerotrain: job quiet attempt 1: task digits") == 1  # not print()ed twice


def test_verbose_also_shows_rays_output(ray_address, tmp_path: Path):
    code, out, err = run_runtime(tmp_path, "loud", ray_address, "--verbose")
    assert code == 0, out + err
    assert "TrainController" in out and "RayTrainWorker" in out
    assert "ZEROTRAIN_METRICS" not in out  # machine lines stay in the log file
    assert "job loud: SUCCEEDED, step 8" in out
    assert "TrainController" in (tmp_path / "loud" / "ray.log").read_text()


def test_a_failing_run_says_why_on_stderr(ray_address, tmp_path: Path):
    """Storage no filesystem knows: Ray Train fails; the log goes to ./runs/<job_id>/."""
    result = subprocess.run(
        [sys.executable, "-m", "zerotrain.service.runtime", "--spec-json", json.dumps(SPEC),
         "--job-id", "badstore", "--storage", "nope://bucket/runs"],
        env={**os.environ, "RAY_ADDRESS": ray_address}, capture_output=True, text=True,
        timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "job badstore: FAILED" in result.stdout
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("zerotrain: error: job badstore failed: ")
    assert "nope://bucket/runs" in errors[0]
    log = tmp_path / "runs" / "badstore" / "ray.log"
    assert f"Ray's log: {log}" in result.stdout and "nope://" in log.read_text()
