"""Ingestion: a worker's metrics record, checked, stored and exported.

:class:`Ingestion` is what the ``ReportMetrics`` rpc reaches through the job
manager. It validates the record (:mod:`zerotrain.service.records`), moves a PENDING
job to RUNNING on its first record and records a restart when the attempt
grows, stores the record through the :class:`JobWriter`, and hands it to the
Prometheus exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from zerotrain.service.job_writer import JobWriter
from zerotrain.service.model import TERMINAL_STATES, JobState
from zerotrain.service.records import check_late_record, check_record

__all__ = ["Ingestion"]

logger = logging.getLogger(__name__)


class Ingestion:
    """Takes metrics records from workers.

    Args:
        writer: the job store's writer.
        metrics_grace_s: how long after a job ended its ending attempt may
            still report.
        export: passes an accepted record on (``ServiceMetrics.record_training``);
            a ``ValueError`` from it is logged, never raised.
    """

    def __init__(
        self,
        writer: JobWriter,
        *,
        metrics_grace_s: float,
        export: Callable[[str, dict], None] | None = None,
    ) -> None:
        self.writer = writer
        self.store = writer.store
        self.metrics_grace_s = metrics_grace_s
        self._export = export

    def ingest(self, job_id: str, record: dict) -> None:
        """Take a metrics record; see :meth:`zerotrain.service.jobs.JobManager.ingest`."""
        attempt, checkpoint = check_record(job_id, record, run_dir=self.writer.run_dir(job_id))
        now = self.writer.clock()
        with self.writer.lock:
            job = self.store.get_job(job_id)
            finished = job.state in TERMINAL_STATES
            if finished:
                check_late_record(job, record, attempt, now=now, grace_s=self.metrics_grace_s)
            if job.state == JobState.PENDING:
                self.writer.transition(
                    job_id,
                    JobState.RUNNING,
                    "training started",
                    expect=(JobState.PENDING,),
                    started_at=now,
                    attempt=max(attempt, 1),
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
                job_id,
                record,
                now=now,
                attempt=attempt,
                checkpoint=checkpoint,
                append_event=not finished,
            )
        if self._export is not None:
            try:
                self._export(job_id, record)
            except ValueError as exc:
                logger.warning("metrics record of job %s not exported: %s", job_id, exc)
