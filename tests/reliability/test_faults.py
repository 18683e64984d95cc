"""Fault injection against the real service: every fault kills a real process by pid.

The service runs as ``python -m zerotrain.service serve`` (a subprocess we can SIGKILL)
over the suite's private Ray head; jobs are real Ray Train jobs. Each job is
expensive here (~20-40 s), so each one checks several things.

* job A: the service is SIGKILLed mid-job and restarted over the same data dir;
* job B: the same spec, a Ray Train worker is SIGKILLed mid-run; its final
  parameters must equal job A's (A's workers never noticed the service dying);
* job C: cancelled mid-run; job D then gets the freed CPUs (a task that raises);
* jobs E/F: a corrupted checkpoint, and a checkpoint write that cannot happen.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.client import ApiError, JobClient
from zerotrain.service.local_ray import LocalRay, start_local_ray
from zerotrain.service.model import JobRecord, JobState
from zerotrain.service.ray_jobs import RayJobs

from .service_process import RawWatcher, ServiceProcess, job_processes, scrape, wait_for
from .support import TOKENS, bearer, health_status, job_spec_message, serve_manager

pytestmark = pytest.mark.ray

STEPS = 150
CHECKPOINT_EVERY = 30
SPEC: dict[str, Any] = {
    "name": "../../../outside-the-data-dir",  # inert text: runs are named by job id
    # The digits task with steps of at least 50 ms (tests/reliability/faulty_tasks.py):
    # the same numbers, and on a fast machine still a window to inject faults in.
    "task": "faulty_tasks:paced_digits",
    "task_args": {"hidden": 64, "depth": 2, "step_period_s": 0.05},
    "labels": {"suite": "faults"},
    "optimizer": {"algorithm": "nadam", "lr": 3e-3},
    # Eager optimizer step: the fused one's torch.compile start-up (~5 s a
    # worker) is tested in tests/runtime.
    "sharding": {"engine": "native", "stage": 2, "bucket_mb": 0.05, "compile": False},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    "training": {
        "max_steps": STEPS,
        "batch_size": 16,
        "seed": 11,
        "checkpoint_every": CHECKPOINT_EVERY,
        "metrics_every": 10,
        "max_failures": 2,
    },
}
FIGURES: dict[str, Any] = {}
"""Measured figures, printed at the end of the module (docs/RELIABILITY.md quotes them)."""


def spec_with(**sections: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(SPEC))
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return data


@dataclass
class Env:
    service: ServiceProcess
    ray: RayJobs
    client: JobClient
    admin: JobClient
    submitted: list[str] = field(default_factory=list)

    def run_dir(self, job_id: str) -> Path:
        return self.service.data_dir / "runs" / job_id

    def submit(self, spec: dict[str, Any]) -> str:
        job = self.client.submit(spec)
        self.submitted.append(job.job_id)
        return job.job_id

    def worker_pid(self, job_id: str, attempt: int, rank: int) -> int:
        path = self.run_dir(job_id) / "workers" / f"attempt-{attempt}-rank-{rank}.json"
        return json.loads(path.read_text())["pid"]

    def wait_state(self, job_id: str, states: set[JobState], timeout_s: float = 240) -> JobRecord:
        def reached() -> JobRecord | None:
            job = self.client.get(job_id)
            return job if job.state in states else None

        return wait_for(reached, timeout_s, f"job {job_id} to reach {states}", poll_s=0.2)


@pytest.fixture(scope="module")
def env(ray_head: LocalRay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    data_dir = tmp_path_factory.mktemp("faults")
    tokens = data_dir / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"token": TOKENS["alice"], "principal": "alice"},
                    {"token": TOKENS["root"], "principal": "root", "admin": True},
                ]
            }
        )
    )
    service = ServiceProcess(data_dir, ray_head.address, tokens, "--allow-custom-tasks")
    service.start()
    client = JobClient(service.address, token=TOKENS["alice"], timeout_s=20)
    admin = JobClient(service.address, token=TOKENS["root"], timeout_s=20)
    try:
        yield Env(service, RayJobs(ray_head.address, token=ray_head.token), client, admin)
    finally:
        client.close()
        admin.close()
        service.stop()
        # The service's own log never holds a bearer token or an ingest token.
        log = service.log()
        for token in TOKENS.values():
            assert token not in log, "a bearer token leaked into the service log"
        print("\nreliability figures:", json.dumps(FIGURES, indent=1, sort_keys=True))


def wait_for_checkpoint(env: Env, job_id: str, step: int) -> int:
    """Wait until Ray Train has *registered* a checkpoint at ``step`` or later; return its step.

    Ray Train V2 registers a reported checkpoint when its controller next polls the
    workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s); a worker killed before that
    restarts from the previous one. The controller's snapshot file says what it holds.
    """
    snapshot = env.run_dir(job_id) / "checkpoint_manager_snapshot.json"

    def registered() -> int:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            return 0
        done = latest.get("metrics", {}).get("step", 0)
        return done if done >= step else 0

    return wait_for(registered, 300, f"job {job_id}'s checkpoint at step {step}", poll_s=0.02)


PG_CLEANER = "ray::PlacementGroupCleaner"
"""Ray Train V2's detached placement-group cleaner. It watches its controller through the
State API with *address auto-discovery*, which fails ("Found multiple active Ray
instances") when several Ray clusters share the host, as on shared dev/CI machines; its
monitor thread then dies and the actor never exits (a Ray issue, not the job's code).
On a host with one cluster it must exit like every other process of the job."""


def _ray_clusters_on_host() -> int:
    from ray._private.services import find_gcs_addresses

    return len(find_gcs_addresses())


def _wait_no_processes(job_id: str, timeout_s: float, *, ignore: tuple[str, ...] = ()) -> None:
    def left_running() -> list[psutil.Process]:
        left = []
        for proc in job_processes(job_id):
            try:
                if proc.cmdline()[:1] not in ([name] for name in ignore):
                    left.append(proc)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue  # exited meanwhile
        return left

    try:
        wait_for(lambda: not left_running(), timeout_s, f"job {job_id}'s processes to exit")
    except AssertionError as exc:
        left = []
        for proc in left_running():
            with contextlib.suppress(psutil.Error):
                left.append((proc.pid, " ".join(proc.cmdline())[:120], proc.status()))
        raise AssertionError(f"{exc}; still running: {left}") from None


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"checkpoint_{STEPS:08d}" / "model.pt")


def _sequences(events: list[pb.JobEvent]) -> list[int]:
    return [e.sequence for e in events]


def _metric_value(page: str, name: str, job_id: str) -> float | None:
    match = re.search(rf'^{name}\{{[^}}]*job_id="{job_id}"[^}}]*\}} (\S+)$', page, re.MULTILINE)
    return float(match.group(1)) if match else None


# ------------------------------------------------------------------ scenarios
@pytest.fixture(scope="module")
def job_a(env: Env) -> dict[str, Any]:
    """Job A: the service is SIGKILLed mid-job and restarted over the same data dir."""
    job_id = env.submit(spec_with())
    watcher = RawWatcher(env.service.address, TOKENS["alice"], job_id)
    watcher.start()

    def training() -> bool:
        metrics = env.client.get(job_id).latest_metrics
        return metrics is not None and metrics["step"] >= 20

    t0 = time.monotonic()
    wait_for(training, 240, f"job {job_id} to train 20 steps", poll_s=0.1)
    FIGURES["submit_to_step_20_s"] = round(time.monotonic() - t0, 1)
    pids = [env.worker_pid(job_id, 1, rank) for rank in (0, 1)]
    step_at_kill = env.admin.get(job_id).latest_metrics["step"]
    killed_at = time.time()
    env.service.kill()
    time.sleep(3.0)  # the workers keep training with nobody to report to
    alive_while_down = all(psutil.pid_exists(pid) for pid in pids)
    restarted_at = time.time()
    serve_s = env.service.start()
    # Re-attached: the new process reports Ray's view of the job (RUNNING, or SUCCEEDED if
    # it finished while the service was down).
    reattached = wait_for(
        lambda: env.client.get(job_id).state in (JobState.RUNNING, JobState.SUCCEEDED),
        60,
        "re-attach",
    )
    reattach_s = time.time() - restarted_at
    job = env.wait_state(job_id, {JobState.SUCCEEDED, JobState.FAILED})
    FIGURES["restart_to_job_end_s"] = round(time.time() - restarted_at, 1)
    watcher.join(timeout=60)
    FIGURES["service_restart_to_serving_s"] = round(serve_s, 2)
    FIGURES["service_restart_to_reattached_s"] = round(reattach_s, 2)
    FIGURES["watch_reconnects"] = watcher.reconnects
    return {
        "job_id": job_id,
        "job": job,
        "watcher": watcher,
        "pids": pids,
        "alive_while_down": alive_while_down,
        "step_at_kill": step_at_kill,
        "killed_at": killed_at,
        "restarted_at": restarted_at,
        "reattached": reattached,
    }


def test_service_sigkill_mid_job_loses_nothing(env: Env, job_a: dict[str, Any]) -> None:
    job_id, job, watcher = job_a["job_id"], job_a["job"], job_a["watcher"]
    assert job.state == JobState.SUCCEEDED, job.state_reason
    assert job.attempt == 1 and job.latest_metrics["final"] and job.latest_metrics["step"] == STEPS
    # The workers were not disturbed by the service dying: same processes, kept training.
    assert job_a["alive_while_down"], "a worker died while the service was down"
    assert [env.worker_pid(job_id, 1, r) for r in (0, 1)] == job_a["pids"]
    assert not (env.run_dir(job_id) / "workers" / "attempt-2-rank-0.json").exists()
    made_while_down = [
        e.metrics.step
        for e in watcher.events
        if e.HasField("metrics")
        and job_a["killed_at"] < e.metrics.time.ToNanoseconds() / 1e9 < job_a["restarted_at"]
    ]
    assert made_while_down, "no metrics record was made (and delivered late) while the service was down"
    FIGURES["records_buffered_while_down"] = len(made_while_down)
    # No record lost or duplicated: the store and Ray each hold the job exactly once.
    listed = [j.job_id for j in env.admin.list_all()]
    assert listed.count(job_id) == 1
    ray_jobs = [j for j in env.ray._client.list_jobs() if j.submission_id == job_id]
    assert len(ray_jobs) == 1
    # The watcher reconnected by sequence number: 1..N, no gap, no repeat, terminal last.
    assert watcher.error is None and watcher.reconnects >= 1
    sequences = _sequences(watcher.events)
    assert sequences == list(range(1, len(sequences) + 1))
    assert watcher.events[-1].state_change.state == pb.JOB_STATE_SUCCEEDED
    steps = [e.metrics.step for e in watcher.events if e.HasField("metrics")]
    assert steps == sorted(steps) and steps[-1] == STEPS and len(set(steps)) == len(steps)
    assert steps == list(range(10, STEPS + 1, 10)), "a metrics record was lost"
    # Metrics resumed: the restarted process (an empty registry) exports the job again.
    assert _metric_value(scrape(env.service.metrics_port), "zerotrain_training_step", job_id) == STEPS
    # Checkpoints stayed inside the data dir, named by the job id (not the hostile name).
    assert job.checkpoint.path == str(env.run_dir(job_id) / f"checkpoint_{STEPS:08d}")
    assert not (env.run_dir(job_id).parent / SPEC["name"]).resolve().exists()


def test_worker_sigkill_resumes_exactly(env: Env, job_a: dict[str, Any]) -> None:
    job_id = env.submit(spec_with())
    watcher = RawWatcher(env.service.address, TOKENS["alice"], job_id)
    watcher.start()

    first = wait_for_checkpoint(env, job_id, CHECKPOINT_EVERY)
    victim = env.worker_pid(job_id, 1, 1)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    job = env.wait_state(job_id, {JobState.SUCCEEDED, JobState.FAILED})
    watcher.join(timeout=60)
    FIGURES["worker_kill_to_success_s"] = round(time.monotonic() - killed_at, 1)

    assert job.state == JobState.SUCCEEDED, job.state_reason
    # The restart is visible: GetJob, WatchJob (a state event and attempt-2 records), metrics.
    assert job.attempt == 2
    assert env.worker_pid(job_id, 2, 1) != victim
    restarts = [
        e for e in watcher.events
        if e.HasField("state_change") and e.state_change.state == pb.JOB_STATE_RUNNING
        and e.attempt == 2
    ]  # fmt: skip
    assert len(restarts) == 1 and "attempt 2" in restarts[0].state_change.reason
    resumed = [e.metrics.step for e in watcher.events if e.HasField("metrics") and e.attempt == 2]
    assert resumed and resumed[0] > first, "attempt 2 did not resume from a checkpoint"
    assert resumed[-1] == STEPS
    page = scrape(env.service.metrics_port)
    assert _metric_value(page, "zerotrain_training_attempt", job_id) == 2
    assert _metric_value(page, "zerotrain_training_restarts_total", job_id) == 1
    # Exact resume: bit-identical to job A, which ran the same spec without a fault.
    resumed_params = _final_params(env.run_dir(job_id))
    for name, expected in _final_params(env.run_dir(job_a["job_id"])).items():
        assert torch.equal(resumed_params[name], expected), name
    # No process of the finished job is left behind.
    _wait_no_processes(job_id, 10)


def test_cancel_leaves_no_process_and_frees_resources(env: Env) -> None:
    """Cancel mid-run: within 10 s no process of the job is left (by the process
    table, not Ray's word); the next job gets the CPUs and fails with its task's error."""
    job_id = env.submit(spec_with(training={"max_steps": 1_000_000, "checkpoint_every": 0}))
    def training() -> bool:
        metrics = env.client.get(job_id).latest_metrics
        return metrics is not None and metrics["step"] >= 10

    wait_for(training, 300, f"job {job_id} to train")
    processes = job_processes(job_id)
    pids = {p.pid for p in processes}
    assert {env.worker_pid(job_id, 1, r) for r in (0, 1)} <= pids, "workers not found by env"
    cancelled_at = time.monotonic()
    assert env.client.cancel(job_id).state in (JobState.CANCELLING, JobState.CANCELLED)
    shared_host = _ray_clusters_on_host() > 1
    _wait_no_processes(job_id, 10, ignore=(PG_CLEANER,) if shared_host else ())
    FIGURES["cancel_to_no_process_s"] = round(time.monotonic() - cancelled_at, 2)
    FIGURES["cancel_ray_clusters_on_host"] = _ray_clusters_on_host()
    FIGURES["cancel_detached_pg_cleaner_left"] = bool(job_processes(job_id))
    FIGURES["cancel_processes_checked"] = len(pids)
    job = env.wait_state(job_id, {JobState.CANCELLED}, timeout_s=30)
    FIGURES["cancel_to_cancelled_state_s"] = round(time.monotonic() - cancelled_at, 2)
    assert job.state_reason == "cancelled by request"
    with pytest.raises(ApiError) as err:
        env.client.cancel(job_id)
    assert err.value.code.name == "FAILED_PRECONDITION"

    # A job that can never be scheduled is refused at once with the reason; nothing stored.
    before = [j.job_id for j in env.admin.list_all()]
    with pytest.raises(ApiError) as err:
        env.client.submit(spec_with(scaling={"num_workers": 3, "cpus_per_worker": 1}))
    assert err.value.code.name == "FAILED_PRECONDITION"
    assert "can never run this job" in err.value.details and "3 workers" in err.value.details
    assert [j.job_id for j in env.admin.list_all()] == before

    # The freed CPUs run the next job (all of them: 2 workers x 1 CPU), whose task raises.
    failing = env.submit(
        spec_with(
            task="faulty_tasks:raising_regression",
            task_args={},
            training={"max_failures": 0, "checkpoint_every": 0},
        )
    )
    job = env.wait_state(failing, {JobState.FAILED, JobState.SUCCEEDED}, timeout_s=300)
    assert job.state == JobState.FAILED
    assert "faulty task: injected failure at step 3" in job.state_reason, job.state_reason
    assert job.started_at is not None and job.started_at >= 1  # it did get its workers
    _wait_no_processes(failing, 10)


def test_corrupted_checkpoint_is_detected_never_loaded(env: Env) -> None:
    """Truncate / bit-flip checkpoint files, then kill a worker: the restart refuses them
    (checksums) and the job fails with that reason instead of training on corrupt state."""
    job_id = env.submit(spec_with(training={"max_failures": 1}))
    wait_for_checkpoint(env, job_id, 2 * CHECKPOINT_EVERY)
    run_dir = env.run_dir(job_id)
    checkpoints = sorted(run_dir.glob("checkpoint_0*"))
    assert len(checkpoints) >= 2
    for i, checkpoint in enumerate(checkpoints):
        target = checkpoint / "model.pt"  # not covered by the optimizer's own manifest
        data = bytearray(target.read_bytes())
        if i % 2:
            data[len(data) // 2] ^= 0x01  # a single flipped bit
        else:
            del data[len(data) // 2 :]  # torn
        target.write_bytes(bytes(data))
    os.kill(env.worker_pid(job_id, 1, 1), signal.SIGKILL)
    job = env.wait_state(job_id, {JobState.FAILED, JobState.SUCCEEDED}, timeout_s=300)
    assert job.state == JobState.FAILED, "the job resumed from a corrupted checkpoint"
    assert "model.pt is corrupted (SHA-256 mismatch" in job.state_reason, job.state_reason
    assert job.latest_metrics["attempt"] == 1, "training went on after the corrupt load"
    _wait_no_processes(job_id, 10)


def test_failed_checkpoint_write_fails_the_job_and_keeps_earlier_ones(env: Env) -> None:
    """The run directory turns read-only mid-job (a read-only bind mount; root ignores
    file modes, so chmod would prove nothing): the next checkpoint cannot be written, the
    job fails with a clear reason, and the checkpoint written before stays loadable."""
    from zerotrain.service.runtime.worker import verify_checksums

    job_id = env.submit(spec_with(training={"max_failures": 0}))
    wait_for_checkpoint(env, job_id, CHECKPOINT_EVERY)
    run_dir = env.run_dir(job_id)
    mounted = _read_only(run_dir)
    try:
        job = env.wait_state(job_id, {JobState.FAILED, JobState.SUCCEEDED}, timeout_s=300)
    finally:
        if mounted:
            subprocess.run(["umount", str(run_dir)], check=True)
    assert job.state == JobState.FAILED
    reason = job.state_reason
    assert "Read-only file system" in reason or "Not a directory" in reason, reason
    # The last checkpoint it reported was written before the fault, and is intact.
    first = job.checkpoint.step
    assert CHECKPOINT_EVERY <= first < STEPS and job.latest_metrics["step"] < STEPS
    earlier = run_dir / f"checkpoint_{first:08d}"
    verify_checksums(earlier)  # every file of the earlier checkpoint is intact
    torch.load(earlier / "model.pt")
    FIGURES["read_only_mechanism"] = "bind mount" if mounted else "file blocking the directory"


def _read_only(run_dir: Path) -> bool:
    """Make ``run_dir`` read-only with a bind mount; where mounting is not permitted, put
    files where every later checkpoint directory must be created. True if mounted."""
    bind = subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], capture_output=True)
    if bind.returncode == 0:
        remount = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(run_dir)], capture_output=True
        )
        if remount.returncode == 0:
            return True
        subprocess.run(["umount", str(run_dir)], check=True)
    for step in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY):
        blocker = run_dir / f"checkpoint_{step:08d}"
        if not blocker.exists():
            blocker.write_text("not a directory")
    return False


def test_ray_cluster_going_away_fails_its_jobs_with_the_reason(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A Ray cluster SIGKILLed under a running job: the job does not stay RUNNING
    forever; once Ray has been unreachable for ``cluster_lost_after_s`` it is FAILED
    with the reason. (Its own small cluster; the job is a real Ray job, no training.)"""
    temp = Path(tempfile.mkdtemp(prefix="ztgone-", dir="/tmp"))
    head = start_local_ray(temp, num_cpus=1)
    data_dir = tmp_path_factory.mktemp("gone")
    options = {"cluster_lost_after_s": 3.0}
    try:
        with serve_manager(data_dir, head, entrypoint="sleep 600", manager_options=options) as s:
            stub = s.stub()
            job = stub.SubmitJob(
                pb.SubmitJobRequest(spec=job_spec_message()), metadata=bearer("alice"), timeout=30
            )
            wait_for(
                lambda: s.manager.get(job.job_id).state.value == "RUNNING", 120, "the job to run"
            )
            tree = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
            for proc in tree:  # the whole cluster dies at once
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            gone_at = time.monotonic()
            record = wait_for(
                lambda: (r := s.manager.get(job.job_id)).state.value == "FAILED" and r,
                60,
                "the job to fail after the cluster went away",
            )
            FIGURES["cluster_gone_to_failed_s"] = round(time.monotonic() - gone_at, 1)
            assert "lost contact with the Ray cluster" in record.state_reason
            assert s.manager.reconciliation_errors > 0
            reply = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=bearer("alice"))
            assert reply.state == pb.JOB_STATE_FAILED and reply.state_reason == record.state_reason
            assert health_status(s.port) == 1  # the service itself stays up
    finally:
        head.shutdown(timeout_s=5)
        shutil.rmtree(temp, ignore_errors=True)
