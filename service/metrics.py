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
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "PHASES",
    "RPC_LATENCY_BUCKETS",
    "MetricsInterceptor",
    "ServiceMetrics",
]

#: Step phases reported by the workers; anything else is summed into ``other``
#: so that a misbehaving worker cannot create unbounded label values.
PHASES = ("data", "forward", "backward", "communication", "optimizer", "compile")

#: Latency buckets for unary rpcs (seconds); streams land in the upper buckets.
RPC_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
)  # fmt: skip

# Optimizer statistics (ZeroOptimizer.stats() keys) exported as one gauge each:
# stats key -> (metric name, help text).
_OPTIMIZER_GAUGES: dict[str, tuple[str, str]] = {
    "grad_norm": ("zerotrain_training_grad_norm", "Global L2 norm of the gradient."),
    "param_norm": ("zerotrain_training_param_norm", "Global L2 norm of the parameters."),
    "update_norm": ("zerotrain_training_update_norm", "Global L2 norm of the last update."),
    "update_param_ratio": (
        "zerotrain_training_update_param_ratio",
        "Ratio of the update norm to the parameter norm.",
    ),
    "adamax_u_max": ("zerotrain_adamax_u_max", "Adamax: largest element of u (exp_inf)."),
    "adamax_u_mean": ("zerotrain_adamax_u_mean", "Adamax: mean of u (exp_inf)."),
    "adamax_u_refreshed_fraction": (
        "zerotrain_adamax_u_refreshed_ratio",
        "Adamax: fraction (0..1) of u set by |g| rather than by beta2*u on the last step.",
    ),
    "nadam_mu_t": ("zerotrain_nadam_mu_t", "Nadam: momentum coefficient mu_t of the last step."),
    "nadam_mu_product": ("zerotrain_nadam_mu_product", "Nadam: product mu_1 * ... * mu_t."),
    "nadam_bias_correction1": (
        "zerotrain_nadam_bias_correction1",
        "Nadam: first-moment bias correction of the last step.",
    ),
    "nadam_bias_correction2": (
        "zerotrain_nadam_bias_correction2",
        "Nadam: second-moment bias correction 1 - beta2^t of the last step.",
    ),
    "nadam_sqrt_v_hat_mean": (
        "zerotrain_nadam_sqrt_v_hat_mean",
        "Nadam: mean of sqrt(v / bias_correction2).",
    ),
}

# Top-level record fields exported as one gauge each.
_RECORD_GAUGES: dict[str, tuple[str, str]] = {
    "step": ("zerotrain_training_step", "Current optimizer step of the job."),
    "loss": ("zerotrain_training_loss", "Training loss (mean over the reporting window)."),
    "accuracy": ("zerotrain_training_accuracy_ratio", "Training accuracy (0..1)."),
    "samples_per_second": (
        "zerotrain_training_samples_per_second",
        "Training throughput in samples per second (all workers).",
    ),
    "world_size": ("zerotrain_training_world_size", "Number of training workers."),
    "attempt": ("zerotrain_training_attempt", "Current attempt (1 + restarts after failures)."),
}

_NUMBER_FIELDS = (*_RECORD_GAUGES, "lr", "time")
# How many dropped job ids are remembered so that late records cannot revive them.
_DROPPED_MEMORY = 10_000


@dataclass
class _JobSeries:
    """Latest values of one job's training series."""

    gauges: dict[str, float] = field(default_factory=dict)  # metric name -> value
    phases: dict[str, float] = field(default_factory=dict)  # phase -> mean seconds per step
    state_bytes: dict[int, float] = field(default_factory=dict)  # rank -> bytes
    skipped_steps: float = 0.0
    steps_total: float = 0.0
    last_step: float | None = None
    last_progress: float = 0.0  # wall time (service clock) when the step last advanced
    finished_at: float | None = None  # monotonic time of job_finished()


class _TrainingCollector(Collector):
    """Builds the per-job training families at scrape time from :class:`_JobSeries`."""

    def __init__(self, owner: ServiceMetrics) -> None:
        self._owner = owner

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._owner._snapshot())

    def _families(self, jobs: Mapping[str, _JobSeries]) -> Iterator[Metric]:
        gauge_help = {name: text for name, text in _RECORD_GAUGES.values()}
        gauge_help.update({name: text for name, text in _OPTIMIZER_GAUGES.values()})
        gauge_help["zerotrain_training_learning_rate"] = "Learning rate of the last step."
        for name, text in gauge_help.items():
            family = GaugeMetricFamily(name, text, labels=["job_id"])
            for job, series in jobs.items():
                if name in series.gauges:
                    family.add_metric([job], series.gauges[name])
            yield family

        step_seconds = GaugeMetricFamily(
            "zerotrain_training_step_seconds",
            "Mean wall time of one training step (sum of its phases).",
            labels=["job_id"],
        )
        phase_seconds = GaugeMetricFamily(
            "zerotrain_training_phase_seconds",
            "Mean seconds per step spent in each phase.",
            labels=["job_id", "phase"],
        )
        state_bytes = GaugeMetricFamily(
            "zerotrain_training_optimizer_state_bytes",
            "Optimizer-state bytes held by each rank.",
            labels=["job_id", "rank"],
        )
        active = GaugeMetricFamily(
            "zerotrain_training_active",
            "1 while the job may still report, 0 once it finished (kept for the retention).",
            labels=["job_id"],
        )
        last_progress = GaugeMetricFamily(
            "zerotrain_training_last_progress_timestamp_seconds",
            "Unix time at which the service last saw the job's step advance.",
            labels=["job_id"],
        )
        skipped = CounterMetricFamily(
            "zerotrain_training_skipped_steps",
            "Optimizer steps skipped because a gradient was not finite.",
            labels=["job_id"],
        )
        steps = CounterMetricFamily(
            "zerotrain_training_steps",
            "Optimizer steps trained; keeps counting across restarts (rate() gives steps/s).",
            labels=["job_id"],
        )
        restarts = CounterMetricFamily(
            "zerotrain_training_restarts",
            "Restarts of the job after a worker failure (attempt - 1).",
            labels=["job_id"],
        )
        for job, series in jobs.items():
            if series.phases:
                step_seconds.add_metric([job], sum(series.phases.values()))
            for phase, seconds in series.phases.items():
                phase_seconds.add_metric([job, phase], seconds)
            for rank, nbytes in sorted(series.state_bytes.items()):
                state_bytes.add_metric([job, str(rank)], nbytes)
            active.add_metric([job], 0.0 if series.finished_at is not None else 1.0)
            last_progress.add_metric([job], series.last_progress)
            skipped.add_metric([job], series.skipped_steps)
            steps.add_metric([job], series.steps_total)
            attempt = series.gauges.get("zerotrain_training_attempt", 1.0)
            restarts.add_metric([job], max(attempt - 1.0, 0.0))
        yield from (step_seconds, phase_seconds, state_bytes, active, last_progress)
        yield from (skipped, steps, restarts)


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
        self._jobs: dict[str, _JobSeries] = {}
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
        self.registry.register(_TrainingCollector(self))

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

    def record_training(self, job_id: str, record: dict) -> None:
        """Update the job's training series from one metrics record.

        The record follows the "Metrics record" contract; unknown keys are
        ignored, so are optimizer statistics without a metric. A record with a
        field of the wrong type raises :class:`ValueError` naming every bad field
        and changes nothing. Records for a job that finished are ignored (a late
        record must not revive series that are being retired).
        """
        _validate_record(job_id, record)
        optimizer = record.get("optimizer") or {}
        now_wall = time.time()
        with self._lock:
            self._expire()
            if job_id in self._dropped:
                return
            series = self._jobs.setdefault(job_id, _JobSeries(last_progress=now_wall))
            if series.finished_at is not None:
                return
            for key, (name, _) in _RECORD_GAUGES.items():
                if key in record:
                    series.gauges[name] = float(record[key])
            for key, (name, _) in _OPTIMIZER_GAUGES.items():
                if key in optimizer:
                    series.gauges[name] = float(optimizer[key])
            lr = record.get("lr", optimizer.get("lr"))
            if lr is not None:
                series.gauges["zerotrain_training_learning_rate"] = float(lr)
            if "skipped_steps" in optimizer:
                series.skipped_steps = float(optimizer["skipped_steps"])
            phases = record.get("phase_seconds")
            if phases:
                series.phases = _bounded_phases(phases)
            per_rank = record.get("state_bytes_per_rank")
            if per_rank:
                series.state_bytes = {rank: float(n) for rank, n in enumerate(per_rank)}
            elif "state_bytes_per_rank" in optimizer:
                rank = int(record.get("rank", 0))
                series.state_bytes[rank] = float(optimizer["state_bytes_per_rank"])
            if "step" in record:
                step = float(record["step"])
                if series.last_step is None or step > series.last_step:
                    series.steps_total += step - (series.last_step or 0.0)
                    series.last_progress = now_wall
                series.last_step = step

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

    def _snapshot(self) -> dict[str, _JobSeries]:
        with self._lock:
            self._expire()
            return {
                job: _JobSeries(
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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validate_record(job_id: str, record: Any) -> None:
    errors: list[str] = []
    if not isinstance(job_id, str) or not job_id:
        errors.append(f"job_id: must be a non-empty string, got {job_id!r}")
    if not isinstance(record, Mapping):
        raise ValueError(f"record: must be a mapping, got {type(record).__name__}")
    for key in _NUMBER_FIELDS:
        if key in record and not _is_number(record[key]):
            errors.append(f"record.{key}: must be a number, got {record[key]!r}")
    if "rank" in record and not (isinstance(record["rank"], int) and record["rank"] >= 0):
        errors.append(f"record.rank: must be an integer >= 0, got {record['rank']!r}")
    optimizer = record.get("optimizer")
    if optimizer is not None:
        if not isinstance(optimizer, Mapping):
            errors.append(f"record.optimizer: must be a mapping, got {optimizer!r}")
        else:
            for key in (*_OPTIMIZER_GAUGES, "lr", "skipped_steps", "state_bytes_per_rank"):
                if key in optimizer and not _is_number(optimizer[key]):
                    errors.append(
                        f"record.optimizer.{key}: must be a number, got {optimizer[key]!r}"
                    )
    phases = record.get("phase_seconds")
    if phases is not None:
        if not isinstance(phases, Mapping):
            errors.append(f"record.phase_seconds: must be a mapping, got {phases!r}")
        else:
            for key, value in phases.items():
                if not _is_number(value) or value < 0:
                    errors.append(
                        f"record.phase_seconds.{key}: must be a number >= 0, got {value!r}"
                    )
    per_rank = record.get("state_bytes_per_rank")
    valid_per_rank = isinstance(per_rank, list | tuple) and all(
        _is_number(n) and n >= 0 for n in per_rank
    )
    if per_rank is not None and not valid_per_rank:
        errors.append(
            f"record.state_bytes_per_rank: must be a list of numbers >= 0, got {per_rank!r}"
        )
    if errors:
        raise ValueError("invalid metrics record: " + "; ".join(errors))


def _bounded_phases(phases: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in phases.items():
        label = key if key in PHASES else "other"
        out[label] = out.get(label, 0.0) + float(value)
    return out


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
