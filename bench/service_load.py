"""Service under load: 64 concurrent clients against a real server over a real Ray.

A real service (``python -m zerotrain.service serve``: token auth, SQLite store, metrics)
runs in its own process over a private local Ray head. Its store is seeded with
finished jobs (so reads have data), then client *processes* (threads inside,
one channel each) loop for a fixed time over a mix of rpcs:

    GetJob 55% | ListJobs (page of 50) 20% | WatchJob replay of a finished job 20%
    | SubmitJob + CancelJob of a short job 5% (capped: ``--submits``)

Each client pauses between calls (exponential, mean ``--think-ms``, 250 ms: about
250 rpc/s from 64 clients); ``--think-ms 0`` is a closed loop that saturates the
server and so measures its capacity, not its latency.

Every submitted job is a real Ray job running the real runtime (regression,
1 worker, a few steps). Half are cancelled right after the submit, half run to
the end. Each submitted job gets its own watcher that must see every state
transition the store records for it. The server's RSS is sampled throughout.

Then the *stream hog*: a second principal opens WatchJob streams on its own
running job until the server refuses it (it holds its ``--max-streams-per-principal``
and keeps asking for more), while other clients call GetJob for ``--hog-seconds``.
None of their calls may be refused; their p99 is recorded (target: under 50 ms
on a quiet machine).

Then, on the quiet cluster, the time from SubmitJob to the first training step
(the worker's timestamp of its step-1 record) against a bare Ray Train
``TorchTrainer.fit()`` of the same job from a fresh driver process (spawn to
step-1 record), alternating, ``--repeats`` times each.

    python bench/service_load.py [--seconds 45] [--clients 4] [--threads 16] [--think-ms 250]
    python bench/service_load.py --hog-only [--hog-seconds 30]   # the stream hog alone

Writes bench/results/service_load.json and prints a table. About 3-4 minutes on a loaded
2-core machine (45 s of load, the submitted jobs draining, 2 x --repeats startups).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "service_load.json"
HOG_RESULTS = REPO / "bench" / "results" / "service_load_stream_hog.json"
# One principal ("bench") stands for all 64 load clients, so it gets more than a user's
# default budget; the stream hog ("hog") keeps the defaults.
SERVER_LIMITS = ("--max-calls-per-principal", "64", "--max-streams-per-principal", "32")
TOKEN = "bench-load-token-0123456789abcdef"
HOG_TOKEN = "bench-hog-token-0123456789abcdef0"
HOG_JOB = "j-hog-running"
SEEDED_JOBS = 200
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
SHORT_JOB = {
    "name": "load-short",
    "task": "regression",
    "task_args": {"hidden": 32, "num_samples": 512},
    "labels": {"suite": "load"},
    "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
    "training": {"max_steps": 3, "batch_size": 16, "metrics_every": 1, "checkpoint_every": 0},
}
STARTUP_JOB = {**SHORT_JOB, "name": "load-startup", "training": {**SHORT_JOB["training"],
               "max_steps": 2}}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metadata() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKEN}"),)


def _stub(port: int) -> Any:
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc

    return pb_grpc.JobServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


# --------------------------------------------------------------------- server
def _seed_store(data_dir: Path) -> tuple[list[str], int]:
    """Finished jobs with a few events each, written before the server starts."""
    from zerotrain.service.model import JobRecord, JobState
    from zerotrain.service.spec import JobSpec
    from zerotrain.service.store import JobStore

    store = JobStore(data_dir / "jobs.db")
    spec = JobSpec.from_dict(SHORT_JOB)
    ids = []
    now = time.time()
    for i in range(SEEDED_JOBS):
        job_id = f"j-seed{i:05d}"
        record = JobRecord(
            job_id=job_id, owner="bench", spec=spec, state=JobState.PENDING, state_reason="seeded",
            created_at=now - i, updated_at=now - i, started_at=None, finished_at=None, attempt=0,
            latest_metrics=None, checkpoint=None, idempotency_key=None, ray_job_id=None,
        )  # fmt: skip
        store.create_job(record)
        store.update_job(job_id, now=now, state=JobState.RUNNING, reason="started", attempt=1)
        for step in (1, 2, 3):
            store.append_metrics(
                job_id, {"step": step, "attempt": 1, "loss": 1.0 / step, "time": now},
                now=now, attempt=1, checkpoint=None, append_event=True,
            )  # fmt: skip
        store.update_job(
            job_id, now=now, state=JobState.SUCCEEDED, reason="finished", finished_at=now
        )
        ids.append(job_id)
    events = store.last_sequence(ids[0])  # PENDING, RUNNING, 3 metrics, SUCCEEDED
    # The stream hog's own job: RUNNING (its watch streams stay open), never given to Ray.
    store.create_job(JobRecord(
        job_id=HOG_JOB, owner="hog", spec=spec, state=JobState.RUNNING, state_reason="seeded",
        created_at=now, updated_at=now, started_at=now, finished_at=None, attempt=1,
        latest_metrics=None, checkpoint=None, idempotency_key=None, ray_job_id=HOG_JOB,
    ))  # fmt: skip
    store.close()
    return ids, events


class Server:
    """``python -m zerotrain.service serve`` over the given Ray head, RSS sampled in a thread."""

    def __init__(self, data_dir: Path, ray_address: str) -> None:
        tokens = data_dir / "tokens.yaml"
        tokens.write_text(f"tokens:\n  - token: {TOKEN}\n    principal: bench\n"
                          f"  - token: {HOG_TOKEN}\n    principal: hog\n")  # fmt: skip
        tokens.chmod(0o600)
        self.port = _free_port()
        self.log = data_dir / "service.log"
        args = [
            sys.executable, "-m", "zerotrain.service", "serve", "--address", f"127.0.0.1:{self.port}",
            "--metrics-port", "-1", "--data-dir", str(data_dir), "--ray-address", ray_address,
            "--tokens-file", str(tokens), "--log-level", "WARNING", "--health-port", "0",
            *SERVER_LIMITS,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "zerotrain: serving on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.rss: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        proc = psutil.Process(self.proc.pid)
        t0 = time.monotonic()
        while not self._stop.wait(0.5):
            try:
                self.rss.append((round(time.monotonic() - t0, 1), proc.memory_info().rss))
            except psutil.NoSuchProcess:
                return

    def stop(self) -> None:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -------------------------------------------------------------------- clients
def _client(port: int, threads: int, seconds: float, seed: int, seeded: list[str],
            replay_events: int, think_s: float, submit_budget: Any, out: Any) -> None:  # fmt: skip
    """Client process: ``threads`` threads, each with its own channel, for ``seconds``."""
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
    from zerotrain.service.convert import spec_to_proto
    from zerotrain.service.spec import JobSpec

    spec_msg = spec_to_proto(JobSpec.from_dict(SHORT_JOB))
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    submitted: list[tuple[str, bool]] = []  # (job id, cancelled)
    submits_made = [seed % 2]  # alternate across clients too
    deadline = time.monotonic() + seconds

    def record(rpc: str, began: float) -> None:
        with lock:
            latencies.setdefault(rpc, []).append(time.perf_counter() - began)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        stub = _stub(port)
        md = _metadata()
        while time.monotonic() < deadline:
            if think_s > 0:  # paced clients: exponential think time between calls
                time.sleep(rng.expovariate(1.0 / think_s))
            roll = rng.random()
            try:
                if roll < 0.05 and submit_budget.acquire(block=False):
                    began = time.perf_counter()
                    job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec_msg), metadata=md,
                                         timeout=30)  # fmt: skip
                    record("SubmitJob", began)
                    with lock:
                        submits_made[0] += 1
                        cancel = submits_made[0] % 2 == 1  # every other job of this client
                    if cancel:
                        time.sleep(rng.uniform(0.0, 2.0))
                        began = time.perf_counter()
                        try:
                            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=md,
                                           timeout=30)  # fmt: skip
                        except grpc.RpcError as exc:  # finished before the cancel: documented
                            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                                raise
                        record("CancelJob", began)
                    with lock:
                        submitted.append((job.job_id, cancel))
                elif roll < 0.60:
                    began = time.perf_counter()
                    stub.GetJob(pb.GetJobRequest(job_id=rng.choice(seeded)), metadata=md,
                                timeout=30)  # fmt: skip
                    record("GetJob", began)
                elif roll < 0.80:
                    began = time.perf_counter()
                    stub.ListJobs(pb.ListJobsRequest(page_size=50), metadata=md, timeout=30)
                    record("ListJobs", began)
                else:
                    began = time.perf_counter()
                    events = list(
                        stub.WatchJob(pb.WatchJobRequest(job_id=rng.choice(seeded)),
                                      metadata=md, timeout=30)
                    )
                    record("WatchJob", began)
                    if len(events) != replay_events:
                        with lock:
                            errors.append(
                                f"WatchJob replay: {len(events)} events, expected {replay_events}"
                            )
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{exc.code().name}: {exc.details()}")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put({"latencies": latencies, "errors": errors, "submitted": submitted})


class JobWatcher(threading.Thread):
    """Follows one submitted job from sequence 0 to its terminal state."""

    def __init__(self, port: int, job_id: str) -> None:
        super().__init__(daemon=True)
        self.port, self.job_id = port, job_id
        self.states: list[str] = []
        self.error = ""

    def run(self) -> None:
        from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
        from zerotrain.service.convert import state_name

        try:
            for event in _stub(self.port).WatchJob(
                pb.WatchJobRequest(job_id=self.job_id), metadata=_metadata(), timeout=240
            ):
                if event.HasField("state_change"):
                    self.states.append(state_name(event.state_change.state))
        except grpc.RpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"


def _canonical_states(port: int, job_id: str) -> list[str]:
    """The job's state transitions as the store holds them (a fresh replay after the end)."""
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
    from zerotrain.service.convert import state_name

    events = _stub(port).WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=_metadata(),
                                  timeout=60)  # fmt: skip
    return [state_name(e.state_change.state) for e in events if e.HasField("state_change")]


# ----------------------------------------------------------------- stream hog
def _getjob_client(port: int, threads: int, seconds: float, seed: int, seeded: list[str],
                   think_s: float, out: Any) -> None:  # fmt: skip
    """Client process: GetJob only, ``threads`` threads with a channel each."""
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb

    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        stub, md = _stub(port), _metadata()
        while time.monotonic() < deadline:
            if think_s > 0:
                time.sleep(rng.expovariate(1.0 / think_s))
            began = time.perf_counter()
            try:
                stub.GetJob(pb.GetJobRequest(job_id=rng.choice(seeded)), metadata=md,
                            timeout=30)  # fmt: skip
                with lock:
                    latencies.append(time.perf_counter() - began)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{exc.code().name}: {exc.details()}")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put({"latencies": latencies, "errors": errors})


def _hog(port: int, seconds: float, ready: Any, out: Any) -> None:
    """The stream hog (its own process): open WatchJob streams on its running job until
    refused, then keep asking for more for ``seconds``; report what it held and was told."""
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc

    hog_md = (("authorization", f"Bearer {HOG_TOKEN}"),)
    channels: list[grpc.Channel] = []
    held: list[Any] = []
    refused: dict[str, int] = {}

    def open_stream() -> bool:
        if len(held) % 16 == 0 and len(channels) <= len(held) // 16:  # 32 streams a connection
            channels.append(grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]))  # fmt: skip
        call = pb_grpc.JobServiceStub(channels[-1]).WatchJob(
            pb.WatchJobRequest(job_id=HOG_JOB), metadata=hog_md, timeout=seconds + 120
        )
        try:
            next(call)  # the job's first event: the stream is open
        except grpc.RpcError as exc:
            key = f"{exc.code().name}: {(exc.details() or '')[:100]}"
            refused[key] = refused.get(key, 0) + 1
            return False
        held.append(call)
        return True

    while open_stream():  # until the server says no
        pass
    ready.put(len(held))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # and keeps asking while the others work
        open_stream()
        time.sleep(0.05)
    out.put({"held": len(held), "refused": refused})
    for call in held:
        call.cancel()


def run_stream_hog(port: int, seeded: list[str], seconds: float, clients: int, threads: int,
                   think_s: float) -> dict:  # fmt: skip
    """One principal holds every stream it may (and asks for more); others call GetJob."""
    ctx = mp.get_context("spawn")
    ready, hog_out, queue = ctx.Queue(), ctx.Queue(), ctx.Queue()
    hog = ctx.Process(target=_hog, args=(port, seconds + 5, ready, hog_out))
    hog.start()
    ready.get(timeout=120)
    procs = [ctx.Process(target=_getjob_client,
                         args=(port, threads, seconds, 100 + i, seeded, think_s, queue))
             for i in range(clients)]  # fmt: skip
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    hogged = hog_out.get(timeout=seconds + 120)
    hog.join(timeout=30)
    latencies = [v for r in results for v in r["latencies"]]
    errors = [e for r in results for e in r["errors"]]
    p99 = _pct(latencies, 0.99) * 1e3
    return {
        "config": {"seconds": seconds, "clients": clients * threads, "think_ms": think_s * 1e3},
        "hog_streams_held": hogged["held"],
        "hog_refusals": hogged["refused"],
        "others_getjob": {
            "calls": len(latencies),
            "p50_ms": round(_pct(latencies, 0.50) * 1e3, 2),
            "p99_ms": round(p99, 2),
            "max_ms": round(max(latencies, default=float("nan")) * 1e3, 2),
            "refused_or_failed": len(errors),
            "error_samples": errors[:10],
        },
        "targets": {
            "others_none_refused": not errors and bool(latencies),
            "others_getjob_p99_under_50ms": p99 < 50,
        },
    }


# ------------------------------------------------------------------- startup
def _first_step_via_service(port: int) -> float:
    """SubmitJob -> the worker's timestamp of its step-1 record (seconds)."""
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
    from zerotrain.service.convert import spec_to_proto
    from zerotrain.service.spec import JobSpec

    stub = _stub(port)
    began = time.time()
    job = stub.SubmitJob(
        pb.SubmitJobRequest(spec=spec_to_proto(JobSpec.from_dict(STARTUP_JOB))),
        metadata=_metadata(), timeout=30,
    )  # fmt: skip
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=_metadata(),
                               timeout=240):  # fmt: skip
        if event.HasField("metrics") and event.metrics.step == 1:
            return event.metrics.time.ToNanoseconds() / 1e9 - began
    raise RuntimeError(f"job {job.job_id} ended without a step-1 record")


_BARE_DRIVER = """
import json, sys, time
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from zerotrain.service.runtime.worker import train_loop_per_worker
from zerotrain.service.spec import JobSpec
spec, storage, metrics = JobSpec.from_dict(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]
ray.init(address="auto")
TorchTrainer(
    train_loop_per_worker,
    train_loop_config={"spec": spec.to_dict(), "job_id": "bare", "storage": storage,
                       "metrics_file": metrics},
    torch_config=TorchConfig(backend="gloo"),
    scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
    run_config=RunConfig(name=f"bare-{time.time_ns()}", storage_path=storage),
).fit()
"""


def _gcs_address(head_pid: int) -> str:
    """host:port of the head's GCS (what a driver's ``ray.init`` connects to)."""
    for proc in psutil.Process(head_pid).children(recursive=True):
        args = proc.cmdline()
        port = [a.split("=", 1)[1] for a in args if a.startswith("--gcs_server_port=")]
        host = [a.split("=", 1)[1] for a in args if a.startswith("--node-ip-address=")]
        if port and host:
            return f"{host[0]}:{port[0]}"
    raise RuntimeError(f"no gcs_server under Ray head pid {head_pid}")


def _first_step_bare(ray_address: str, storage: Path, env: dict[str, str]) -> float:
    """A fresh driver process running TorchTrainer.fit() of the same job: spawn -> step 1."""
    metrics = storage / f"bare-{time.time_ns()}.jsonl"
    began = time.time()
    subprocess.run(
        [sys.executable, "-c", _BARE_DRIVER, json.dumps(STARTUP_JOB), str(storage), str(metrics)],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record["step"] == 1:
            return record["time"] - began
    raise RuntimeError("bare run wrote no step-1 record")


# ---------------------------------------------------------------------- main
def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _start_hog_job(head: Any) -> None:
    """A Ray job that only sleeps behind the hog's seeded RUNNING job, so it stays RUNNING."""
    from zerotrain.service.ray_jobs import RayJobs

    RayJobs(head.address, token=head.token).submit(HOG_JOB, "sleep 3600")


def run_hog_only(seconds: float, clients: int, threads: int, think_s: float) -> dict:
    """Only the stream-hog scenario (a Ray head is still started: the service needs one)."""
    from zerotrain.service.local_ray import start_local_ray

    load_at_start = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="ztload-", dir="/tmp"))
    head = start_local_ray(root / "ray", num_cpus=2)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(head.temp_dir / "auth_token")
    data_dir = root / "data"
    data_dir.mkdir()
    seeded, _ = _seed_store(data_dir)
    _start_hog_job(head)
    server = Server(data_dir, head.address)
    try:
        time.sleep(2.0)
        hog = run_stream_hog(server.port, seeded, seconds, clients, threads, think_s)
    finally:
        server.stop()
        head.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu_model(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m_start": round(load_at_start, 1),
                    "load_average_1m": round(os.getloadavg()[0], 1)},
        "stream_hog": hog,
    }


def run(
    seconds: float, clients: int, threads: int, submits: int, repeats: int, think_s: float,
    hog: dict[str, Any],
) -> dict:
    from zerotrain.service.local_ray import start_local_ray

    load_at_start = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="ztload-", dir="/tmp"))
    head = start_local_ray(root / "ray", num_cpus=2)
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(root / "ray" / "auth_token"),
           "RAY_AUTH_MODE": "token", "RAY_ADDRESS": _gcs_address(head.pid)}
    (root / "bare").mkdir()
    os.environ["RAY_AUTH_TOKEN_PATH"] = env["RAY_AUTH_TOKEN_PATH"]
    data_dir = root / "data"
    data_dir.mkdir()
    seeded, replay_events = _seed_store(data_dir)
    _start_hog_job(head)
    server = Server(data_dir, head.address)
    try:
        time.sleep(2.0)  # settle: RSS baseline
        rss_before = server.rss[-1][1]
        budget = mp.get_context("spawn").Semaphore(submits)
        queue = mp.get_context("spawn").Queue()
        procs = [
            mp.get_context("spawn").Process(
                target=_client,
                args=(
                    server.port, threads, seconds, i, seeded, replay_events, think_s, budget, queue
                ),
            )
            for i in range(clients)
        ]
        began = time.monotonic()
        for p in procs:
            p.start()
        # Watch every submitted job from its start: poll ListJobs for new ids.
        watchers: dict[str, JobWatcher] = {}
        from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb

        lister = _stub(server.port)
        # (The clients post their results before exiting: collect them after the loop.)
        while time.monotonic() - began < seconds + 2:
            page = lister.ListJobs(
                pb.ListJobsRequest(page_size=50, labels={"suite": "load"}), metadata=_metadata()
            )
            for job in page.jobs:
                if job.job_id not in watchers and not job.job_id.startswith("j-seed"):
                    watchers[job.job_id] = JobWatcher(server.port, job.job_id)
                    watchers[job.job_id].start()
            time.sleep(0.2)
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        load_s = time.monotonic() - began
        submitted = [s for r in results for s in r["submitted"]]
        for job_id, _ in submitted:  # a submit in the last poll interval
            if job_id not in watchers:
                watchers[job_id] = JobWatcher(server.port, job_id)
                watchers[job_id].start()
        for watcher in watchers.values():
            watcher.join(timeout=240)
        missed = []
        for job_id, watcher in watchers.items():
            canonical = _canonical_states(server.port, job_id)
            if watcher.error or watcher.states != canonical or canonical[-1] not in TERMINAL:
                missed.append({"job": job_id, "seen": watcher.states, "store": canonical,
                               "error": watcher.error})  # fmt: skip
        final_states: dict[str, int] = {}
        for job_id in watchers:
            final = _canonical_states(server.port, job_id)[-1]
            final_states[final] = final_states.get(final, 0) + 1
        time.sleep(5.0)  # idle: does memory come back down / stay flat?
        rss_after = server.rss[-1][1]
        rss_peak = max(r for _, r in server.rss)
        stream_hog = run_stream_hog(server.port, seeded, **hog)

        startup = {"service_s": [], "bare_s": []}
        for _ in range(repeats):
            startup["bare_s"].append(round(_first_step_bare(head.address, root / "bare", env), 2))
            startup["service_s"].append(round(_first_step_via_service(server.port), 2))
    finally:
        server.stop()
        head.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    for r in results:
        errors.extend(r["errors"])
        for rpc, values in r["latencies"].items():
            latencies.setdefault(rpc, []).extend(values)
    rpcs = {
        rpc: {
            "calls": len(v),
            "p50_ms": round(_pct(v, 0.50) * 1e3, 2),
            "p99_ms": round(_pct(v, 0.99) * 1e3, 2),
            "max_ms": round(max(v) * 1e3, 2),
        }
        for rpc, v in sorted(latencies.items())
    }
    # Median over the repeats (the machine is shared: single runs swing by 2x).
    ratio = statistics.median(startup["service_s"]) / statistics.median(startup["bare_s"])
    best_ratio = min(startup["service_s"]) / min(startup["bare_s"])
    return {
        "config": {"seconds": seconds, "clients": clients * threads, "client_processes": clients,
                   "submits": submits, "repeats": repeats, "think_ms": think_s * 1e3},
        "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu_model(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m_start": round(load_at_start, 1),
                    "load_average_1m": round(os.getloadavg()[0], 1)},
        "load_seconds": round(load_s, 1),
        "rpc_rate_per_s": round(sum(len(v) for v in latencies.values()) / seconds, 1),
        "rpcs": rpcs,
        "errors": len(errors),
        "error_samples": errors[:10],
        "submitted_jobs": len(submitted),
        "watched_jobs": len(watchers),
        "final_states": final_states,
        "watch_streams_missing_transitions": missed,
        "server_rss_mib": {
            "before": round(rss_before / 2**20, 1),
            "peak": round(rss_peak / 2**20, 1),
            "after": round(rss_after / 2**20, 1),
            "series": [(t, round(r / 2**20, 1)) for t, r in server.rss[::4]],
        },
        "stream_hog": stream_hog,
        "first_step": {
            **startup,
            "ratio_service_to_bare_median": round(ratio, 2),
            "ratio_service_to_bare_best": round(best_ratio, 2),
        },
        "targets": {
            "zero_errors": not errors,
            "getjob_p99_under_20ms": rpcs.get("GetJob", {}).get("p99_ms", 1e9) < 20,
            "every_watch_saw_every_transition": not missed,
            "memory_flat_after_run": rss_after <= rss_peak and rss_after - rss_before < 64 * 2**20,
            "first_step_within_1_2x_of_bare": ratio <= 1.2,
            **{f"stream_hog_{k}": v for k, v in stream_hog["targets"].items()},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=16, help="threads per client process")
    parser.add_argument("--submits", type=int, default=8, help="jobs submitted during the load")
    parser.add_argument("--repeats", type=int, default=3, help="startup comparisons")
    parser.add_argument("--think-ms", type=float, default=250.0,
                        help="mean pause of each client between calls (0: closed loop, saturating)")  # fmt: skip
    parser.add_argument("--hog-seconds", type=float, default=30.0,
                        help="stream hog: how long the others call GetJob")  # fmt: skip
    parser.add_argument("--hog-clients", type=int, default=2, help="stream hog: client processes")
    parser.add_argument("--hog-threads", type=int, default=8, help="stream hog: threads each")
    parser.add_argument("--hog-think-ms", type=float, default=50.0,
                        help="stream hog: mean pause between GetJob calls")  # fmt: skip
    parser.add_argument("--hog-only", action="store_true",
                        help=f"run only the stream-hog scenario (writes {HOG_RESULTS.name})")  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    hog = {"seconds": args.hog_seconds, "clients": args.hog_clients,
           "threads": args.hog_threads, "think_s": args.hog_think_ms / 1e3}  # fmt: skip
    if args.hog_only:
        result = run_hog_only(**hog)
        _write(result, args.out or HOG_RESULTS)
        _print_hog(result["stream_hog"])
        print(f"wrote {args.out or HOG_RESULTS}")
        return
    result = run(
        args.seconds, args.clients, args.threads, args.submits, args.repeats, args.think_ms / 1e3,
        hog,
    )
    out: Path = args.out or RESULTS
    _write(result, out)
    print(f"{result['config']['clients']} clients (think {args.think_ms:g} ms) for "
          f"{result['load_seconds']} s, {result['rpc_rate_per_s']} rpc/s, "
          f"load average {result['machine']['load_average_1m_start']} -> "
          f"{result['machine']['load_average_1m']} on {result['machine']['cpus']} CPUs "
          f"({result['machine']['cpu_model']})")  # fmt: skip
    print(f"{'rpc':<10} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for rpc, row in result["rpcs"].items():
        print(f"{rpc:<10} {row['calls']:>7} {row['p50_ms']:>8} {row['p99_ms']:>8} {row['max_ms']:>8}")
    rss = result["server_rss_mib"]
    print(f"errors {result['errors']}; jobs submitted {result['submitted_jobs']} "
          f"{result['final_states']}; watch streams missing transitions "
          f"{len(result['watch_streams_missing_transitions'])}")  # fmt: skip
    print(f"server RSS MiB: before {rss['before']}, peak {rss['peak']}, after {rss['after']}")
    fs = result["first_step"]
    print(f"SubmitJob -> first step {fs['service_s']} s; bare TorchTrainer.fit() {fs['bare_s']} s; "
          f"ratio of medians {fs['ratio_service_to_bare_median']}, "
          f"of bests {fs['ratio_service_to_bare_best']}")  # fmt: skip
    _print_hog(result["stream_hog"])
    print("targets:", json.dumps(result["targets"]))
    print(f"wrote {out}")


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


def _print_hog(hog: dict) -> None:
    others = hog["others_getjob"]
    print(f"stream hog: holds {hog['hog_streams_held']} streams, refused {hog['hog_refusals']}; "
          f"others' GetJob: {others['calls']} calls, p50 {others['p50_ms']} ms, "
          f"p99 {others['p99_ms']} ms, refused/failed {others['refused_or_failed']}; "
          f"targets {json.dumps(hog['targets'])}")  # fmt: skip


if __name__ == "__main__":
    main()
