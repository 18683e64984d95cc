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

The manager is a facade over small pieces, each readable alone:

* :mod:`zerotrain.service.job_writer`: the only writer of the job store (creation,
  compare-and-set transitions, metrics), with the terminal-state hooks;
* :mod:`zerotrain.service.submission`: submit (checks, run files, Ray submission) and cancel;
* :mod:`zerotrain.service.reconciler`: polls Ray and records what happened to each job;
* :mod:`zerotrain.service.ingestion`: metrics records from the workers;
* :mod:`zerotrain.service.event_streams`: ``watch`` and ``logs`` (read-only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from zerotrain.service.event_streams import EventStreams
from zerotrain.service.ingestion import Ingestion
from zerotrain.service.job_writer import JobWriter
from zerotrain.service.model import JobEvent, JobRecord, JobState
from zerotrain.service.ray_jobs import RayJobs, runtime_entrypoint
from zerotrain.service.reconciler import Reconciler
from zerotrain.service.records import MetricsRecord
from zerotrain.service.spec import JobSpec
from zerotrain.service.store import JobStore
from zerotrain.service.submission import EntrypointFactory, Submissions

if TYPE_CHECKING:
    from zerotrain.service.metrics import ServiceMetrics

__all__ = ["JobManager"]


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
        entrypoint_factory: builds a job's command from ``(job_id, spec_path,
            runs_dir)``, ``spec_path`` being the job's ``spec.json`` (already
            written); defaults to the runtime entry point (tests substitute a
            tiny command).
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
        self.metrics = metrics
        self.reconcile_interval_s = reconcile_interval_s
        self.reconciliation_errors = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

        finished_hooks: list[Callable[[str], None]] = [self._forget]
        if metrics is not None:
            finished_hooks.append(metrics.job_finished)
        self._writer = JobWriter(
            store, runs_dir=self.data_dir / "runs", clock=clock, on_finished=finished_hooks
        )
        self._submissions = Submissions(
            self._writer,
            ray,
            entrypoint=entrypoint_factory or self._runtime_entrypoint,
            ingest_address=ingest_address,
            ingest_ca=ingest_ca,
            ingest_token=ingest_token,
            allow_custom_tasks=allow_custom_tasks,
            min_cpus_per_worker=min_cpus_per_worker,
            max_workers_per_job=max_workers_per_job,
            on_submitted=metrics.inc_submissions if metrics is not None else lambda: None,
        )
        self._reconciler = Reconciler(
            self._writer,
            ray,
            self._submissions,
            final_metrics_grace_s=final_metrics_grace_s,
            cluster_lost_after_s=cluster_lost_after_s,
            no_metrics_warning_s=no_metrics_warning_s,
            on_error=self._count_reconciliation_error,
        )
        self._ingestion = Ingestion(
            self._writer,
            metrics_grace_s=metrics_grace_s,
            export=metrics.record_training if metrics is not None else None,
        )
        self._streams = EventStreams(self._writer, ray, self._stopping)

    @property
    def ingest_address(self) -> str | None:
        """``host:port`` the jobs submitted from now on push metrics to (settable)."""
        return self._submissions.ingest_address

    @ingest_address.setter
    def ingest_address(self, address: str | None) -> None:
        self._submissions.ingest_address = address

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
        self._writer.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self.reconcile_interval_s):
            self.reconcile()

    # -- requests --------------------------------------------------------

    def submit(self, spec: JobSpec, *, owner: str, idempotency_key: str | None = None) -> JobRecord:
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
        return self._submissions.submit(spec, owner=owner, idempotency_key=idempotency_key)

    def get(self, job_id: str) -> JobRecord:
        """The job's record; raises :class:`~zerotrain.service.errors.JobNotFound`."""
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
        return self._submissions.cancel(job_id)

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
        return self._streams.watch(job_id, from_sequence, stop=stop)

    def logs(
        self, job_id: str, *, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """The job's driver log lines (without newlines), from Ray.

        With ``follow``, waits for the job to start and streams lines until the
        job ends or ``stop`` is set.

        Raises:
            JobNotFound: at once, not on the first ``next()``.
        """
        return self._streams.logs(job_id, follow=follow, stop=stop)

    def ingest(self, record: MetricsRecord) -> None:
        """Take a validated metrics record from a worker (see the metrics record contract).

        Appends a ``"metrics"`` event, updates the job's latest metrics, its
        attempt (``record.attempt``) and checkpoint (``record.checkpoint``, a
        path inside the job's run directory). A record for a PENDING job moves
        it to RUNNING; a higher attempt adds a state event for the restart.
        After the job's terminal event only the ending attempt's own records
        are taken, for ``metrics_grace_s``
        (:func:`zerotrain.service.ingestion.check_late_record`); they update the
        job but add no event.

        Raises:
            JobNotFound: unknown job.
            InvalidArgument: the checkpoint lies outside the job's run directory.
            RecordRefused: the job ended and takes no such record (final).
        """
        self._ingestion.ingest(record)

    def run_dir(self, job_id: str) -> Path:
        """Where the job's checkpoints and run files live (Ray Train's experiment dir)."""
        return self._writer.run_dir(job_id)

    def reconcile(self) -> None:
        """Bring every unfinished job in step with Ray once (the loop calls this)."""
        self._reconciler.reconcile()
        if self.metrics is not None:
            self.metrics.set_job_states(self.store.count_by_state())

    # -- wiring ----------------------------------------------------------

    def _runtime_entrypoint(self, job_id: str, spec_path: Path, storage: Path) -> str:
        return runtime_entrypoint(
            job_id, spec_path, storage, allow_custom_tasks=self.allow_custom_tasks
        )

    def _count_reconciliation_error(self) -> None:
        self.reconciliation_errors += 1
        if self.metrics is not None:
            self.metrics.inc_reconciliation_errors()

    def _forget(self, job_id: str) -> None:
        self._reconciler.forget(job_id)
