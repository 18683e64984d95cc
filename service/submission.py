"""Submission and cancellation: accept a job, hand it to Ray, stop it on request.

:class:`Submissions` checks a spec against this server's limits and the
cluster's resources, stores the new job (through the :class:`JobWriter`),
writes the job's run files (``spec.json``, the job's one description, and the
ingest token file) and submits its entry point to Ray. It also
cancels jobs: CANCELLING at once, CANCELLED when the reconciler sees Ray stop
the job.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path

from zerotrain.service.errors import (
    AlreadyExists,
    ClusterUnavailable,
    InvalidArgument,
    JobFinished,
    PermissionDenied,
    SpecError,
    Unschedulable,
)
from zerotrain.service.ingest_token import ENV_TOKEN_FILE, write_token_file
from zerotrain.service.job_writer import ACTIVE, JobWriter, truncate
from zerotrain.service.model import TERMINAL_STATES, JobRecord, JobState
from zerotrain.service.ray_jobs import RayJobs
from zerotrain.service.spec import JobSpec, save_spec
from zerotrain.service.tasks.registry import is_custom_task

__all__ = ["MAX_IDEMPOTENCY_KEY_CHARS", "SPEC_FILE", "EntrypointFactory", "Submissions"]

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_CHARS = 128
SPEC_FILE = "spec.json"
"""The job's spec in its run directory; the Ray job's entry point reads it."""

# (job_id, spec_path, storage) -> the shell command Ray runs for the job.
EntrypointFactory = Callable[[str, Path, Path], str]


class Submissions:
    """Accepts jobs, submits them to Ray and cancels them.

    Args:
        writer: the job store's writer.
        ray: the Ray Jobs adapter.
        entrypoint: builds a job's command from ``(job_id, spec_path, runs_dir)``.
        ingest_address: ``host:port`` workers push metrics records to; may be set
            later (a server bound to port 0 knows it only once started).
        ingest_ca: PEM file of the CA the workers verify the service's TLS with.
        ingest_token: bearer token the workers use for the ingestion rpc, or
            a function of the job id giving a per-job token.
        allow_custom_tasks: accept ``package.module:function`` tasks.
        min_cpus_per_worker: this server's floor on ``scaling.cpus_per_worker``.
        max_workers_per_job: this server's cap on ``scaling.num_workers``.
        on_submitted: called once per accepted (new) job.
    """

    def __init__(
        self,
        writer: JobWriter,
        ray: RayJobs,
        *,
        entrypoint: EntrypointFactory,
        ingest_address: str | None,
        ingest_ca: str | None,
        ingest_token: str | Callable[[str], str] | None,
        allow_custom_tasks: bool,
        min_cpus_per_worker: float,
        max_workers_per_job: int,
        on_submitted: Callable[[], None] = lambda: None,
    ) -> None:
        self.writer = writer
        self.store = writer.store
        self.ray = ray
        self.entrypoint = entrypoint
        self.ingest_address = ingest_address
        self.ingest_ca = ingest_ca
        self.ingest_token = ingest_token
        self.allow_custom_tasks = allow_custom_tasks
        self.min_cpus_per_worker = min_cpus_per_worker
        self.max_workers_per_job = max_workers_per_job
        self._on_submitted = on_submitted
        self._submitting: set[str] = set()

    def submit(self, spec: JobSpec, *, owner: str, idempotency_key: str | None = None) -> JobRecord:
        """Accept a job and submit it to Ray; see :meth:`zerotrain.service.jobs.JobManager.submit`."""
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

        now = self.writer.clock()
        job_id = f"j-{uuid.uuid4().hex[:16]}"
        with self.writer.lock:
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
            record, created = self.writer.create(record)
        except BaseException:
            self._submitting.discard(job_id)
            raise
        if not created:  # a concurrent request with the same key won
            self._submitting.discard(job_id)
            return _same_spec_or_raise(record, spec)
        self._on_submitted()
        self.launch(record)
        return self.store.get_job(record.job_id)

    def cancel(self, job_id: str) -> JobRecord:
        """Stop a job; see :meth:`zerotrain.service.jobs.JobManager.cancel`."""
        with self.writer.lock:
            record = self.store.get_job(job_id)
            if record.state in TERMINAL_STATES:
                raise JobFinished(job_id, record.state.value)
            if record.state == JobState.CANCELLING:
                return record
            if record.ray_job_id is None and job_id not in self._submitting:
                # Accepted but never handed to Ray (e.g. the submission failed to reach it).
                result = self.writer.transition(
                    job_id,
                    JobState.CANCELLED,
                    "cancelled before it was submitted to Ray",
                    expect=ACTIVE,
                )
            else:
                result = self.writer.transition(
                    job_id, JobState.CANCELLING, "cancel requested", expect=ACTIVE
                )
            if result is None:  # lost a race with a terminal transition
                record = self.store.get_job(job_id)
                raise JobFinished(job_id, record.state.value)
            record = result
        if record.state == JobState.CANCELLING and record.ray_job_id is not None:
            self.stop_in_ray(record)
        return self.store.get_job(job_id)

    # -- Ray -------------------------------------------------------------

    def is_submitting(self, job_id: str) -> bool:
        """Whether a submission of the job to Ray is in flight."""
        return job_id in self._submitting

    def relaunch(self, record: JobRecord) -> None:
        """Hand a stored job that never reached Ray to Ray (after a service restart).

        The Ray submission id is the job id, so this cannot start it twice.
        """
        with self.writer.lock:
            self._submitting.add(record.job_id)
        self.launch(record)

    def launch(self, record: JobRecord) -> None:
        """Hand an accepted job to Ray; a failure to do so fails the job.

        The caller has marked the job as submitting; this clears the mark.
        """
        job_id = record.job_id
        env = {"ZEROTRAIN_JOB_ID": job_id}
        if self.ingest_address:
            env["ZEROTRAIN_INGEST_ADDRESS"] = self.ingest_address
        if self.ingest_ca:
            env["ZEROTRAIN_INGEST_CA"] = self.ingest_ca
        run_dir = self.writer.run_dir(job_id)
        try:
            spec_path = save_spec(record.spec, run_dir / SPEC_FILE)
            entrypoint = self.entrypoint(job_id, spec_path, self.writer.runs_dir)
            if self.ingest_token:
                token = self.ingest_token
                # Only the file's path goes to Ray: Ray logs a job's runtime env.
                path = write_token_file(run_dir, token(job_id) if callable(token) else token)
                env[ENV_TOKEN_FILE] = str(path)
            ray_job_id = self.ray.submit(
                job_id, entrypoint, env=env, metadata={"zerotrain_job_id": job_id}
            )
        except Exception as exc:
            logger.warning("submitting job %s to Ray failed: %s", job_id, exc)  # or its run files
            with self.writer.lock:
                self._submitting.discard(job_id)
                self.writer.transition(
                    job_id,
                    JobState.FAILED,
                    truncate(f"could not submit the job to Ray: {exc}"),
                    expect=ACTIVE,
                )
                self.writer.transition(
                    job_id,
                    JobState.CANCELLED,
                    "cancelled before it was submitted to Ray",
                    expect=(JobState.CANCELLING,),
                )
            return
        with self.writer.lock:
            self._submitting.discard(job_id)
            updated = self.writer.set_ray_job_id(job_id, ray_job_id)
        if updated.state == JobState.CANCELLING:  # cancelled while we were submitting
            self.stop_in_ray(updated)

    def stop_in_ray(self, record: JobRecord) -> None:
        """Ask Ray to stop the job's Ray job (idempotent; a failure is retried later)."""
        assert record.ray_job_id is not None
        try:
            self.ray.stop(record.ray_job_id)
        except Exception as exc:  # reconciliation retries
            logger.warning("stopping Ray job %s failed (will retry): %s", record.ray_job_id, exc)

    # -- checks ----------------------------------------------------------

    def _check_schedulable(self, spec: JobSpec) -> None:
        self._check_server_limits(spec)
        try:
            res = self.ray.cluster_resources()
        except Exception as exc:
            raise ClusterUnavailable(
                f"cannot reach the Ray cluster to check resources: {exc}"
            ) from exc
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
                "the cluster can never run this job: "
                + "; ".join(problems)
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


def _same_spec_or_raise(existing: JobRecord, spec: JobSpec) -> JobRecord:
    """The job an idempotency key names, if it was created from ``spec``."""
    if existing.spec.to_dict() != spec.to_dict():
        assert existing.idempotency_key is not None
        raise AlreadyExists(existing.idempotency_key, existing.job_id)
    return existing
