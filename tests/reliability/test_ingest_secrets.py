"""Ingest tokens never reach Ray: no Ray log file holds one, yet workers still report.

Real Ray jobs on the suite's private Ray head, submitted through a real
server. Each job is a few lines of Python standing in for rank 0: it builds
the runtime's own reporter from the environment the service gave it (the
token arrives as a 0600 file named by ``ZEROTRAIN_INGEST_TOKEN_FILE``),
reports a final record, and leaves a checkpoint staging dir behind as a
killed worker would. Then every file Ray wrote is searched for every token.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.ingest_token import ENV_TOKEN_FILE, TOKEN_FILE
from zerotrain.service.local_ray import LocalRay

from .support import bearer, job_spec_message, serve_manager

pytestmark = pytest.mark.ray

_RANK0 = f"""
import os, pathlib, stat
from zerotrain.service.runtime.reporter import make_reporter
token_file = pathlib.Path(os.environ["{ENV_TOKEN_FILE}"])
assert stat.S_IMODE(token_file.stat().st_mode) == 0o600, oct(token_file.stat().st_mode)
assert "ZEROTRAIN_INGEST_TOKEN" not in os.environ
(token_file.parent / ".staging" / "attempt-1" / "checkpoint_00000001-rank0-x").mkdir(parents=True)
reporter = make_reporter()
reporter.emit({{"attempt": 1, "step": 2, "loss": 0.5, "final": True}})
reporter.close()
"""


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_no_ray_log_holds_an_ingest_token(ray_head: LocalRay, tmp_path: Path) -> None:
    entrypoint = f"{shlex.quote(sys.executable)} -c {shlex.quote(_RANK0)}"
    with serve_manager(tmp_path, ray_head, entrypoint=entrypoint) as served:
        stub = served.stub()
        jobs = [
            stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec_message()), metadata=bearer("alice"))
            for _ in range(3)
        ]
        ids = [job.job_id for job in jobs]
        deadline = time.monotonic() + 120
        while any(served.manager.get(i).state.value != "SUCCEEDED" for i in ids):
            states = {i: served.manager.get(i).state.value for i in ids}
            assert "FAILED" not in states.values(), [served.manager.get(i).state_reason for i in ids]
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
        tokens = {i: served.auth.ingest_token_for(i) for i in ids}
        for job_id in ids:
            job = served.manager.get(job_id)
            # The worker read its token from the file: its record was accepted.
            assert job.latest_metrics is not None and job.latest_metrics["step"] == 2
            run_dir = served.manager.run_dir(job_id)
            assert not (run_dir / TOKEN_FILE).exists(), "the token file outlived the job"
            assert not (run_dir / ".staging").exists(), "staging leftovers outlived the job"

    files = _files(ray_head.temp_dir)  # Ray's whole temp dir (ray_dir) and the head's log
    assert len(files) > 20, "Ray's log files were not found where the test looks"
    seen_jobs = set()
    for path in files:
        data = path.read_bytes()
        for job_id, token in tokens.items():
            assert token.encode() not in data, f"{path} holds the ingest token of {job_id}"
            if job_id.encode() in data:
                seen_jobs.add(job_id)
    assert seen_jobs == set(ids), "the search missed the jobs' own logs"
