"""``python -m zerotrain.service.runtime`` rejects bad input with one field-named line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zerotrain.service.runtime", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--spec-json", json.dumps({"name": "x", "task": "digits", "optimizer": {"lr": -1}})],
            "zerotrain: error: invalid job spec: optimizer.lr: must be > 0, got -1",
        ),
        (
            ["--spec-json", "{not json"],
            "zerotrain: error: invalid job spec: --spec-json: malformed JSON",
        ),
        (
            ["--spec-json", json.dumps({"name": "x", "task": "mypkg.mod:build"})],
            "zerotrain: error: invalid job spec: task: custom task 'mypkg.mod:build' is disabled",
        ),
        (
            ["--spec-json", json.dumps({"name": "x", "task": "digits"}), "--job-id", "../etc"],
            "zerotrain: error: job id must match",
        ),
        (  # the run directory (for ray.log) is made before Ray is contacted
            [
                "--spec-json", json.dumps({"name": "x", "task": "digits"}),
                "--job-id", "j1", "--storage", "/proc/no-such-dir",
            ],
            "zerotrain: error: --storage: cannot create /proc/no-such-dir/j1",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_missing_spec_file(tmp_path):
    result = run_cli("--spec", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read spec file" in result.stderr
