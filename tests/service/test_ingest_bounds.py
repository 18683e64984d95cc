"""ReportMetrics after a job ended, and the size of a record: what may still change, and what not.

A real server on port 0 over a real SQLite store; jobs are seeded in their
final state, so nothing reaches Ray. Records go through the workers' own
client (``GrpcSink``) with the job's ingest token, or an admin's token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import (
    TOKENS,
    hermetic_client_env,  # noqa: F401 - autouse fixture
    make_auth,
    seed_job,
    serving,
)

from zerotrain.service.auth import Authenticator
from zerotrain.service.ingest_client import GrpcSink, IngestError
from zerotrain.service.jobs import JobManager
from zerotrain.service.model import JobState
from zerotrain.service.records import MetricsRecord
from zerotrain.service.runtime.reporter import BufferedReporter
from zerotrain.service.store import JobStore

FINAL = {"attempt": 1, "step": 4, "loss": 0.25, "final": True}


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[JobManager]:
    m = JobManager(JobStore(tmp_path / "jobs.db"), None, data_dir=tmp_path)  # type: ignore[arg-type]
    yield m
    m.store.close()


@pytest.fixture
def auth() -> Authenticator:
    return make_auth()


@pytest.fixture
def port(manager: JobManager, auth: Authenticator) -> Iterator[int]:
    with serving(manager, auth) as p:
        yield p


def _ended(manager: JobManager, job_id: str, *, ago_s: float = 0.0, **record) -> None:
    """A job that ran (attempt 1), sent its final record, and ended ``ago_s`` seconds ago."""
    seed_job(manager.store, job_id, "alice", state=JobState.RUNNING, attempt=1)
    manager.ingest(MetricsRecord.from_dict(job_id, {**FINAL, **record, "time": time.time()}))
    ended = time.time() - ago_s
    manager.store.update_job(
        job_id, now=ended, state=JobState.SUCCEEDED, reason="finished", finished_at=ended
    )


def _snapshot(manager: JobManager, job_id: str) -> tuple:
    job = manager.get(job_id)
    return job.state, job.attempt, job.latest_metrics, job.checkpoint, manager.store.last_sequence(
        job_id
    )


def _send(port: int, auth: Authenticator, job_id: str, record: dict, *, admin: bool = False):
    token = TOKENS["root"] if admin else auth.ingest_token_for(job_id)
    sink = GrpcSink(f"127.0.0.1:{port}", job_id, token=token, timeout_s=5)
    try:
        sink.send(record)
    finally:
        sink.close()


@pytest.mark.parametrize("admin", [False, True], ids=["ingest-token", "admin-token"])
def test_forged_results_after_the_end_are_refused(port, manager, auth, admin):
    """The issue's forgery: attempt 1 -> 42, step -> 123456789, loss 0, /etc/shadow."""
    _ended(manager, "j-done")
    before = _snapshot(manager, "j-done")
    forgeries = [
        {"attempt": 42, "step": 4, "loss": 0.0},
        {"attempt": 1, "step": 123_456_789, "loss": 0.0},
        {"attempt": 1, "step": 5, "loss": 0.0},  # past the final record
        {"attempt": 1, "step": 3, "loss": 0.0},  # backwards
    ]
    for record in forgeries:
        with pytest.raises(IngestError) as info:
            _send(port, auth, "j-done", record, admin=admin)
        assert info.value.code == "FAILED_PRECONDITION", info.value
        assert info.value.final and not info.value.retryable
    with pytest.raises(IngestError) as info:
        _send(port, auth, "j-done", {**FINAL, "checkpoint": {"step": 4, "path": "/etc/shadow"}},
              admin=admin)  # fmt: skip
    assert info.value.code == "INVALID_ARGUMENT" and "run directory" in str(info.value)
    assert _snapshot(manager, "j-done") == before


def test_the_ending_attempt_may_resend_its_final_record_within_the_grace_window(
    port, manager, auth, tmp_path
):
    """The final record can race the terminal state: resent in time, it is taken (no event)."""
    seed_job(manager.store, "j-racing", "alice", state=JobState.RUNNING, attempt=1)
    manager.ingest(MetricsRecord.from_dict("j-racing", {"attempt": 1, "step": 2, "loss": 0.5}))
    now = time.time()
    manager.store.update_job(
        "j-racing", now=now, state=JobState.SUCCEEDED, reason="finished", finished_at=now
    )
    events = manager.store.last_sequence("j-racing")
    checkpoint = {"step": 4, "path": str(tmp_path / "runs" / "j-racing" / "checkpoint_00000004")}
    _send(port, auth, "j-racing", {**FINAL, "checkpoint": checkpoint})
    job = manager.get("j-racing")
    assert job.state == JobState.SUCCEEDED and job.latest_metrics["final"] is True
    assert job.checkpoint.path == checkpoint["path"]
    assert manager.store.last_sequence("j-racing") == events  # no event after the terminal one
    _send(port, auth, "j-racing", FINAL)  # an idempotent resend is fine too


def test_nothing_is_taken_after_the_grace_window(port, manager, auth):
    _ended(manager, "j-old", ago_s=61.0)  # the default window is 60 s
    before = _snapshot(manager, "j-old")
    with pytest.raises(IngestError) as info:
        _send(port, auth, "j-old", FINAL)
    assert info.value.code == "FAILED_PRECONDITION" and "60 s" in str(info.value)
    assert _snapshot(manager, "j-old") == before


def test_the_workers_reporter_stops_at_the_first_final_refusal(port, manager, auth):
    """FAILED_PRECONDITION means the job is over: no retries, nothing more is sent."""
    _ended(manager, "j-over", ago_s=61.0)
    sink = GrpcSink(f"127.0.0.1:{port}", "j-over", token=auth.ingest_token_for("j-over"))
    reporter = BufferedReporter(sink, retry_initial_s=0.05, close_timeout_s=2)
    for step in (5, 6, 7):
        reporter.emit({"attempt": 1, "step": step})
    deadline = time.monotonic() + 10
    while not reporter.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    reporter.emit({"attempt": 1, "step": 8})
    reporter.close()
    assert reporter.finished and reporter.failures == 1 and reporter.sent == 0
    assert reporter.rejected == 3 and reporter.pending() == 0


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"extra": {f"k{i}": 1.0 for i in range(100)}}, "at most 64 keys"),
        ({"optimizer": {f"k{i}": 1.0 for i in range(100)}}, "record.optimizer: must have at most"),
        ({"optimizer": {"x" * 100: 1.0}}, "keys must be 1-64 characters"),
        ({"samples_per_second": float("nan")}, "record.samples_per_second: must be finite"),
        ({"phase_seconds": {"data": float("inf")}}, "record.phase_seconds.data: must be finite"),
        ({"checkpoint": {"step": 1, "path": "/tmp/elsewhere"}}, "run directory"),
        ({"checkpoint": {"step": 1, "path": "runs/j-live/../../x"}}, "run directory"),
    ],
    ids=["keys", "nested-keys", "key-length", "nan", "inf", "outside", "relative-escape"],
)
def test_record_size_and_values_are_bounded(port, manager, auth, record, message):
    seed_job(manager.store, "j-live", "alice", state=JobState.RUNNING, attempt=1)
    before = _snapshot(manager, "j-live")
    full = {"attempt": 1, "step": 1, **record}
    if "extra" in full:
        full.update(full.pop("extra"))  # unknown numeric keys travel in MetricsRecord.extra
    with pytest.raises(IngestError) as info:
        _send(port, auth, "j-live", full)
    assert info.value.code == "INVALID_ARGUMENT" and message in str(info.value), info.value
    assert _snapshot(manager, "j-live") == before


def test_a_diverged_loss_is_still_a_result(port, manager, auth):
    """NaN losses happen: the record is taken, the loss stored as null."""
    seed_job(manager.store, "j-nan", "alice", state=JobState.RUNNING, attempt=1)
    _send(port, auth, "j-nan", {"attempt": 1, "step": 1, "loss": float("nan")})
    assert manager.get("j-nan").latest_metrics["loss"] is None
