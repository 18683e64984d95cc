"""JobManager: accepts jobs, runs them as Ray jobs, and keeps their state.

The manager knows jobs, not protobufs: the servicer converts requests into
calls here. Every change of a job is one store transaction that also appends
the matching event, so ``watch`` streams exactly what the store holds.

States::

    PENDING ──► RUNNING ──► SUCCEEDED | FAILED
       │           │
       └─────┬─────┘
             ▼
        CANCELLING ──► CANCELLED

* PENDING: accepted and submitted to Ray; Ray has not started it yet. It can
  also end FAILED directly (Ray refused the submission or lost the job).
* RUNNING: Ray started the job's driver (or a worker already sent metrics).
  Ray Train inside it may still be waiting for its workers' resources; the
  first metrics record shows that training has started.
  A restart after a worker failure stays RUNNING with a new ``attempt``
  (and a state event saying so).
* SUCCEEDED / FAILED / CANCELLED are terminal: nothing follows them.

Writers race (a cancel against the reconciliation loop against ingestion);
each transition is a compare-and-set on the current state, and the writes
that read before they write hold one manager lock.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import (
    AlreadyExists,
    ClusterUnavailable,
    InvalidArgument,
    JobFinished,
    PermissionDenied,
    SpecError,
    Unschedulable,
)
from service.ingest_token import ENV_TOKEN_FILE, remove_token_file, write_token_file
from service.model import TERMINAL_STATES, JobEvent, JobRecord, JobState
from service.ray_jobs import RayJobInfo, RayJobs, runtime_entrypoint
from service.records import check_late_record, check_record
from service.runtime.staging import STAGING_DIR
from service.spec import JobSpec
from service.store import JobStore
from service.tasks.registry import is_custom_task

if TYPE_CHECKING:
    from service.metrics import ServiceMetrics

__all__ = ["EntrypointFactory", "JobManager"]

logger = logging.getLogger(__name__)

# (job_id, spec_json, storage) -> the shell command Ray runs for the job.
EntrypointFactory = Callable[[str, str, Path], str]

ERROR_MARKER = "zerotrain: error:"
NO_METRICS_WARNING = "warning: no metrics record after"
MAX_REASON_CHARS = 2000
MAX_IDEMPOTENCY_KEY_CHARS = 128
_ACTIVE = (JobState.PENDING, JobState.RUNNING)
_UNFINISHED = (JobState.PENDING, JobState.RUNNING, JobState.CANCELLING)


class JobManager:
    """Jobs on a Ray cluster, persisted in a :class:`JobStore`.

    Args:
        store: where records and events live.
        ray: the Ray Jobs adapter.
        data_dir: the service's data directory; runs (checkpoints) go under
            ``data_dir / "runs"``.
        allow_custom_tasks: accept ``package.module:function`` tasks (they run
            arbitrary code on the cluster).
        ingest_address: ``host:port`` workers push metrics records to
            (``ZEROTRAIN_INGEST_ADDRESS``); ``None``: stdout only.
        ingest_token: bearer token the workers use for the ingestion rpc, or
            a function of the job id giving a per-job token.
        ingest_ca: PEM file of the CA that signed the service's TLS certificate,
            as the workers see it (``ZEROTRAIN_INGEST_CA``); ``None``: plaintext.
        metrics: Prometheus metrics to keep up to date.
        reconcile_interval_s: how often the store is brought in step with Ray.
        entrypoint_factory: builds a job's command; defaults to the runtime
            entry point (tests substitute a tiny command).
        final_metrics_grace_s: after Ray reports success of a job that sent
            metrics, how long to wait for its ``"final": true`` record before
            marking it SUCCEEDED, so the final record precedes the terminal event.
        cluster_lost_after_s: once Ray has been unreachable this long, every
            unfinished job already handed to Ray ends (FAILED, or CANCELLED if a
            cancel was pending) with the reason, instead of staying RUNNING forever.
        min_cpus_per_worker: this server's floor on ``scaling.cpus_per_worker``
            (a spec below it is refused, so tiny reservations cannot pile many
            torch processes onto few CPUs).
        max_workers_per_job: this server's cap on ``scaling.num_workers``.
        no_metrics_warning_s: a RUNNING job that has sent no metrics record this
            long after it started gets a warning event (same state, reason
            ``warning: ...``), once: its workers may not reach the service.
        metrics_grace_s: how long after a job ended its ending attempt may still
            report (its last records race the terminal state); after that, and
            for anything else, ingestion answers ``RecordRefused``.
    """

    def __init__(
        self,
        store: JobStore,
        ray: RayJobs,
        *,
        data_dir: Path,
        allow_custom_tasks: bool = False,
        ingest_address: str | None = None,
        ingest_token: str | Callable[[str], str] | None = None,
        ingest_ca: str | None = None,
        metrics: ServiceMetrics | None = None,
        reconcile_interval_s: float = 1.0,
        entrypoint_factory: EntrypointFactory | None = None,
        final_metrics_grace_s: float = 5.0,
        cluster_lost_after_s: float = 120.0,
        min_cpus_per_worker: float = 0.5,
        max_workers_per_job: int = 64,
        no_metrics_warning_s: float = 300.0,
        metrics_grace_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ray = ray
        self.data_dir = Path(data_dir)
        self.allow_custom_tasks = allow_custom_tasks
        self.ingest_address = ingest_address
        self.ingest_token = ingest_token
        self.ingest_ca = ingest_ca
        self.metrics = metrics
        self.reconcile_interval_s = reconcile_interval_s
        self.final_metrics_grace_s = final_metrics_grace_s
        self.cluster_lost_after_s = cluster_lost_after_s
        self.min_cpus_per_worker = min_cpus_per_worker
        self.max_workers_per_job = max_workers_per_job
        self.no_metrics_warning_s = no_metrics_warning_s
        self.metrics_grace_s = metrics_grace_s
        self.reconciliation_errors = 0
        self._unreachable_since: float | None = None
        self._entrypoint = entrypoint_factory or self._runtime_entrypoint
        self._clock = clock
        self._write_lock = threading.RLock()
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._submitting: set[str] = set()
        self._succeeded_seen: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Re-attach the store's unfinished jobs to Ray and start reconciliation."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self.reconcile()
        self._thread = threading.Thread(target=self._run, name="job-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reconciliation and end open watch streams (jobs keep running in Ray)."""
        self._stopping.set()
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self.reconcile_interval_s):
            self.reconcile()

    # -- requests --------------------------------------------------------

    def submit(
        self, spec: JobSpec, *, owner: str, idempotency_key: str | None = None
    ) -> JobRecord:
        """Accept a job and submit it to Ray.

        A repeated ``idempotency_key`` of the same owner with the same spec
        returns the job the first request created; nothing new is started.

        Raises:
            AlreadyExists: the key was used before with a different spec.
            PermissionDenied: a custom task while they are disabled.
            Unschedulable: the cluster can never provide the resources asked for.
            ClusterUnavailable: Ray cannot be reached (nothing was stored).
            InvalidArgument: a bad owner or idempotency key.
        """
        if not isinstance(owner, str) or not owner:
            raise InvalidArgument("owner: must be a non-empty string")
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not (
                0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
            ):
                raise InvalidArgument(
                    f"idempotency_key: must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters, "
                    f"got {len(idempotency_key) if isinstance(idempotency_key, str) else idempotency_key!r}"
                )
            existing = self.store.find_by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return _same_spec_or_raise(existing, spec)
        if is_custom_task(spec.task) and not self.allow_custom_tasks:
            raise PermissionDenied(
                f"task: custom tasks ({spec.task!r}) run arbitrary code and are disabled on "
                "this server; use a registered task or start the server with custom tasks allowed"
            )
        self._check_schedulable(spec)

        now = self._clock()
        job_id = f"j-{uuid.uuid4().hex[:16]}"
        with self._write_lock:
            self._submitting.add(job_id)  # keeps reconciliation from launching it too
        record = JobRecord(
            job_id=job_id,
            owner=owner,
            spec=spec,
            state=JobState.PENDING,
            state_reason="accepted; waiting for resources",
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
            attempt=0,
            latest_metrics=None,
            checkpoint=None,
            idempotency_key=idempotency_key,
            ray_job_id=None,
        )
        try:
            record, created = self.store.create_job(record)
        except BaseException:
            self._submitting.discard(job_id)
            raise
        if not created:  # a concurrent request with the same key won
            self._submitting.discard(job_id)
            return _same_spec_or_raise(record, spec)
        self._notify()
        if self.metrics is not None:
            self.metrics.inc_submissions()
        self._launch(record)
        return self.store.get_job(record.job_id)

    def get(self, job_id: str) -> JobRecord:
        """The job's record; raises :class:`~service.errors.JobNotFound`."""
        return self.store.get_job(job_id)

    def list(
        self,
        *,
        owner: str | None = None,
        state: JobState | None = None,
        labels: dict[str, str] | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """Jobs matching every filter, newest first; returns ``(page, next_page_token)``."""
        return self.store.list_jobs(
            owner=owner, state=state, labels=labels, page_size=page_size, page_token=page_token
        )

    def cancel(self, job_id: str) -> JobRecord:
        """Stop a job: CANCELLING now, CANCELLED once Ray confirms it stopped.

        Cancelling a job that is already CANCELLING returns it unchanged.

        Raises:
            JobFinished: the job already reached a terminal state.
        """
        with self._write_lock:
            record = self.store.get_job(job_id)
            if record.state in TERMINAL_STATES:
                raise JobFinished(job_id, record.state.value)
            if record.state == JobState.CANCELLING:
                return record
            if record.ray_job_id is None and job_id not in self._submitting:
                # Accepted but never handed to Ray (e.g. the submission failed to reach it).
                result = self._transition(
                    job_id,
                    JobState.CANCELLED,
                    "cancelled before it was submitted to Ray",
                    expect=_ACTIVE,
                )
            else:
                result = self._transition(
                    job_id, JobState.CANCELLING, "cancel requested", expect=_ACTIVE
                )
            if result is None:  # lost a race with a terminal transition
                record = self.store.get_job(job_id)
                raise JobFinished(job_id, record.state.value)
            record = result
        if record.state == JobState.CANCELLING and record.ray_job_id is not None:
            self._stop_in_ray(record)
        return self.store.get_job(job_id)

    def watch(
        self, job_id: str, from_sequence: int = 0, *, stop: threading.Event | None = None
    ) -> Iterator[JobEvent]:
        """Every event of the job with ``sequence > from_sequence``, live.

        Blocks for new events; ends after the terminal state event, when
        ``stop`` is set, or when the manager stops. Resuming with the last
        sequence seen gives neither gaps nor repeats (old metrics events beyond
        the store's cap may have been pruned; state events never are).

        Raises:
            JobNotFound: at once, not on the first ``next()``.
        """
        if isinstance(from_sequence, bool) or not isinstance(from_sequence, int) or (
            from_sequence < 0
        ):
            raise InvalidArgument(f"from_sequence: must be an integer >= 0, got {from_sequence!r}")
        self.store.get_job(job_id)
        return self._watch(job_id, from_sequence, stop)

    def _watch(
        self, job_id: str, after: int, stop: threading.Event | None
    ) -> Iterator[JobEvent]:
        while True:
            events = self.store.events(job_id, after, limit=500)
            for event in events:
                yield event
                after = event.sequence
                if event.kind == "state" and event.state in TERMINAL_STATES:
                    return
            if events:
                continue
            finished = self.store.get_job(job_id).state in TERMINAL_STATES
            # Read after the state: a terminal event committed meanwhile is counted.
            if self.store.last_sequence(job_id) > after:
                continue
            if finished:
                return  # resumed after the terminal event
            if self._stopping.is_set() or (stop is not None and stop.is_set()):
                return
            with self._changed:
                # Re-check under the condition's lock: no wake-up can be lost.
                if self.store.last_sequence(job_id) <= after:
                    self._changed.wait(timeout=1.0)

    def logs(
        self, job_id: str, *, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """The job's driver log lines (without newlines), from Ray.

        With ``follow``, waits for the job to start and streams lines until the
        job ends or ``stop`` is set.

        Raises:
            JobNotFound: at once, not on the first ``next()``.
        """
        self.store.get_job(job_id)
        return self._logs(job_id, follow, stop)

    def _logs(self, job_id: str, follow: bool, stop: threading.Event | None) -> Iterator[str]:
        record = self.store.get_job(job_id)
        if not follow:
            if record.ray_job_id is not None:
                yield from self.ray.logs(record.ray_job_id).splitlines()
            return
        while record.ray_job_id is None:
            if record.state in TERMINAL_STATES or self._stopping.is_set():
                return
            if stop is not None and stop.wait(0.5):
                return
            if stop is None:
                time.sleep(0.5)
            record = self.store.get_job(job_id)
        partial = ""
        for chunk in self.ray.tail_logs(record.ray_job_id, stop=_Either(stop, self._stopping)):
            *lines, partial = (partial + chunk).split("\n")
            yield from lines
        if partial:
            yield partial

    def ingest(self, job_id: str, record: dict) -> None:
        """Take a metrics record from a worker (see the metrics record contract).

        Appends a ``"metrics"`` event, updates the job's latest metrics, its
        attempt (``record["attempt"]``) and checkpoint (``record.get("checkpoint")``,
        ``{step, path[, time]}``, a path inside the job's run directory). A
        record for a PENDING job moves it to RUNNING; a higher attempt adds a
        state event for the restart. After the job's terminal event only the
        ending attempt's own records are taken, for ``metrics_grace_s``
        (:func:`service.records.check_late_record`); they update the job but
        add no event.

        Raises:
            JobNotFound: unknown job.
            InvalidArgument: the record is malformed (each field named).
            RecordRefused: the job ended and takes no such record (final).
        """
        attempt, checkpoint = check_record(job_id, record, run_dir=self.run_dir(job_id))
        now = self._clock()
        with self._write_lock:
            job = self.store.get_job(job_id)
            finished = job.state in TERMINAL_STATES
            if finished:
                check_late_record(job, record, attempt, now=now, grace_s=self.metrics_grace_s)
            if job.state == JobState.PENDING:
                self._transition(
                    job_id,
                    JobState.RUNNING,
                    "training started",
                    expect=(JobState.PENDING,),
                    started_at=now,
                    attempt=max(attempt, 1),
                )
            elif job.state == JobState.RUNNING and attempt > job.attempt >= 1:
                self._transition(
                    job_id,
                    JobState.RUNNING,
                    f"attempt {attempt}: restarted from the last checkpoint after a failure",
                    expect=(JobState.RUNNING,),
                    attempt=attempt,
                )
            self.store.append_metrics(
                job_id,
                record,
                now=now,
                attempt=attempt,
                checkpoint=checkpoint,
                append_event=not finished,
            )
        self._notify()
        if self.metrics is not None:
            try:
                self.metrics.record_training(job_id, record)
            except ValueError as exc:
                logger.warning("metrics record of job %s not exported: %s", job_id, exc)

    # -- Ray -------------------------------------------------------------

    def _check_schedulable(self, spec: JobSpec) -> None:
        self._check_server_limits(spec)
        try:
            res = self.ray.cluster_resources()
        except Exception as exc:
            raise ClusterUnavailable(f"cannot reach the Ray cluster to check resources: {exc}") from exc
        if res.num_nodes == 0:
            raise ClusterUnavailable("the Ray cluster has no alive nodes yet; retry shortly")
        scaling = spec.scaling
        need_cpus = scaling.num_workers * scaling.cpus_per_worker
        problems = []
        if scaling.cpus_per_worker > res.max_node_cpus:
            problems.append(
                f"scaling.cpus_per_worker: each worker needs {scaling.cpus_per_worker:g} CPUs "
                f"on one node, but the largest node has {res.max_node_cpus:g}"
            )
        elif need_cpus > res.total_cpus:
            problems.append(
                f"scaling: {scaling.num_workers} workers x {scaling.cpus_per_worker:g} CPUs = "
                f"{need_cpus:g} CPUs, but the cluster has {res.total_cpus:g} CPUs in total"
            )
        if scaling.use_gpu:
            if res.max_node_gpus < 1:
                problems.append("scaling.use_gpu: the cluster has no GPUs")
            elif scaling.num_workers > res.total_gpus:
                problems.append(
                    f"scaling: {scaling.num_workers} workers need one GPU each, "
                    f"but the cluster has {res.total_gpus:g} GPUs in total"
                )
        if problems:
            raise Unschedulable(
                "the cluster can never run this job: " + "; ".join(problems)
                + f" ({res.num_nodes} node(s) alive). Ask for fewer resources."
            )

    def _check_server_limits(self, spec: JobSpec) -> None:
        """This server's settings on a spec's size (not part of the spec shared with clients)."""
        scaling = spec.scaling
        errors = []
        if scaling.cpus_per_worker < self.min_cpus_per_worker:
            errors.append(
                f"scaling.cpus_per_worker: must be >= {self.min_cpus_per_worker:g} on this "
                f"server (its --min-cpus-per-worker), got {scaling.cpus_per_worker:g}"
            )
        if scaling.num_workers > self.max_workers_per_job:
            errors.append(
                f"scaling.num_workers: must be <= {self.max_workers_per_job} on this server "
                f"(its --max-workers-per-job), got {scaling.num_workers}"
            )
        if errors:
            raise SpecError(errors)

    def run_dir(self, job_id: str) -> Path:
        """Where the job's checkpoints and run files live (Ray Train's experiment dir)."""
        return self.data_dir / "runs" / job_id

    def _launch(self, record: JobRecord) -> None:
        """Hand an accepted job to Ray; a failure to do so fails the job.

        The caller has put the job id in ``_submitting``; this removes it.
        """
        job_id = record.job_id
        env = {"ZEROTRAIN_JOB_ID": job_id}
        if self.ingest_address:
            env["ZEROTRAIN_INGEST_ADDRESS"] = self.ingest_address
        if self.ingest_ca:
            env["ZEROTRAIN_INGEST_CA"] = self.ingest_ca
        spec_json = json.dumps(record.spec.to_dict(), separators=(",", ":"), sort_keys=True)
        entrypoint = self._entrypoint(job_id, spec_json, self.data_dir / "runs")
        try:
            if self.ingest_token:
                token = self.ingest_token
                # Only the file's path goes to Ray: Ray logs a job's runtime env.
                path = write_token_file(
                    self.run_dir(job_id), token(job_id) if callable(token) else token
                )
                env[ENV_TOKEN_FILE] = str(path)
            ray_job_id = self.ray.submit(
                job_id, entrypoint, env=env, metadata={"zerotrain_job_id": job_id}
            )
        except Exception as exc:
            logger.warning("submitting job %s to Ray failed: %s", job_id, exc)  # or its token file
            with self._write_lock:
                self._submitting.discard(job_id)
                self._transition(
                    job_id,
                    JobState.FAILED,
                    _truncate(f"could not submit the job to Ray: {exc}"),
                    expect=_ACTIVE,
                )
                self._transition(
                    job_id,
                    JobState.CANCELLED,
                    "cancelled before it was submitted to Ray",
                    expect=(JobState.CANCELLING,),
                )
            return
        with self._write_lock:
            self._submitting.discard(job_id)
            result = self.store.update_job(job_id, now=self._clock(), ray_job_id=ray_job_id)
        assert result is not None  # no compare-and-set, so always a record
        updated = result[0]
        if updated.state == JobState.CANCELLING:  # cancelled while we were submitting
            self._stop_in_ray(updated)

    def _runtime_entrypoint(self, job_id: str, spec_json: str, storage: Path) -> str:
        return runtime_entrypoint(
            job_id, spec_json, storage, allow_custom_tasks=self.allow_custom_tasks
        )

    def _stop_in_ray(self, record: JobRecord) -> None:
        assert record.ray_job_id is not None
        try:
            self.ray.stop(record.ray_job_id)
        except Exception as exc:  # reconciliation retries
            logger.warning("stopping Ray job %s failed (will retry): %s", record.ray_job_id, exc)

    def reconcile(self) -> None:
        """Bring every unfinished job in step with Ray once (the loop calls this)."""
        unreachable: OSError | None = None
        for record in self.store.jobs_in_states(_UNFINISHED):
            try:
                self._reconcile_job(record)
            except OSError as exc:  # Ray's HTTP client raises OSErrors when it cannot connect
                unreachable = exc
                self.reconciliation_errors += 1
                if self.metrics is not None:
                    self.metrics.inc_reconciliation_errors()
                logger.warning("reconciling job %s: Ray unreachable: %s", record.job_id, exc)
            except Exception:
                self.reconciliation_errors += 1
                if self.metrics is not None:
                    self.metrics.inc_reconciliation_errors()
                logger.exception("reconciling job %s failed", record.job_id)
        if unreachable is None:
            self._unreachable_since = None
        else:
            self._end_jobs_if_cluster_lost(unreachable)
        self._warn_about_silent_jobs()
        if self.metrics is not None:
            self.metrics.set_job_states(self.store.count_by_state())

    def _warn_about_silent_jobs(self) -> None:
        """Give a RUNNING job that never sent a metrics record a warning event, once."""
        now = self._clock()
        for record in self.store.jobs_in_states((JobState.RUNNING,)):
            started = record.started_at
            if (
                record.latest_metrics is not None
                or started is None
                or now - started < self.no_metrics_warning_s
                or record.state_reason.startswith(NO_METRICS_WARNING)
            ):
                continue
            self._transition(
                record.job_id,
                JobState.RUNNING,
                f"{NO_METRICS_WARNING} {now - started:.0f} s: still waiting for resources, "
                "or its workers cannot reach the service (see the job's log for "
                "ZEROTRAIN_INGEST_* errors)",
                expect=(JobState.RUNNING,),
            )

    def _end_jobs_if_cluster_lost(self, error: OSError) -> None:
        """After ``cluster_lost_after_s`` without reaching Ray, end its unfinished jobs."""
        now = self._clock()
        if self._unreachable_since is None:
            self._unreachable_since = now
        lost_for = now - self._unreachable_since
        if lost_for < self.cluster_lost_after_s:
            return
        reason = _truncate(
            f"lost contact with the Ray cluster at {getattr(self.ray, 'address', '?')} for "
            f"{lost_for:.0f} s ({error}); the job's workers are gone or can no longer be observed"
        )
        for record in self.store.jobs_in_states(_UNFINISHED):
            if record.ray_job_id is None:
                continue  # never reached Ray: reconciliation submits it once Ray is back
            state = JobState.CANCELLED if record.state == JobState.CANCELLING else JobState.FAILED
            self._transition(record.job_id, state, reason, expect=(record.state,))

    def _reconcile_job(self, record: JobRecord) -> None:
        job_id = record.job_id
        if record.ray_job_id is None:
            if job_id in self._submitting:
                return
            if record.state == JobState.CANCELLING:
                self._transition(
                    job_id,
                    JobState.CANCELLED,
                    "cancelled before it was submitted to Ray",
                    expect=(JobState.CANCELLING,),
                )
                return
            # Accepted, then the service stopped before handing it to Ray.
            # The Ray submission id is the job id, so this cannot start it twice.
            with self._write_lock:
                self._submitting.add(job_id)
            self._launch(record)
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
                self._stop_in_ray(record)  # stop is idempotent; retry until Ray stops it
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
            self._transition(
                job_id, JobState.SUCCEEDED, reason, expect=_UNFINISHED, finished_at=info.end_time or self._clock()
            )
        elif record.state == JobState.CANCELLING:
            self._transition(
                job_id,
                JobState.CANCELLED,
                "cancelled by request",
                expect=(JobState.CANCELLING,),
                finished_at=info.end_time or self._clock(),
            )
        elif status == "STOPPED":
            self._transition(
                job_id,
                JobState.CANCELLED,
                "stopped in Ray outside the service",
                expect=_ACTIVE,
                finished_at=info.end_time or self._clock(),
            )
        else:  # FAILED
            self._transition(
                job_id,
                JobState.FAILED,
                self._failure_reason(record.ray_job_id, info),
                expect=_ACTIVE,
                finished_at=info.end_time or self._clock(),
            )

    def _mark_running(self, record: JobRecord) -> None:
        self._transition(
            record.job_id,
            JobState.RUNNING,
            "started",
            expect=(JobState.PENDING,),
            started_at=self._clock(),
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
        first = self._succeeded_seen.setdefault(record.job_id, self._clock())
        return self._clock() - first >= self.final_metrics_grace_s

    def _finish_missing(self, record: JobRecord) -> None:
        if record.state == JobState.CANCELLING:
            self._transition(
                record.job_id, JobState.CANCELLED, "cancelled by request", expect=(JobState.CANCELLING,)
            )
            return
        self._transition(
            record.job_id,
            JobState.FAILED,
            f"Ray has no record of job {record.ray_job_id!r} "
            "(was the Ray cluster restarted or the job deleted?)",
            expect=_ACTIVE,
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
            return _truncate(f"{error} (Ray: {ray_message})")
        return _truncate(error or ray_message or "the job failed (Ray gave no reason)")

    # -- helpers ---------------------------------------------------------

    def _transition(
        self,
        job_id: str,
        state: JobState,
        reason: str,
        *,
        expect: tuple[JobState, ...],
        **fields: Any,
    ) -> JobRecord | None:
        """Compare-and-set the job's state; returns the new record or ``None``."""
        with self._write_lock:
            now = self._clock()
            if state in TERMINAL_STATES:
                fields.setdefault("finished_at", now)
            result = self.store.update_job(
                job_id,
                state=state,
                reason=reason,
                expect_states=expect,
                now=now,
                **fields,
            )
        if result is None:
            return None
        self._notify()
        if state in TERMINAL_STATES:
            self._succeeded_seen.pop(job_id, None)
            self._clean_run_dir(job_id)
            if self.metrics is not None:
                self.metrics.job_finished(job_id)
        return result[0]

    def _clean_run_dir(self, job_id: str) -> None:
        """An ended job's token file and checkpoint staging leftovers go (Ray has stopped it)."""
        run_dir = self.run_dir(job_id)
        try:
            remove_token_file(run_dir)
            shutil.rmtree(run_dir / STAGING_DIR, ignore_errors=True)
        except OSError as exc:  # never fails the transition
            logger.warning("cleaning the run directory of job %s: %s", job_id, exc)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


class _Either:
    """Set when either event is set (a manager stop ends caller streams too)."""

    def __init__(self, first: threading.Event | None, second: threading.Event) -> None:
        self._events = [e for e in (first, second) if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def _same_spec_or_raise(existing: JobRecord, spec: JobSpec) -> JobRecord:
    """The job an idempotency key names, if it was created from ``spec``."""
    if existing.spec.to_dict() != spec.to_dict():
        assert existing.idempotency_key is not None
        raise AlreadyExists(existing.idempotency_key, existing.job_id)
    return existing


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
