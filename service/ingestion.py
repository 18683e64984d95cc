"""Ingestion: a worker's metrics record, checked against its job, stored and exported.

:class:`Ingestion` is what the ``ReportMetrics`` rpc reaches through the job
manager. The record arrives validated (:class:`~zerotrain.service.records.MetricsRecord`,
built at the edge); what is left are the rules that need the job: a reported
checkpoint lies in the job's run directory (:func:`check_checkpoint`), and
after the job ended only the ending attempt's own records are taken
(:func:`check_late_record`). Ingestion then moves a PENDING job to RUNNING on
its first record and records a restart when the attempt grows, stores the
record through the :class:`JobWriter`, and hands it to the Prometheus exporter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from zerotrain.service.errors import InvalidArgument, RecordRefused
from zerotrain.service.job_writer import JobWriter
from zerotrain.service.model import TERMINAL_STATES, CheckpointInfo, JobRecord, JobState
from zerotrain.service.records import MetricsRecord

__all__ = ["Ingestion", "check_checkpoint", "check_late_record"]


class Ingestion:
    """Takes metrics records from workers.

    Args:
        writer: the job store's writer.
        metrics_grace_s: how long after a job ended its ending attempt may
            still report.
        export: passes an accepted record on (``ServiceMetrics.record_training``).
    """

    def __init__(
        self,
        writer: JobWriter,
        *,
        metrics_grace_s: float,
        export: Callable[[MetricsRecord], None] | None = None,
    ) -> None:
        self.writer = writer
        self.store = writer.store
        self.metrics_grace_s = metrics_grace_s
        self._export = export

    def ingest(self, record: MetricsRecord) -> None:
        """Take a metrics record; see :meth:`zerotrain.service.jobs.JobManager.ingest`."""
        job_id, attempt = record.job_id, record.attempt
        now = self.writer.clock()
        checkpoint = check_checkpoint(record, run_dir=self.writer.run_dir(job_id), now=now)
        with self.writer.lock:
            job = self.store.get_job(job_id)
            finished = job.state in TERMINAL_STATES
            if finished:
                check_late_record(job, record, now=now, grace_s=self.metrics_grace_s)
            if job.state == JobState.PENDING:
                self.writer.transition(
                    job_id,
                    JobState.RUNNING,
                    "training started",
                    expect=(JobState.PENDING,),
                    started_at=now,
                    attempt=attempt,
                )
            elif job.state == JobState.RUNNING and attempt > job.attempt >= 1:
                self.writer.transition(
                    job_id,
                    JobState.RUNNING,
                    f"attempt {attempt}: restarted from the last checkpoint after a failure",
                    expect=(JobState.RUNNING,),
                    attempt=attempt,
                )
            self.writer.append_metrics(
                record, now=now, checkpoint=checkpoint, append_event=not finished
            )
        if self._export is not None:
            self._export(record)


def check_checkpoint(record: MetricsRecord, *, run_dir: Path, now: float) -> CheckpointInfo | None:
    """The job's new checkpoint from ``record``, if it reports one inside ``run_dir``.

    An unset checkpoint time is the record's own time, else ``now``.

    Raises:
        InvalidArgument: the path lies outside the job's run directory.
    """
    reported = record.checkpoint
    if reported is None:
        return None
    if not _inside(reported.path, run_dir):
        raise InvalidArgument(
            f"record.checkpoint.path: must be inside the job's run directory "
            f"{run_dir}, got {reported.path[:200]!r}"
        )
    when = reported.time if reported.time is not None else (record.time or now)
    return CheckpointInfo(step=reported.step, path=reported.path, time=float(when))


def _inside(path: str, run_dir: Path) -> bool:
    """Whether ``path`` (normalised, never resolved) names something under ``run_dir``.

    The run directory counts as given and with its symlinks resolved (workers
    report paths under the resolved storage path).
    """
    normal = os.path.normpath(path)
    roots = {str(run_dir).rstrip("/"), os.path.realpath(run_dir).rstrip("/")}
    return os.path.isabs(normal) and any(normal.startswith(root + "/") for root in roots)


def check_late_record(
    job: JobRecord, record: MetricsRecord, *, now: float, grace_s: float
) -> None:
    """Refuse a record for a job in a terminal state unless it is the ending attempt's own.

    Accepted: within ``grace_s`` of the end, ``attempt`` equal to the job's,
    ``step`` not below the latest record's, and not above the final record's
    (or, with no final record yet, the spec's ``max_steps``).

    Raises:
        RecordRefused: why, and that nothing more will be accepted for the job.
    """
    ended = job.finished_at if job.finished_at is not None else job.updated_at
    if now - ended > grace_s:
        raise RecordRefused(
            job.job_id,
            f"ended ({job.state.value}) {now - ended:.0f} s ago; records are accepted for "
            f"{grace_s:g} s after the end and its ingest token ended with that window",
        )
    if record.attempt != job.attempt:
        raise RecordRefused(
            job.job_id,
            f"ended ({job.state.value}) with attempt {job.attempt}; record.attempt "
            f"{record.attempt} is not the ending attempt",
        )
    latest = job.latest_metrics or {}
    low = latest.get("step", 0)
    high = low if latest.get("final") else job.spec.training.max_steps
    if not low <= record.step <= high:
        raise RecordRefused(
            job.job_id,
            f"ended ({job.state.value}); record.step must stay within [{low}, {high}] "
            f"(never backwards, never past the final record), got {record.step}",
        )
