"""The reconciler: polls Ray and brings the store's unfinished jobs in step with it.

One :meth:`Reconciler.reconcile` pass looks at every PENDING, RUNNING or
CANCELLING job: it submits a job that never reached Ray, marks a started job
RUNNING, retries a pending stop, and records how a job ended in Ray
(SUCCEEDED, FAILED with the reason from its log, CANCELLED). Around the pass
it handles a lost cluster (after ``cluster_lost_after_s`` without reaching
Ray, the jobs it held end) and warns, once, about running jobs that never
sent a metrics record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from zerotrain.service.job_writer import ACTIVE, UNFINISHED, JobWriter, truncate
from zerotrain.service.model import JobRecord, JobState
from zerotrain.service.ray_jobs import RayJobInfo, RayJobs
from zerotrain.service.submission import Submissions

__all__ = ["ERROR_MARKER", "NO_METRICS_WARNING", "Reconciler"]

logger = logging.getLogger(__name__)

ERROR_MARKER = "zerotrain: error:"
"""Marks the line of a job's log that gives the reason it failed."""
NO_METRICS_WARNING = "warning: no metrics record after"
"""Start of the state reason of a running job that has sent no metrics record."""


class Reconciler:
    """Keeps the store in step with Ray, one :meth:`reconcile` pass at a time.

    Args:
        writer: the job store's writer.
        ray: the Ray Jobs adapter.
        submissions: launches jobs that never reached Ray and stops cancelled ones.
        final_metrics_grace_s: how long a job Ray reports as succeeded may wait
            for its ``"final": true`` metrics record before it is SUCCEEDED.
        cluster_lost_after_s: how long Ray may be unreachable before the jobs it
            held end.
        no_metrics_warning_s: how long a RUNNING job may go without a metrics
            record before it gets a warning event.
        on_error: called after each failed reconciliation of a job.
    """

    def __init__(
        self,
        writer: JobWriter,
        ray: RayJobs,
        submissions: Submissions,
        *,
        final_metrics_grace_s: float,
        cluster_lost_after_s: float,
        no_metrics_warning_s: float,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.writer = writer
        self.store = writer.store
        self.ray = ray
        self.submissions = submissions
        self.final_metrics_grace_s = final_metrics_grace_s
        self.cluster_lost_after_s = cluster_lost_after_s
        self.no_metrics_warning_s = no_metrics_warning_s
        self._on_error = on_error
        self._unreachable_since: float | None = None
        self._succeeded_seen: dict[str, float] = {}

    def reconcile(self) -> None:
        """Bring every unfinished job in step with Ray once."""
        unreachable: OSError | None = None
        for record in self.store.jobs_in_states(UNFINISHED):
            try:
                self._reconcile_job(record)
            except OSError as exc:  # Ray's HTTP client raises OSErrors when it cannot connect
                unreachable = exc
                self._on_error()
                logger.warning("reconciling job %s: Ray unreachable: %s", record.job_id, exc)
            except Exception:
                self._on_error()
                logger.exception("reconciling job %s failed", record.job_id)
        if unreachable is None:
            self._unreachable_since = None
        else:
            self._end_jobs_if_cluster_lost(unreachable)
        self._warn_about_silent_jobs()

    def forget(self, job_id: str) -> None:
        """Drop what the reconciler remembers about a job that ended."""
        self._succeeded_seen.pop(job_id, None)

    def _warn_about_silent_jobs(self) -> None:
        """Give a RUNNING job that never sent a metrics record a warning event, once."""
        now = self.writer.clock()
        for record in self.store.jobs_in_states((JobState.RUNNING,)):
            started = record.started_at
            if (
                record.latest_metrics is not None
                or started is None
                or now - started < self.no_metrics_warning_s
                or record.state_reason.startswith(NO_METRICS_WARNING)
            ):
                continue
            self.writer.transition(
                record.job_id,
                JobState.RUNNING,
                f"{NO_METRICS_WARNING} {now - started:.0f} s: still waiting for resources, "
                "or its workers cannot reach the service (see the job's log for "
                "ZEROTRAIN_INGEST_* errors)",
                expect=(JobState.RUNNING,),
            )

    def _end_jobs_if_cluster_lost(self, error: OSError) -> None:
        """After ``cluster_lost_after_s`` without reaching Ray, end its unfinished jobs."""
        now = self.writer.clock()
        if self._unreachable_since is None:
            self._unreachable_since = now
        lost_for = now - self._unreachable_since
        if lost_for < self.cluster_lost_after_s:
            return
        reason = truncate(
            f"lost contact with the Ray cluster at {getattr(self.ray, 'address', '?')} for "
            f"{lost_for:.0f} s ({error}); the job's workers are gone or can no longer be observed"
        )
        for record in self.store.jobs_in_states(UNFINISHED):
            if record.ray_job_id is None:
                continue  # never reached Ray: reconciliation submits it once Ray is back
            state = JobState.CANCELLED if record.state == JobState.CANCELLING else JobState.FAILED
            self.writer.transition(record.job_id, state, reason, expect=(record.state,))

    def _reconcile_job(self, record: JobRecord) -> None:
        job_id = record.job_id
        if record.ray_job_id is None:
            if self.submissions.is_submitting(job_id):
                return
            if record.state == JobState.CANCELLING:
                self.writer.transition(
                    job_id,
                    JobState.CANCELLED,
                    "cancelled before it was submitted to Ray",
                    expect=(JobState.CANCELLING,),
                )
                return
            # Accepted, then the service stopped before handing it to Ray.
            self.submissions.relaunch(record)
            return
        info = self.ray.info(record.ray_job_id)
        if info is None:
            self._finish_missing(record)
            return
        status = info.status
        if status == "PENDING":
            return
        if status == "RUNNING":
            if record.state == JobState.PENDING:
                self._mark_running(record)
            elif record.state == JobState.CANCELLING:
                self.submissions.stop_in_ray(record)  # idempotent; retry until Ray stops it
            return
        # Terminal in Ray. A job that ran (its entrypoint exited, or it
        # succeeded) between two polls still shows its RUNNING transition.
        if record.state == JobState.PENDING and (
            status == "SUCCEEDED" or info.driver_exit_code is not None
        ):
            self._mark_running(record)
        if status == "SUCCEEDED":
            if not self._final_metrics_arrived(record):
                return
            reason = "finished successfully"
            if record.state == JobState.CANCELLING:
                reason = "finished successfully before the cancel took effect"
            self.writer.transition(
                job_id,
                JobState.SUCCEEDED,
                reason,
                expect=UNFINISHED,
                finished_at=info.end_time or self.writer.clock(),
            )
        elif record.state == JobState.CANCELLING:
            self.writer.transition(
                job_id,
                JobState.CANCELLED,
                "cancelled by request",
                expect=(JobState.CANCELLING,),
                finished_at=info.end_time or self.writer.clock(),
            )
        elif status == "STOPPED":
            self.writer.transition(
                job_id,
                JobState.CANCELLED,
                "stopped in Ray outside the service",
                expect=ACTIVE,
                finished_at=info.end_time or self.writer.clock(),
            )
        else:  # FAILED
            self.writer.transition(
                job_id,
                JobState.FAILED,
                self._failure_reason(record.ray_job_id, info),
                expect=ACTIVE,
                finished_at=info.end_time or self.writer.clock(),
            )

    def _mark_running(self, record: JobRecord) -> None:
        self.writer.transition(
            record.job_id,
            JobState.RUNNING,
            "started",
            expect=(JobState.PENDING,),
            started_at=self.writer.clock(),
            attempt=max(record.attempt, 1),
        )

    def _final_metrics_arrived(self, record: JobRecord) -> bool:
        """Whether to mark a job Ray reports as succeeded SUCCEEDED now.

        Workers push their last metrics record just before the job exits; if
        the job sent metrics but not yet the ``final`` one, wait a little so
        that record lands before the terminal event, not after it.
        """
        latest = record.latest_metrics
        if latest is None or latest.get("final"):
            return True
        first = self._succeeded_seen.setdefault(record.job_id, self.writer.clock())
        return self.writer.clock() - first >= self.final_metrics_grace_s

    def _finish_missing(self, record: JobRecord) -> None:
        if record.state == JobState.CANCELLING:
            self.writer.transition(
                record.job_id,
                JobState.CANCELLED,
                "cancelled by request",
                expect=(JobState.CANCELLING,),
            )
            return
        self.writer.transition(
            record.job_id,
            JobState.FAILED,
            f"Ray has no record of job {record.ray_job_id!r} "
            "(was the Ray cluster restarted or the job deleted?)",
            expect=ACTIVE,
        )

    def _failure_reason(self, ray_job_id: str, info: RayJobInfo) -> str:
        """The last ``zerotrain: error:`` line of the job's log, plus Ray's message."""
        error = ""
        try:
            for line in reversed(self.ray.logs(ray_job_id).splitlines()):
                if ERROR_MARKER in line:
                    error = line[line.index(ERROR_MARKER) + len(ERROR_MARKER) :].strip()
                    break
        except Exception as exc:  # the reason is still useful without the log
            logger.warning("reading the log of Ray job %s failed: %s", ray_job_id, exc)
        ray_message = info.message.strip().splitlines()[0] if info.message.strip() else ""
        if error and ray_message:
            return truncate(f"{error} (Ray: {ray_message})")
        return truncate(error or ray_message or "the job failed (Ray gave no reason)")
