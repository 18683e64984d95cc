"""Prometheus metrics of the service and of the jobs it runs (``zerotrain_`` prefix).

Two kinds of series live in one :class:`ServiceMetrics` registry:

* service series, updated by the gRPC layer and the job manager: rpcs by method
  and status code (counter + latency histogram), jobs by state, submissions and
  reconciliation errors;
* training series, built from the workers' metrics records (the "Metrics
  record" contract in docs/ARCHITECTURE.md): progress, loss, throughput, the
  step-phase breakdown, the optimizer's global statistics and its Adamax /
  Nadam internals, and the optimizer-state bytes held by each rank.

Conventions: base units (``_seconds``, ``_bytes``, ratios in 0..1), ``_total``
on counters, and labels of bounded cardinality only (``job_id``, ``rank``,
``method``, ``code``, ``state``, ``phase``; never a parameter name). The job's
label is ``job_id``, not ``job``: Prometheus owns ``job`` (the scrape job) and
would rename a scraped ``job`` label to ``exported_job``. The
training series of a job are dropped ``retention_s`` seconds after
:meth:`ServiceMetrics.job_finished`, so a long-lived service does not grow a
series set per job forever.

This module is the exporter (registry, service series, retention, HTTP
endpoint, the rpc interceptor); :mod:`zerotrain.service.metric_families` says how a
record becomes the training families.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from zerotrain.service.metric_families import JobSeries, TrainingCollector
from zerotrain.service.records import MetricsRecord

__all__ = [
    "RPC_LATENCY_BUCKETS",
    "MetricsInterceptor",
    "ServiceMetrics",
]

#: Latency buckets for unary rpcs (seconds); streams land in the upper buckets.
RPC_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
)  # fmt: skip

# How many dropped job ids are remembered so that late records cannot revive them.
_DROPPED_MEMORY = 10_000


class ServiceMetrics:
    """All Prometheus metrics of one service process, in their own registry.

    Args:
        registry: where to register; a fresh :class:`CollectorRegistry` by default
            (never the global one, so several services can live in one process).
        retention_s: how long the training series of a finished job stay
            exported after :meth:`job_finished` (so the last values get scraped).
        clock: monotonic clock used for the retention (injectable for tests).

    Every method is thread-safe.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        retention_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (isinstance(retention_s, int | float) and math.isfinite(retention_s)) or (
            retention_s < 0
        ):
            raise ValueError(f"retention_s: must be a finite number >= 0, got {retention_s!r}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.retention_s = float(retention_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, JobSeries] = {}
        self._dropped: OrderedDict[str, None] = OrderedDict()
        self._known_states: set[str] = set()
        self._http_server: Any = None

        self.rpcs = Counter(
            "zerotrain_rpc_requests",
            "gRPC requests handled, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_latency = Histogram(
            "zerotrain_rpc_duration_seconds",
            "gRPC request handling time (streams: until the stream ends).",
            ["method", "code"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Gauge(
            "zerotrain_jobs", "Jobs known to the service, by state.", ["state"],
            registry=self.registry,
        )  # fmt: skip
        self.submissions = Counter(
            "zerotrain_job_submissions", "Jobs accepted by SubmitJob.", registry=self.registry
        )
        self.reconciliation_errors = Counter(
            "zerotrain_reconciliation_errors",
            "Failed passes of the job manager's reconciliation with Ray.",
            registry=self.registry,
        )
        self.registry.register(TrainingCollector(self._snapshot))

    # -- service series ---------------------------------------------------------------

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Count one finished rpc and observe its latency."""
        self.rpcs.labels(method=method, code=code).inc()
        self.rpc_latency.labels(method=method, code=code).observe(max(seconds, 0.0))

    def set_job_states(self, counts: Mapping[str, int]) -> None:
        """Set the number of jobs in each state; states missing from ``counts`` become 0."""
        with self._lock:
            states = {str(getattr(s, "value", s)): n for s, n in counts.items()}
            for state in self._known_states - states.keys():
                self.jobs.labels(state=state).set(0)
            for state, n in states.items():
                self.jobs.labels(state=state).set(n)
            self._known_states |= states.keys()

    def inc_submissions(self) -> None:
        """Count one accepted job submission."""
        self.submissions.inc()

    def inc_reconciliation_errors(self) -> None:
        """Count one failed reconciliation pass."""
        self.reconciliation_errors.inc()

    # -- training series --------------------------------------------------------------

    def record_training(self, record: MetricsRecord) -> None:
        """Update the job's training series from one (validated) metrics record.

        The record follows the "Metrics record" contract; optimizer statistics
        without a metric are ignored. Records for a job that finished are
        ignored (a late record must not revive series that are being retired).
        """
        now_wall = time.time()
        with self._lock:
            self._expire()
            if record.job_id in self._dropped:
                return
            series = self._jobs.setdefault(record.job_id, JobSeries(last_progress=now_wall))
            if series.finished_at is not None:
                return
            series.apply(record, now_wall)

    def job_finished(self, job_id: str) -> None:
        """Mark the job finished; its training series are dropped after ``retention_s``."""
        with self._lock:
            series = self._jobs.get(job_id)
            if series is not None and series.finished_at is None:
                series.finished_at = self._clock()
            self._expire()

    def training_jobs(self) -> list[str]:
        """Ids of the jobs whose training series are currently exported."""
        with self._lock:
            self._expire()
            return sorted(self._jobs)

    def _snapshot(self) -> dict[str, JobSeries]:
        with self._lock:
            self._expire()
            return {
                job: JobSeries(
                    gauges=dict(s.gauges),
                    phases=dict(s.phases),
                    state_bytes=dict(s.state_bytes),
                    skipped_steps=s.skipped_steps,
                    steps_total=s.steps_total,
                    last_step=s.last_step,
                    last_progress=s.last_progress,
                    finished_at=s.finished_at,
                )
                for job, s in self._jobs.items()
            }

    def _expire(self) -> None:
        """Drop finished jobs past their retention (caller holds the lock)."""
        now = self._clock()
        for job in [
            j
            for j, s in self._jobs.items()
            if s.finished_at is not None and now - s.finished_at >= self.retention_s
        ]:
            del self._jobs[job]
            self._dropped[job] = None
            while len(self._dropped) > _DROPPED_MEMORY:
                self._dropped.popitem(last=False)

    # -- exposition -------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP in a daemon thread; returns the bound port.

        ``port=0`` binds an ephemeral port. Call :meth:`close` to stop serving.
        """
        if self._http_server is not None:
            raise RuntimeError("ServiceMetrics.serve: already serving; call close() first")
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http_server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint started by :meth:`serve` (no-op when not serving)."""
        server, self._http_server = self._http_server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Server interceptor that counts and times every rpc into a :class:`ServiceMetrics`.

    The status code is the one the handler set (``context.abort`` or
    ``context.set_code``), ``OK`` when it returned normally, ``UNKNOWN`` when it
    raised, and ``CANCELLED`` when the client dropped a response stream. Calls
    to methods the server does not implement are counted as method ``unknown``
    (so clients cannot grow the label set).
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            self._metrics.observe_rpc("unknown", grpc.StatusCode.UNIMPLEMENTED.name, 0.0)
            return None
        method = handler_call_details.method.lstrip("/")
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary), **kwargs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream), **kwargs
        )

    def _wrap_unary(self, method: str, behavior: Callable) -> Callable:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = behavior(request, context)
                code = _code_name(context, default="OK")
                return response
            except BaseException:
                code = _code_name(context, default="UNKNOWN")
                raise
            finally:
                self._metrics.observe_rpc(method, code, time.perf_counter() - start)

        return wrapper

    def _wrap_stream(self, method: str, behavior: Callable) -> Callable:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                yield from behavior(request, context)
                code = _code_name(context, default="OK")
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED.name
                raise
            except BaseException:
                code = _code_name(context, default="UNKNOWN")
                raise
            finally:
                self._metrics.observe_rpc(method, code, time.perf_counter() - start)

        return wrapper


def _code_name(context: grpc.ServicerContext, *, default: str) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return default
