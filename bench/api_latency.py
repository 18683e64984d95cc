"""Latency of the gRPC API under concurrent clients (no training: the control plane only).

A real server (auth on, SQLite store, metrics interceptor) runs in its own
process, seeded with jobs of 4 principals: half RUNNING (they receive metrics
records), half SUCCEEDED (watching them replays their history). Client
processes, each with several threads and its own channel, then loop for a
fixed time over a mix of rpcs:

    GetJob 50% | ListJobs (page of 50) 15% | ReportMetrics 30% | WatchJob replay 5%

while a few live watchers follow RUNNING jobs and time each metrics event from
its ReportMetrics call to its arrival on the watch stream. Reported: calls,
errors, p50/p90/p99 per rpc, total rpc rate, watch delivery latency, server RSS
before and after. Job submission needs Ray and is not measured here.

    python bench/api_latency.py [--seconds 10] [--clients 2] [--threads 8]

Writes bench/results/api_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

RESULTS = Path(__file__).resolve().parent / "results" / "api_latency.json"
PRINCIPALS = ("p0", "p1", "p2", "p3")
JOBS_PER_PRINCIPAL = 50
SECRET = b"b" * 32


def _token(name: str) -> str:
    return f"bench-token-{name}-0123456789"


def _serve(port_queue: Any, stop_event: Any) -> None:
    """Child process: seed a store, serve until told to stop."""
    from zerotrain.service.auth import Authenticator, Principal
    from zerotrain.service.jobs import JobManager
    from zerotrain.service.metrics import ServiceMetrics
    from zerotrain.service.model import JobRecord, JobState
    from zerotrain.service.server import create_server, stop_server
    from zerotrain.service.spec import JobSpec
    from zerotrain.service.store import JobStore

    data_dir = Path(tempfile.mkdtemp(prefix="zt-bench-api-"))
    store = JobStore(data_dir / "jobs.db")
    spec = JobSpec.from_dict({"name": "bench", "task": "digits", "labels": {"suite": "bench"}})
    now = time.time()
    for owner in PRINCIPALS:
        for i in range(JOBS_PER_PRINCIPAL):
            job_id = f"j-{owner}-{i:03d}"
            store.create_job(
                JobRecord(
                    job_id=job_id, owner=owner, spec=spec, state=JobState.PENDING,
                    state_reason="", created_at=now, updated_at=now, started_at=None,
                    finished_at=None, attempt=0, latest_metrics=None, checkpoint=None,
                    idempotency_key=None, ray_job_id=None,
                )
            )  # fmt: skip
            store.update_job(job_id, now=now, state=JobState.RUNNING, started_at=now, attempt=1)
            for step in range(10, 60, 10):
                store.append_metrics(
                    job_id, _record(job_id, step), now=now, attempt=1, checkpoint=None
                )
            if i % 2:
                store.update_job(job_id, now=now, state=JobState.SUCCEEDED, finished_at=now)
    manager = JobManager(store, None, data_dir=data_dir)  # type: ignore[arg-type]  # no Ray
    auth = Authenticator.from_tokens(
        {_token(p): Principal(p) for p in PRINCIPALS}, ingest_secret=SECRET
    )
    server, port = create_server("127.0.0.1:0", manager, auth=auth, metrics=ServiceMetrics())
    port_queue.put(port)
    stop_event.wait()
    stop_server(server, grace=1.0)  # returns once no handler is inside the manager
    manager.stop()
    store.close()
    shutil.rmtree(data_dir, ignore_errors=True)


def _record(job_id: str, step: int, sent: float | None = None) -> dict:
    return {
        "job_id": job_id, "attempt": 1, "step": step, "time": sent or time.time(), "rank": 0,
        "world_size": 2, "loss": 1.0 / step, "accuracy": 0.5, "samples_per_second": 400.0,
        "lr": 1e-3, "phase_seconds": dict.fromkeys(
            ("data", "forward", "backward", "communication", "optimizer"), 0.01),
        "optimizer": {"grad_norm": 1.0, "update_param_ratio": 0.002, "nadam_mu_t": 0.9},
        "state_bytes_per_rank": [100000, 100000], "final": False,
    }  # fmt: skip


def _client(port: int, threads: int, seconds: float, seed: int, out: Any) -> None:
    """Client process: ``threads`` loops over the rpc mix; puts its samples on ``out``."""
    from zerotrain.service import convert
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
    from zerotrain.service.auth import JOB_ID_METADATA, ingest_token

    samples: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        owner = PRINCIPALS[(seed + index) % len(PRINCIPALS)]
        md = (("authorization", f"Bearer {_token(owner)}"),)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.JobServiceStub(channel)
        local: dict[str, list[float]] = {}
        failed: dict[str, int] = {}
        step = 1000
        while time.monotonic() < deadline:
            i = rng.randrange(JOBS_PER_PRINCIPAL)
            job_id = f"j-{owner}-{i:03d}"
            roll = rng.random()
            start = time.perf_counter()
            try:
                if roll < 0.50:
                    name = "GetJob"
                    stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=md, timeout=10)
                elif roll < 0.65:
                    name = "ListJobs"
                    stub.ListJobs(pb.ListJobsRequest(page_size=50), metadata=md, timeout=10)
                elif roll < 0.95:
                    name = "ReportMetrics"
                    job_id = f"j-{owner}-{i - i % 2:03d}"  # a RUNNING job
                    step += 1
                    request = pb.ReportMetricsRequest(
                        job_id=job_id, record=convert.metrics_to_proto(_record(job_id, step))
                    )
                    token = (("authorization", f"Bearer {ingest_token(SECRET, job_id)}"),
                             (JOB_ID_METADATA, job_id))
                    stub.ReportMetrics(request, metadata=token, timeout=10)
                else:
                    name = "WatchJob replay"
                    job_id = f"j-{owner}-{i | 1:03d}"  # a SUCCEEDED job: finite stream
                    for _ in stub.WatchJob(
                        pb.WatchJobRequest(job_id=job_id), metadata=md, timeout=10
                    ):
                        pass
            except grpc.RpcError:
                failed[name] = failed.get(name, 0) + 1
                continue
            local.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        channel.close()
        with lock:
            for key, values in local.items():
                samples.setdefault(key, []).extend(values)
            for key, count in failed.items():
                errors[key] = errors.get(key, 0) + count

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((samples, errors))


def _watchers(port: int, count: int, stop: threading.Event) -> list[float]:
    """Live watchers on RUNNING jobs: ms from a record's send time to its arrival."""
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
    from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc

    delays: list[float] = []
    lock = threading.Lock()
    calls: list[Any] = []
    since = time.time()

    def follow(index: int) -> None:
        owner = PRINCIPALS[index % len(PRINCIPALS)]
        job_id = f"j-{owner}-{(2 * index) % JOBS_PER_PRINCIPAL:03d}"
        md = (("authorization", f"Bearer {_token(owner)}"),)
        stub = pb_grpc.JobServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=md)
        calls.append(call)
        try:
            for event in call:
                sent = event.metrics.time.ToNanoseconds() / 1e9
                if event.HasField("metrics") and sent > since:  # skip the replayed history
                    with lock:
                        delays.append((time.time() - sent) * 1e3)
        except grpc.RpcError:
            pass  # cancelled at the end

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    stop.wait()
    for call in calls:
        call.cancel()
    return delays


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_scenario(seconds: float, clients: int, threads: int, watchers: int) -> dict:
    """One run against a fresh server; returns the scenario's results."""
    ctx = mp.get_context("spawn")
    port_queue, stop_server = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(port_queue, stop_server), daemon=True)
    server.start()
    port = port_queue.get(timeout=120)
    server_proc = psutil.Process(server.pid)
    rss_start = server_proc.memory_info().rss

    stop_watch = threading.Event()
    delays: list[float] = []
    watch_thread = threading.Thread(
        target=lambda: delays.extend(_watchers(port, watchers, stop_watch)), daemon=True
    )
    watch_thread.start()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(port, threads, seconds, seed, out))
        for seed in range(clients)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    samples: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for _ in procs:
        got, failed = out.get(timeout=seconds + 120)
        for key, values in got.items():
            samples.setdefault(key, []).extend(values)
        for key, count in failed.items():
            errors[key] = errors.get(key, 0) + count
    elapsed = time.monotonic() - started
    for p in procs:
        p.join()
    rss_end = server_proc.memory_info().rss
    stop_watch.set()
    watch_thread.join(10)
    stop_server.set()
    server.join(30)

    rpcs = {
        name: {
            "calls": len(values),
            "errors": errors.get(name, 0),
            "p50_ms": round(_pct(values, 0.50), 3),
            "p90_ms": round(_pct(values, 0.90), 3),
            "p99_ms": round(_pct(values, 0.99), 3),
        }
        for name, values in sorted(samples.items())
    }
    return {
        "concurrency": {"client_processes": clients, "threads_per_client": threads,
                        "live_watchers": watchers},
        "seconds": seconds,
        "rpcs": rpcs,
        "rpc_rate_per_s": round(sum(len(v) for v in samples.values()) / elapsed, 1),
        "errors": sum(errors.values()),
        "watch_delivery": {"events": len(delays), "p50_ms": round(_pct(delays, 0.50), 3),
                           "p99_ms": round(_pct(delays, 0.99), 3)},
        "server_rss_mb": {"start": round(rss_start / 2**20, 1), "end": round(rss_end / 2**20, 1)},
        "load_average_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--clients", type=int, default=2, help="client processes (concurrent)")
    parser.add_argument("--threads", type=int, default=8, help="threads per client process")
    parser.add_argument("--watchers", type=int, default=8, help="live watch streams")
    args = parser.parse_args()

    scenarios = {
        "sequential": run_scenario(args.seconds, 1, 1, 2),
        "concurrent": run_scenario(args.seconds, args.clients, args.threads, args.watchers),
    }
    result = {
        "benchmark": "api_latency",
        "jobs": len(PRINCIPALS) * JOBS_PER_PRINCIPAL,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "grpcio": grpc.__version__},
        "scenarios": scenarios,
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)

    print(
        f"{'scenario':<12}{'rpc':<17}{'calls':>7}{'errors':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    )
    for label, sc in scenarios.items():
        for name, row in sc["rpcs"].items():
            print(f"{label:<12}{name:<17}{row['calls']:>7}{row['errors']:>7}{row['p50_ms']:>9.2f}"
                  f"{row['p90_ms']:>9.2f}{row['p99_ms']:>9.2f}")  # fmt: skip
        w, c = sc["watch_delivery"], sc["concurrency"]
        threads = c["client_processes"] * c["threads_per_client"]
        print(f"{label}: {threads} client thread(s), {sc['rpc_rate_per_s']} rpc/s, watch delivery "
              f"p50 {w['p50_ms']} ms / p99 {w['p99_ms']} ms ({w['events']} events), server RSS "
              f"{sc['server_rss_mb']['start']} -> {sc['server_rss_mb']['end']} MiB, load average "
              f"{sc['load_average_1m']} on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
