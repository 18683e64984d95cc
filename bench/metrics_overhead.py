"""Cost of the service's Prometheus metrics.

Measures

* ``MetricsRecord.from_dict``: microseconds to validate one metrics record (done
  once, where it enters the service);
* ``ServiceMetrics.record_training``: microseconds to export one (already valid) record;
* a scrape: milliseconds to render ``/metrics`` and its size, with 1, 10, 100 and
  1000 jobs of 2 ranks each exported (retention keeps finished jobs' series for a
  while, so a busy service can hold many);
* ``MetricsInterceptor``: the median latency of a unary rpc through a real gRPC
  server on loopback, with and without the interceptor (rounds interleaved, so a
  load change on a shared machine hits both alike).

    python bench/metrics_overhead.py [--calls N]

Writes bench/results/metrics_overhead.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
from prometheus_client import generate_latest

from zerotrain.service.metrics import MetricsInterceptor, ServiceMetrics
from zerotrain.service.records import MetricsRecord

RESULTS = Path(__file__).resolve().parent / "results" / "metrics_overhead.json"


def _fields(job_id: str, step: int) -> dict:
    stats = {"step": float(step), "lr": 1e-3, "grad_norm": 1.0, "param_norm": 5.0,
             "update_norm": 0.01, "update_param_ratio": 0.002, "state_bytes_per_rank": 8e5,
             "skipped_steps": 0.0, "nadam_mu_t": 0.9, "nadam_mu_product": 0.8,
             "nadam_bias_correction1": 0.1, "nadam_bias_correction2": 0.01,
             "nadam_sqrt_v_hat_mean": 0.05}  # fmt: skip
    fields = {"job_id": job_id, "attempt": 1, "step": step, "time": time.time(), "rank": 0,
              "world_size": 2, "loss": 1.0, "accuracy": 0.5, "samples_per_second": 100.0,
              "lr": 1e-3, "phase_seconds": dict.fromkeys(("data", "forward", "backward",
              "communication", "optimizer"), 0.01), "optimizer": stats,
              "state_bytes_per_rank": [800000, 800000], "final": False}  # fmt: skip
    return fields


def _record(job_id: str, step: int) -> MetricsRecord:
    return MetricsRecord.from_dict(job_id, _fields(job_id, step))


def bench_validate(n: int = 20_000) -> float:
    """µs to build and validate one record (``MetricsRecord.from_dict``, once per record)."""
    fields = [_fields("j-bench", step) for step in range(1, n + 1)]
    start = time.perf_counter()
    for data in fields:
        MetricsRecord.from_dict("j-bench", data)
    return (time.perf_counter() - start) / n * 1e6


def bench_record(n: int = 20_000) -> float:
    metrics = ServiceMetrics()
    records = [_record("j-bench", step) for step in range(1, n + 1)]
    start = time.perf_counter()
    for record in records:
        metrics.record_training(record)
    return (time.perf_counter() - start) / n * 1e6


def bench_scrape(jobs: int, repeats: int = 5) -> tuple[float, int]:
    metrics = ServiceMetrics()
    for i in range(jobs):
        metrics.record_training(_record(f"j-{i:06d}", 10))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        page = generate_latest(metrics.registry)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, len(page)


def _server(interceptors: list) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def bench_interceptor(calls: int, rounds: int = 5) -> tuple[float, float]:
    plain, plain_port = _server([])
    metered, metered_port = _server([MetricsInterceptor(ServiceMetrics())])
    latencies: dict[str, list[float]] = {"plain": [], "metered": []}
    try:
        channels = {
            "plain": grpc.insecure_channel(f"127.0.0.1:{plain_port}"),
            "metered": grpc.insecure_channel(f"127.0.0.1:{metered_port}"),
        }
        stubs = {name: ch.unary_unary("/bench.Echo/Echo") for name, ch in channels.items()}
        for stub in stubs.values():
            for _ in range(200):  # warm-up
                stub(b"x", timeout=10)
        for _ in range(rounds):
            for name, stub in stubs.items():
                for _ in range(calls // rounds):
                    start = time.perf_counter()
                    stub(b"x", timeout=10)
                    latencies[name].append(time.perf_counter() - start)
        for channel in channels.values():
            channel.close()
    finally:
        plain.stop(None)
        metered.stop(None)
    return (
        statistics.median(latencies["plain"]) * 1e6,
        statistics.median(latencies["metered"]) * 1e6,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="rpcs per variant")
    args = parser.parse_args(argv)

    validate_us = bench_validate()
    record_us = bench_record()
    scrapes = {jobs: bench_scrape(jobs) for jobs in (1, 10, 100, 1000)}
    plain_us, metered_us = bench_interceptor(args.calls)

    print("| measurement | value |")
    print("| --- | --- |")
    print(f"| MetricsRecord.from_dict, per record | {validate_us:.1f} µs |")
    print(f"| record_training, per record | {record_us:.1f} µs |")
    for jobs, (ms, size) in scrapes.items():
        print(f"| scrape with {jobs} jobs x 2 ranks | {ms:.2f} ms, {size / 1024:.0f} KiB |")
    print(f"| unary rpc, no interceptor (median) | {plain_us:.0f} µs |")
    print(f"| unary rpc, MetricsInterceptor (median) | {metered_us:.0f} µs |")

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
        },
        "validate_us": validate_us,
        "record_training_us": record_us,
        "scrape": {str(j): {"ms": ms, "bytes": size} for j, (ms, size) in scrapes.items()},
        "rpc_median_us": {"plain": plain_us, "metrics_interceptor": metered_us},
        "calls_per_variant": args.calls,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=RESULTS.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(tmp, RESULTS)
    print(
        f"wrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
