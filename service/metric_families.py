"""The training series' families: which record field feeds which metric, and how.

A worker's metrics record (a :class:`~zerotrain.service.records.MetricsRecord`,
validated where it entered; the "Metrics record" contract in
docs/ARCHITECTURE.md) updates one :class:`JobSeries` per job
(:meth:`JobSeries.apply`); at scrape time :class:`TrainingCollector` turns
every job's series into Prometheus families. :mod:`zerotrain.service.metrics` owns the
registry, the locking, the retention and the HTTP exporter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from zerotrain.service.records import PHASES, MetricsRecord

__all__ = [
    "OPTIMIZER_GAUGES",
    "RECORD_GAUGES",
    "JobSeries",
    "TrainingCollector",
]

# Optimizer statistics (ZeroOptimizer.stats() keys) exported as one gauge each:
# stats key -> (metric name, help text).
OPTIMIZER_GAUGES: dict[str, tuple[str, str]] = {
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
RECORD_GAUGES: dict[str, tuple[str, str]] = {
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


@dataclass
class JobSeries:
    """Latest values of one job's training series."""

    gauges: dict[str, float] = field(default_factory=dict)  # metric name -> value
    phases: dict[str, float] = field(default_factory=dict)  # phase -> mean seconds per step
    state_bytes: dict[int, float] = field(default_factory=dict)  # rank -> bytes
    skipped_steps: float = 0.0
    steps_total: float = 0.0
    last_step: float | None = None
    last_progress: float = 0.0  # wall time (service clock) when the step last advanced
    finished_at: float | None = None  # monotonic time of job_finished()

    def apply(self, record: MetricsRecord, now: float) -> None:
        """Take the values of one metrics record; ``now`` is the wall time."""
        optimizer = record.optimizer
        for key, (name, _) in RECORD_GAUGES.items():
            value = getattr(record, key)
            if value is not None:
                self.gauges[name] = float(value)
        for key, (name, _) in OPTIMIZER_GAUGES.items():
            if key in optimizer:
                self.gauges[name] = float(optimizer[key])
        lr = record.lr if record.lr is not None else optimizer.get("lr")
        if lr is not None:
            self.gauges["zerotrain_training_learning_rate"] = float(lr)
        if "skipped_steps" in optimizer:
            self.skipped_steps = float(optimizer["skipped_steps"])
        if record.phase_seconds:
            self.phases = _bounded_phases(record.phase_seconds)
        if record.state_bytes_per_rank:
            self.state_bytes = {
                rank: float(n) for rank, n in enumerate(record.state_bytes_per_rank)
            }
        elif "state_bytes_per_rank" in optimizer:
            self.state_bytes[record.rank] = float(optimizer["state_bytes_per_rank"])
        step = float(record.step)
        if self.last_step is None or step > self.last_step:
            self.steps_total += step - (self.last_step or 0.0)
            self.last_progress = now
        self.last_step = step


class TrainingCollector(Collector):
    """Builds the per-job training families at scrape time from :class:`JobSeries`.

    Args:
        snapshot: returns a consistent copy of every job's series, by job id.
    """

    def __init__(self, snapshot: Callable[[], Mapping[str, JobSeries]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._snapshot())

    def _families(self, jobs: Mapping[str, JobSeries]) -> Iterator[Metric]:
        gauge_help = {name: text for name, text in RECORD_GAUGES.values()}
        gauge_help.update({name: text for name, text in OPTIMIZER_GAUGES.values()})
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


def _bounded_phases(phases: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in phases.items():
        label = key if key in PHASES else "other"
        out[label] = out.get(label, 0.0) + float(value)
    return out
