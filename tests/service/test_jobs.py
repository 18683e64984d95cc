"""JobManager against a real local Ray (Jobs API, dashboard, token auth).

Jobs here run tiny real entrypoints (a Python one-liner chosen by the job's
name) so the manager's lifecycle is tested in seconds; the end-to-end test
with the real training runtime lives at the bottom.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from zerotrain.service.errors import (
    InvalidArgument,
    JobFinished,
    JobNotFound,
    PermissionDenied,
    Unschedulable,
)
from zerotrain.service.jobs import JobManager
from zerotrain.service.local_ray import LocalRay, start_local_ray
from zerotrain.service.model import JobEvent, JobRecord, JobState
from zerotrain.service.ray_jobs import RayJobs
from zerotrain.service.records import MetricsRecord
from zerotrain.service.spec import JobSpec, save_spec
from zerotrain.service.store import JobStore

pytestmark = pytest.mark.ray

# Job name -> what the tiny entrypoint does.
_SCRIPTS = {
    "instant": "print('done', flush=True)",
    "quick": "import time; print('hello from the job', flush=True); time.sleep(4)",
    "sleepy": (
        "import os, subprocess, time; child = subprocess.Popen(['sleep', '60']);"
        " print(f'pids {os.getpid()} {child.pid}', flush=True); time.sleep(60)"
    ),
    "medium": "import time; print('working', flush=True); time.sleep(8)",
    "broken": (
        "import sys; print('zerotrain: error: task raised ValueError: boom', file=sys.stderr);"
        " sys.exit(3)"
    ),
}


def tiny_entrypoint(job_id: str, spec_path: Path, storage: Path) -> str:
    # The manager wrote the job's spec.json into its run directory before this.
    assert spec_path == storage / job_id / "spec.json"
    script = _SCRIPTS[json.loads(spec_path.read_text())["name"]]
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def make_spec(name: str, **scaling) -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": name,
            "task": "digits",
            "labels": {"suite": "jobs"},
            "scaling": {"num_workers": 1, **scaling},
            # Eager optimizer step: the fused one's torch.compile start-up (~5 s a
            # worker) is tested in tests/runtime.
            "sharding": {"compile": False},
            "training": {"max_steps": 4},
        }
    )


def stored_job(store: JobStore, job_id: str, name: str = "quick") -> JobRecord:
    """A job written straight into the store (no Ray job behind it)."""
    record = JobRecord(
        job_id=job_id, owner="alice", spec=make_spec(name),
        state=JobState.PENDING, state_reason="accepted", created_at=time.time(),
        updated_at=time.time(), started_at=None, finished_at=None, attempt=0,
        latest_metrics=None, checkpoint=None, idempotency_key=None, ray_job_id=None,
    )  # fmt: skip
    store.create_job(record)
    return record


@pytest.fixture(scope="module")
def ray_jobs(ray_cluster: str) -> RayJobs:
    return RayJobs(ray_cluster)


@pytest.fixture
def manager(tmp_path: Path, ray_jobs: RayJobs) -> Iterator[JobManager]:
    m = JobManager(
        JobStore(tmp_path / "jobs.db"),
        ray_jobs,
        data_dir=tmp_path,
        reconcile_interval_s=0.2,
        entrypoint_factory=tiny_entrypoint,
    )
    m.start()
    yield m
    m.stop()
    m.store.close()


def collect(manager: JobManager, job_id: str, after: int = 0, timeout: float = 60) -> list[JobEvent]:
    """Watch until the terminal event (fails the test on timeout)."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        events = list(manager.watch(job_id, after, stop=stop))
    finally:
        timer.cancel()
    assert not stop.is_set(), f"no terminal event within {timeout}s: {events}"
    return events


def wait_for_state(manager: JobManager, job_id: str, state: JobState, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while (record := manager.get(job_id)).state != state:
        assert time.monotonic() < deadline, f"still {record.state}: {record.state_reason}"
        time.sleep(0.1)
    return record


def test_lifecycle_with_ingested_metrics_and_logs(manager: JobManager):
    record = manager.submit(make_spec("quick"), owner="alice")
    assert record.state == JobState.PENDING and record.ray_job_id == record.job_id
    wait_for_state(manager, record.job_id, JobState.RUNNING)
    for step, final in ((2, False), (4, True)):
        manager.ingest(MetricsRecord.from_dict(
            record.job_id,
            {
                "job_id": record.job_id, "attempt": 1, "step": step, "time": time.time(),
                "loss": 1.0 / step, "final": final,
                "checkpoint": {"step": step, "path": f"{manager.run_dir(record.job_id)}/c{step}"},
            },
        ))  # fmt: skip

    events = collect(manager, record.job_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [(e.kind, e.state) for e in events] == [
        ("state", JobState.PENDING),
        ("state", JobState.RUNNING),
        ("metrics", None),
        ("metrics", None),
        ("state", JobState.SUCCEEDED),
    ]
    assert [e.metrics["step"] for e in events if e.kind == "metrics"] == [2, 4]

    done = manager.get(record.job_id)
    assert done.state == JobState.SUCCEEDED and done.attempt == 1
    assert done.started_at is not None and done.finished_at >= done.started_at
    assert done.latest_metrics["final"] is True and done.latest_metrics["loss"] == 0.25
    assert done.checkpoint.step == 4 and done.checkpoint.path.endswith(f"{record.job_id}/c4")
    assert "hello from the job" in list(manager.logs(record.job_id))
    assert "hello from the job" in list(manager.logs(record.job_id, follow=True))

    # Resume from the middle: exactly the rest, then the stream ends.
    assert collect(manager, record.job_id, after=3) == events[3:]
    assert collect(manager, record.job_id, after=events[-1].sequence) == []


def test_failure_reason_comes_from_the_log(manager: JobManager):
    record = manager.submit(make_spec("broken"), owner="alice")
    events = collect(manager, record.job_id)
    assert events[-1].state == JobState.FAILED
    failed = manager.get(record.job_id)
    assert failed.state == JobState.FAILED
    assert failed.state_reason.startswith("task raised ValueError: boom")
    assert "exit code 3" in failed.state_reason  # Ray's message is kept too


def test_cancel_running_job(manager: JobManager, ray_jobs: RayJobs):
    record = manager.submit(make_spec("sleepy"), owner="alice")
    wait_for_state(manager, record.job_id, JobState.RUNNING)
    deadline = time.monotonic() + 30
    while not (lines := [x for x in manager.logs(record.job_id) if x.startswith("pids ")]):
        assert time.monotonic() < deadline, "the job never printed its pids"
        time.sleep(0.2)
    pids = [int(p) for p in lines[0].split()[1:]]
    assert all(psutil.pid_exists(p) for p in pids)
    cancelling = manager.cancel(record.job_id)
    assert cancelling.state in (JobState.CANCELLING, JobState.CANCELLED)
    events = collect(manager, record.job_id, timeout=30)
    states = [e.state for e in events if e.kind == "state"]
    assert states == [JobState.PENDING, JobState.RUNNING, JobState.CANCELLING, JobState.CANCELLED]
    assert ray_jobs.info(record.job_id).status == "STOPPED"
    # The job's processes, its child included, are really gone (by pid, not by Ray's word).
    gone = time.monotonic() + 10
    while alive := [p for p in pids if _running(p)]:
        assert time.monotonic() < gone, f"processes {alive} of the cancelled job still run"
        time.sleep(0.1)
    with pytest.raises(JobFinished):
        manager.cancel(record.job_id)
    with pytest.raises(JobNotFound):
        manager.cancel("j-does-not-exist")


def test_refusals_change_nothing(manager: JobManager):
    with pytest.raises(Unschedulable, match=r"3 workers x 1 CPUs = 3 CPUs.*has 2 CPUs"):
        manager.submit(make_spec("quick", num_workers=3), owner="alice")
    with pytest.raises(Unschedulable, match="cpus_per_worker"):
        manager.submit(make_spec("quick", cpus_per_worker=4), owner="alice")
    with pytest.raises(Unschedulable, match="no GPUs"):
        manager.submit(make_spec("quick", use_gpu=True), owner="alice")
    custom = JobSpec.from_dict({"name": "quick", "task": "mypkg.tasks:build"})
    with pytest.raises(PermissionDenied, match="custom tasks"):
        manager.submit(custom, owner="alice")
    assert manager.list() == ([], "")


def test_idempotent_submit_starts_one_job(manager: JobManager, ray_jobs: RayJobs):
    first = manager.submit(make_spec("instant"), owner="bob", idempotency_key="k-1")
    again = manager.submit(make_spec("instant"), owner="bob", idempotency_key="k-1")
    other = manager.submit(make_spec("instant"), owner="carol", idempotency_key="k-1")
    assert again.job_id == first.job_id and other.job_id != first.job_id
    assert len(manager.list(owner="bob")[0]) == 1
    for job_id in (first.job_id, other.job_id):
        assert collect(manager, job_id)[-1].state == JobState.SUCCEEDED


def test_running_job_without_metrics_gets_one_warning_event(tmp_path: Path, ray_jobs: RayJobs):
    """A job RUNNING for the warning time with no metrics record is flagged, once.

    (Its workers may not reach the service: a relative TLS path once disabled all
    metrics and nothing said so.)
    """
    manager = JobManager(
        JobStore(tmp_path / "jobs.db"), ray_jobs, data_dir=tmp_path, reconcile_interval_s=0.2,
        entrypoint_factory=tiny_entrypoint, no_metrics_warning_s=2.0,
    )  # fmt: skip
    manager.start()
    try:
        record = manager.submit(make_spec("medium"), owner="alice")  # runs 8 s, reports nothing
        events = collect(manager, record.job_id, timeout=90)
        warnings = [e for e in events if e.reason.startswith("warning: no metrics record")]
        assert len(warnings) == 1 and warnings[0].state == JobState.RUNNING, events
        assert "cannot reach the service" in warnings[0].reason
        assert events[-1].state == JobState.SUCCEEDED
    finally:
        manager.stop()
        manager.store.close()


def test_restarted_manager_reattaches_running_job(tmp_path: Path, ray_jobs: RayJobs):
    def new_manager() -> JobManager:
        return JobManager(
            JobStore(tmp_path / "jobs.db"),
            ray_jobs,
            data_dir=tmp_path,
            reconcile_interval_s=0.2,
            entrypoint_factory=tiny_entrypoint,
        )

    first = new_manager()
    first.start()
    record = first.submit(make_spec("medium"), owner="alice")
    wait_for_state(first, record.job_id, JobState.RUNNING)
    first.stop()
    first.store.close()

    second = new_manager()
    try:
        second.start()
        assert second.get(record.job_id).state == JobState.RUNNING
        events = collect(second, record.job_id)
        assert [e.state for e in events] == [JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED]
        assert len(second.list()[0]) == 1
    finally:
        second.stop()
        second.store.close()


@pytest.mark.parametrize("ray_accepted_it", [False, True])
def test_start_submits_a_job_accepted_before_a_crash(
    tmp_path: Path, ray_jobs: RayJobs, ray_accepted_it: bool
):
    """The service stored a job, then died before recording its Ray submission.

    Whether or not Ray got the submission, start() ends with exactly one Ray
    job for it (the submission id is the job id) and tracks it to the end.
    """
    store = JobStore(tmp_path / "jobs.db")
    accepted = stored_job(store, f"j-crashed-{ray_accepted_it}".lower(), "instant")
    if ray_accepted_it:
        runs = tmp_path / "runs"  # what the crashed service had written, and submitted
        spec_path = save_spec(accepted.spec, runs / accepted.job_id / "spec.json")
        entrypoint = tiny_entrypoint(accepted.job_id, spec_path, runs)
        ray_jobs.submit(accepted.job_id, entrypoint)
    manager = JobManager(
        store, ray_jobs, data_dir=tmp_path, reconcile_interval_s=0.2,
        entrypoint_factory=tiny_entrypoint,
    )  # fmt: skip
    try:
        manager.start()
        assert manager.get(accepted.job_id).ray_job_id == accepted.job_id
        assert collect(manager, accepted.job_id)[-1].state == JobState.SUCCEEDED
    finally:
        manager.stop()
        store.close()


def test_ingest_attempts_and_bad_records(tmp_path: Path, ray_jobs: RayJobs):
    """Ingestion alone (the manager is not started, so nothing reconciles)."""
    manager = JobManager(JobStore(tmp_path / "jobs.db"), ray_jobs, data_dir=tmp_path)
    job = stored_job(manager.store, "j-ingest")
    manager.ingest(MetricsRecord.from_dict(job.job_id, {"attempt": 1, "step": 2, "loss": 0.9}))
    restarted = {"attempt": 2, "step": 3, "loss": 0.8}
    manager.ingest(MetricsRecord.from_dict(job.job_id, restarted))
    events = manager.store.events(job.job_id)
    assert [(e.kind, e.state, e.attempt) for e in events] == [
        ("state", JobState.PENDING, 0),
        ("state", JobState.RUNNING, 1),
        ("metrics", None, 1),
        ("state", JobState.RUNNING, 2),
        ("metrics", None, 2),
    ]
    assert "attempt 2" in events[3].reason and manager.get(job.job_id).attempt == 2

    before = (manager.get(job.job_id), manager.store.last_sequence(job.job_id))
    bad = [
        ([1, 2], "record: must be a JSON object"),
        ({"attempt": 1}, "record.step"),
        ({"step": -1}, "record.step"),
        ({"step": 1, "attempt": 0}, "record.attempt"),
        ({"step": 1, "attempt": True}, "record.attempt"),
        ({"step": 1, "job_id": "j-other"}, "record.job_id"),
        ({"step": 1, "checkpoint": {"step": 1}}, "record.checkpoint.path"),
        ({"step": 1, "checkpoint": "x"}, "record.checkpoint"),
    ]
    for record, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            manager.ingest(MetricsRecord.from_dict(job.job_id, record))
    outside = {"step": 1, "checkpoint": {"step": 1, "path": "/etc/shadow"}}
    with pytest.raises(InvalidArgument, match="run directory"):
        manager.ingest(MetricsRecord.from_dict(job.job_id, outside))
    assert (manager.get(job.job_id), manager.store.last_sequence(job.job_id)) == before
    with pytest.raises(JobNotFound):
        manager.ingest(MetricsRecord.from_dict("j-unknown", {"step": 1}))
    with pytest.raises(InvalidArgument, match="from_sequence"):
        manager.watch(job.job_id, -1)
    manager.store.close()


def test_local_head_is_reused_after_a_service_restart(ray_head: LocalRay):
    """A restarted service finds the head it left running via the state file."""
    again = start_local_ray(ray_head.temp_dir)
    assert again.reused and (again.address, again.pid) == (ray_head.address, ray_head.pid)
    assert RayJobs(again.address, token=again.token).cluster_resources().total_cpus == 2


def test_real_runtime_job_end_to_end(tmp_path: Path, ray_jobs: RayJobs):
    """The real `python -m zerotrain.service.runtime` digits job, 2 workers, through the manager.

    No gRPC server here: the test plays the ingestion rpc by following the
    job's log and handing each ``ZEROTRAIN_METRICS`` record to ``ingest()``.
    """
    manager = JobManager(
        JobStore(tmp_path / "jobs.db"), ray_jobs, data_dir=tmp_path, reconcile_interval_s=0.5
    )
    manager.start()
    try:
        spec = JobSpec.from_dict(
            {
                "name": "digits-e2e",
                "task": "digits",
                "scaling": {"num_workers": 2},
                "sharding": {"compile": False},
                "training": {
                    "max_steps": 6, "batch_size": 16, "metrics_every": 2, "checkpoint_every": 3,
                },
            }
        )  # fmt: skip
        record = manager.submit(spec, owner="alice")
        marker = "ZEROTRAIN_METRICS "
        for line in manager.logs(record.job_id, follow=True):
            if marker in line:
                data = json.loads(line.split(marker, 1)[1])
                manager.ingest(MetricsRecord.from_dict(record.job_id, data))
        events = collect(manager, record.job_id, timeout=180)
        done = manager.get(record.job_id)
        assert done.state == JobState.SUCCEEDED, done.state_reason
        assert [e.state for e in events if e.kind == "state"] == [
            JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED,
        ]  # fmt: skip
        metrics = [e.metrics for e in events if e.kind == "metrics"]
        assert [m["step"] for m in metrics] == [2, 3, 4, 6]  # every 2 steps + the checkpoint at 3
        assert metrics[-1]["final"] is True and events[-2].kind == "metrics"
        assert all(m["world_size"] == 2 and m["loss"] > 0 for m in metrics)
        assert done.attempt == 1 and done.latest_metrics == metrics[-1]
        assert done.checkpoint is not None and done.checkpoint.step == 6
        assert str(tmp_path / "runs") in done.checkpoint.path
    finally:
        manager.stop()
        manager.store.close()
