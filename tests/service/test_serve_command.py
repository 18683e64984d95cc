"""``zerotrain-serve`` as a person runs it: its help names it, and Ctrl-C says what it waits for."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zerotrain.service.app import ray_temp_dir

SCRIPT = Path(sys.executable).with_name("zerotrain-serve")


def test_help_names_the_command_typed():
    shown = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: zerotrain-serve [-h]")
    assert "--data-dir" in shown.stdout
    module = subprocess.run(
        [sys.executable, "-m", "zerotrain.service", "serve", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert module.stdout.startswith("usage: python -m zerotrain.service serve [-h]")


@pytest.mark.ray
def test_sigint_prints_each_step_and_stopped(tmp_path: Path):
    """The embedded Ray head used to drain for up to 30 s on SIGTERM; now it stops at once."""
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [SCRIPT, "--address", "127.0.0.1:0", "--metrics-port", "-1", "--data-dir", data_dir,
         "--insecure-no-auth", "--ray-num-cpus", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    temp_dir = ray_temp_dir(data_dir.resolve())
    try:
        first = proc.stdout.readline()
        assert first.startswith("zerotrain: serving on 127.0.0.1:"), (first, proc.stderr.read())
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"still stopping after 60 s; it printed:\n{out}\n{err[-3000:]}")
        seconds = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_left_over_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "zerotrain: SIGINT: stopping"
    assert "zerotrain: stopping the gRPC server (open streams get 2 s) ..." in lines
    assert any(line.startswith("zerotrain: stopping the embedded Ray head (pid ") for line in lines)
    assert lines[-1] == "zerotrain: stopped"
    assert seconds < 12, (seconds, out)


def _kill_left_over_head(temp_dir: Path) -> None:
    """A failed test must not leave its Ray head running (it runs in its own session)."""
    try:
        pid = json.loads((temp_dir / "zerotrain_ray_head.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
