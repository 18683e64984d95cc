"""End to end over gRPC: a real server on an ephemeral port, a real local Ray, the real runtime.

Jobs train the digits task with sharded Nadam on 2 Ray Train workers for a few
steps; the workers push their metrics records back through ReportMetrics with
their per-job ingest token.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from api_support import TOKENS, hermetic_client_env, make_auth, make_pki  # noqa: F401
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zerotrain.service import cli
from zerotrain.service.auth import Authenticator
from zerotrain.service.client import ApiError, JobClient
from zerotrain.service.jobs import JobManager
from zerotrain.service.model import JobEvent, JobState
from zerotrain.service.ray_jobs import RayJobs
from zerotrain.service.server import create_server, stop_server
from zerotrain.service.store import JobStore

pytestmark = pytest.mark.ray


def job_spec(name: str, max_steps: int, **training) -> dict:
    return {
        "name": name,
        "task": "digits",
        "task_args": {"hidden": 32, "depth": 1},
        "labels": {"suite": "api-lifecycle"},
        "optimizer": {"algorithm": "nadam", "lr": 0.01},
        # Eager optimizer step: the fused one's torch.compile start-up (~5 s a
        # worker) is tested in tests/runtime.
        "sharding": {"engine": "native", "stage": 2, "compile": False},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "training": {"max_steps": max_steps, "batch_size": 16, "metrics_every": 5,
                     "checkpoint_every": 10, **training},
    }  # fmt: skip


@dataclass
class Api:
    """One running service instance (manager + gRPC server) over a store and Ray."""

    manager: JobManager
    server: grpc.Server
    port: int

    def client(self, who: str = "alice") -> JobClient:
        return JobClient(f"127.0.0.1:{self.port}", token=TOKENS[who], timeout_s=30)

    def stop(self) -> None:
        stop_server(self.server, grace=0.5)
        self.manager.stop()
        self.manager.store.close()


def start_api(data_dir: Path, ray: RayJobs, auth: Authenticator, port: int = 0) -> Api:
    """What Service.start does, with a store and Ray we choose (and a fixed port on restart)."""
    manager = JobManager(
        JobStore(data_dir / "jobs.db"),
        ray,
        data_dir=data_dir,
        ingest_token=auth.ingest_token_for,
        reconcile_interval_s=0.5,
    )
    server, bound = create_server(f"127.0.0.1:{port}", manager, auth=auth)
    manager.ingest_address = f"127.0.0.1:{bound}"
    manager.start()
    return Api(manager, server, bound)


@pytest.fixture(scope="module")
def ray_jobs(ray_cluster: str) -> RayJobs:
    return RayJobs(ray_cluster)


@pytest.fixture(scope="module")
def api(ray_jobs: RayJobs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    instance = start_api(tmp_path_factory.mktemp("api"), ray_jobs, make_auth())
    yield instance
    instance.stop()


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def _state(api: Api, job_id: str) -> JobState | None:
    try:
        return api.client().get(job_id).state
    except ApiError as exc:
        assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
        return None


def kinds(events: list[JobEvent]) -> list[str]:
    return [e.state.value if e.kind == "state" else "metrics" for e in events]


def test_full_lifecycle_with_metrics_logs_and_resumed_watch(api: Api, capsys):
    client = api.client()
    job = client.submit(job_spec("lifecycle", max_steps=20))
    assert job.state in (JobState.PENDING, JobState.RUNNING) and job.owner == "alice"

    # A first watcher stops after three events; a second resumes from the last
    # sequence it saw; together they must equal one uninterrupted watch.
    first = []
    for event in client.watch(job.job_id):
        first.append(event)
        if len(first) == 3:
            break
    rest = list(client.watch(job.job_id, from_sequence=first[-1].sequence))
    whole = list(client.watch(job.job_id))
    assert first + rest == whole
    assert [e.sequence for e in whole] == list(range(1, len(whole) + 1))
    names = kinds(whole)
    assert names[:2] == ["PENDING", "RUNNING"] and names[-1] == "SUCCEEDED"
    steps = [e.metrics["step"] for e in whole if e.kind == "metrics"]
    assert steps == sorted(steps) and steps[-1] == 20 and len(steps) >= 4
    assert whole[-2].kind == "metrics" and whole[-2].metrics["final"]  # final record, then terminal

    done = client.get(job.job_id)
    assert done.state == JobState.SUCCEEDED and done.attempt == 1
    m = done.latest_metrics
    assert m["final"] and m["step"] == 20 and m["world_size"] == 2
    assert 0.0 < m["loss"] < 3.0 and 0.0 <= m["accuracy"] <= 1.0 and m["samples_per_second"] > 0
    assert set(m["phase_seconds"]) >= {"forward", "backward", "optimizer"}
    assert "grad_norm" in m["optimizer"] and len(m["state_bytes_per_rank"]) == 2
    assert done.checkpoint is not None and done.checkpoint.step == 20
    assert done.finished_at >= done.started_at > 0
    logs = list(client.logs(job.job_id))
    assert any("ZEROTRAIN_METRICS" in line for line in logs), logs[-20:]
    # A watch that starts after the end replays everything and ends.
    assert list(client.watch(job.job_id, from_sequence=whole[-1].sequence)) == []
    # bob cannot see it; the admin can.
    with pytest.raises(ApiError) as info:
        api.client("bob").get(job.job_id)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert api.client("root").get(job.job_id).job_id == job.job_id

    # trainctl against the same server.
    def trainctl(*argv: str) -> tuple[int, str]:
        code = cli.main(["--address", f"127.0.0.1:{api.port}", "--token", TOKENS["alice"], *argv])
        return code, capsys.readouterr().out

    code, out = trainctl("watch", job.job_id)
    assert code == 0 and "SUCCEEDED" in out and "step 20" in out and "accuracy" in out
    code, out = trainctl("get", job.job_id)
    assert code == 0 and job.job_id in out and "20 / 20" in out
    code, out = trainctl("list", "--label", "suite=api-lifecycle")
    assert code == 0 and job.job_id in out
    code, out = trainctl("logs", job.job_id)
    assert code == 0 and "ZEROTRAIN_METRICS" in out
    assert "\x1b[" not in out  # not a terminal: Ray's colour codes are stripped
    assert trainctl("cancel", job.job_id)[0] == 6  # finished: FAILED_PRECONDITION


def test_cancel_idempotency_and_unschedulable(api: Api):
    client = api.client()
    job = client.submit(job_spec("to-cancel", max_steps=100_000), idempotency_key="cancel-me")
    again = client.submit(job_spec("to-cancel", max_steps=100_000), idempotency_key="cancel-me")
    assert again.job_id == job.job_id
    wait_for(lambda: client.get(job.job_id).state == JobState.RUNNING, what="RUNNING")
    cancelled = client.cancel(job.job_id)
    assert cancelled.state in (JobState.CANCELLING, JobState.CANCELLED)
    events = list(client.watch(job.job_id))
    assert kinds(events)[-1] == "CANCELLED"
    with pytest.raises(ApiError) as info:
        client.cancel(job.job_id)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION

    # A job the cluster can never run is refused with the reason, and not stored.
    before = [j.job_id for j in client.list_all()]
    with pytest.raises(ApiError) as info:
        client.submit(job_spec("too-big", max_steps=5) | {"scaling": {"num_workers": 64}})
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "never" in info.value.details and "CPU" in info.value.details
    assert [j.job_id for j in client.list_all()] == before


def test_service_restart_mid_job(ray_jobs: RayJobs, tmp_path: Path):
    auth = make_auth()
    first = start_api(tmp_path, ray_jobs, auth)
    port = first.port
    client = first.client()
    job = client.submit(job_spec("restart", max_steps=30))

    # One watch() stays open across the restart: the client reconnects and
    # resumes by sequence number.
    events: list[JobEvent] = []
    training = threading.Event()

    def watcher() -> None:
        for event in client.watch(job.job_id):
            events.append(event)
            if event.kind == "metrics":
                training.set()

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    assert training.wait(120), f"no metrics before the restart: {kinds(events)}"
    first.stop()  # the workers keep training and buffer their records meanwhile

    # Same data dir, same port and ingest secret: the job is re-attached.
    second = start_api(tmp_path, ray_jobs, auth, port=port)
    try:
        # Fresh calls fail fast until the channel's reconnect backoff (the port was
        # refusing connections a moment ago) lets it through: retry briefly.
        assert wait_for(lambda: _state(second, job.job_id), 30, "the restarted server") == (
            JobState.RUNNING
        )
        thread.join(180)
        assert not thread.is_alive(), f"watch did not end: {kinds(events)}"
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert kinds(events)[-1] == "SUCCEEDED"
        done = second.client().get(job.job_id)
        assert done.latest_metrics["final"] and done.latest_metrics["step"] == 30
        # Tracked once: not lost, not duplicated.
        assert [j.job_id for j in second.client().list_all()] == [job.job_id]
    finally:
        second.stop()
        client.close()


def test_serve_command_with_tokens_and_tls(ray_cluster: str, tmp_path: Path, capsys):
    pki = make_pki().write(tmp_path)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  - {{token: {TOKENS['alice']}, principal: alice}}\n")
    env = {
        **os.environ,
        "ZEROTRAIN_DATA_DIR": str(tmp_path / "data"),
        "ZEROTRAIN_TOKENS_FILE": str(tokens),
        "ZEROTRAIN_TLS_CERT": str(pki["server_cert"]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "zerotrain.service", "serve", "--address", "127.0.0.1:0",
         "--metrics-port", "-1", "--health-port", "0", "--ray-address", ray_cluster,
         "--tls-key", str(pki["server_key"])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("zerotrain: serving on 127.0.0.1:"), (line, proc.stderr.read())
        address = line.split()[-1]
        credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
        with grpc.secure_channel(address, credentials) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        base = ["--address", address, "--ca", str(pki["ca"])]
        assert cli.main([*base, "--token", TOKENS["alice"], "list"]) == 0
        assert cli.main([*base, "--token", "wrong-token-0123456789", "list"]) == 4
        plaintext = ["--address", address, "--token", TOKENS["alice"], "list"]
        assert cli.main(plaintext) == 5  # the server speaks TLS only
        # Token rotation: SIGHUP re-reads the tokens file.
        tokens.write_text(f"tokens:\n  - {{token: {TOKENS['bob']}, principal: bob}}\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: cli.main([*base, "--token", TOKENS["bob"], "list"]) == 0, 20, "reload")
        assert cli.main([*base, "--token", TOKENS["alice"], "list"]) == 4
        capsys.readouterr()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        assert "zerotrain: SIGTERM: stopping" in stdout and stdout.endswith("zerotrain: stopped\n")
        assert TOKENS["alice"] not in stdout + stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
