"""The ``zerotrain.v1.JobService`` servicer: convert, call the job manager, reply.

Each rpc authenticates the caller (the :class:`~zerotrain.service.gate.GateInterceptor`
has already refused unknown tokens), converts the request with
:mod:`zerotrain.service.convert`, checks ownership (a principal may only see and cancel
its own jobs, an admin all), calls :class:`zerotrain.service.jobs.JobManager` and builds
the reply. Domain errors become statuses:

=====================  ===================  ==========================================
error                  status               message
=====================  ===================  ==========================================
``SpecError``          INVALID_ARGUMENT     every bad field with its rule, plus a
                                            ``google.rpc.BadRequest`` detail
``InvalidArgument``    INVALID_ARGUMENT     the field and the rule
``JobNotFound``        NOT_FOUND            the id
``JobFinished``        FAILED_PRECONDITION  the job's terminal state
``Unschedulable``      FAILED_PRECONDITION  why the cluster can never run it
``PermissionDenied``   PERMISSION_DENIED    what was refused
``ClusterUnavailable`` UNAVAILABLE          Ray cannot be reached (retry later)
``AlreadyExists``      ALREADY_EXISTS       the idempotency key's job (other spec)
``RecordRefused``      FAILED_PRECONDITION  a late metrics record (the job ended)
anything else          INTERNAL             "internal error" (details in the log)
=====================  ===================  ==========================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from zerotrain.service import convert
from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from zerotrain.service.auth import Authenticator, Principal
from zerotrain.service.errors import (
    AlreadyExists,
    ClusterUnavailable,
    InvalidArgument,
    JobFinished,
    JobNotFound,
    PermissionDenied,
    RecordRefused,
    SpecError,
    Unschedulable,
)

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_ID_CHARS", "MAX_PAGE_SIZE", "JobServicer"]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_ID_CHARS = 128

_T = TypeVar("_T")


class JobServicer(pb_grpc.JobServiceServicer):
    """Thin gRPC front of a :class:`zerotrain.service.jobs.JobManager`."""

    def __init__(self, manager: Any, auth: Authenticator) -> None:
        self._manager = manager
        self._auth = auth
        self._busy = 0  # rpcs currently inside a manager call
        self._idle = threading.Condition()

    # ------------------------------------------------------------------ unary rpcs
    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.Job:
        """Validate the spec and queue the job (idempotent with a key)."""
        principal = self._principal(context)
        key = request.idempotency_key
        if len(key) > MAX_ID_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in key):
            _abort_invalid(
                context, "idempotency_key", f"must be at most {MAX_ID_CHARS} printable characters"
            )
        spec = self._call(context, lambda: convert.spec_from_proto(request.spec))
        record = self._call(
            context,
            lambda: self._manager.submit(spec, owner=principal.name, idempotency_key=key or None),
        )
        log.info("%s submitted job %s (%s)", principal.name, record.job_id, spec.name)
        return convert.job_to_proto(record)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        """One job, if the caller may see it."""
        record = self._owned_job(request.job_id, context)
        return self._call(context, lambda: convert.job_to_proto(record))

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        """A page of the caller's jobs (an admin's: everyone's, or ``owner``'s)."""
        principal = self._principal(context)
        if principal.admin:
            owner = request.owner or None
        elif request.owner and request.owner != principal.name:
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "owner: only admins may list other principals' jobs",
            )
        else:
            owner = principal.name
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            _abort_invalid(context, "page_size", f"must be in 0..{MAX_PAGE_SIZE} (0: default)")
        try:
            state = convert.state_from_proto(request.state)
        except ValueError as exc:
            _abort_invalid(context, "state", str(exc).removeprefix("state: "))

        def page() -> pb.ListJobsResponse:
            records, token = self._manager.list(
                owner=owner,
                state=state,
                labels=dict(request.labels) or None,
                page_size=request.page_size or DEFAULT_PAGE_SIZE,
                page_token=request.page_token,
            )
            return pb.ListJobsResponse(
                jobs=[convert.job_to_proto(r) for r in records], next_page_token=token
            )

        return self._call(context, page)

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        """Ask the job to stop."""
        principal = self._principal(context)
        record = self._owned_job(request.job_id, context, principal)
        cancelled = self._call(context, lambda: self._manager.cancel(record.job_id))
        log.info("%s cancelled job %s", principal.name, record.job_id)
        return convert.job_to_proto(cancelled)

    def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext
    ) -> pb.ReportMetricsResponse:
        """Ingest one metrics record from a job's worker."""
        _check_id(request.job_id, context)
        if not self._auth.ingest_allowed(context.invocation_metadata(), request.job_id):
            _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing or invalid ingest token for job {request.job_id!r}",
            )
        if not request.HasField("record"):
            _abort_invalid(context, "record", "is required")
        if request.record.job_id not in ("", request.job_id):
            _abort_invalid(context, "record.job_id", "must equal job_id (or be empty)")
        try:
            record = convert.metrics_record_from_proto(request.record, request.job_id)
        except InvalidArgument as exc:
            _abort_for(context, exc)
        self._call(context, lambda: self._manager.ingest(record))
        return pb.ReportMetricsResponse()

    # ---------------------------------------------------------------- stream rpcs
    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        """Every event after ``from_sequence``, ending after the terminal state."""
        record = self._owned_job(request.job_id, context)
        if request.from_sequence < 0:
            _abort_invalid(context, "from_sequence", "must be >= 0")
        stop = _stop_on_termination(context)
        events = self._call(
            context,
            lambda: self._manager.watch(record.job_id, request.from_sequence, stop=stop),
        )
        for event in self._iterate(context, events, stop):
            yield convert.event_to_proto(event)

    def StreamLogs(
        self, request: pb.StreamLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LogLine]:
        """The job's log lines; with ``follow``, until the job finishes."""
        record = self._owned_job(request.job_id, context)
        stop = _stop_on_termination(context)
        lines = self._call(
            context, lambda: self._manager.logs(record.job_id, follow=request.follow, stop=stop)
        )
        for line in self._iterate(context, lines, stop):
            yield pb.LogLine(text=line.rstrip("\n"))

    # -------------------------------------------------------------------- helpers
    def wait_idle(self, timeout: float) -> bool:
        """Wait until no rpc is inside the job manager; False on timeout.

        After the server has stopped, handler threads may still be finishing a
        manager call (a watch wakes up to once a second): wait for them before
        closing the store under them.
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    @contextmanager
    def _in_manager(self) -> Iterator[None]:
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                if not self._busy:
                    self._idle.notify_all()

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], _T]) -> _T:
        """Run ``fn``, turning domain errors into the documented statuses."""
        try:
            with self._in_manager():
                return fn()
        except Exception as exc:
            _abort_for(context, exc)

    def _iterate(
        self, context: grpc.ServicerContext, items: Iterator[_T], ended: threading.Event
    ) -> Iterator[_T]:
        """Iterate a domain stream, turning its errors into statuses too.

        Once the rpc has ended (``ended`` set: client gone, server stopping), an
        error is no one's to report: the stream just stops.
        """
        while True:
            try:
                with self._in_manager():
                    item = next(items)
            except StopIteration:
                return
            except Exception as exc:
                if ended.is_set():
                    return
                _abort_for(context, exc)
            yield item

    def _principal(self, context: grpc.ServicerContext) -> Principal:
        principal = self._auth.authenticate(context.invocation_metadata())
        if principal is None:  # the interceptor normally refuses these first
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        return principal

    def _owned_job(
        self, job_id: str, context: grpc.ServicerContext, principal: Principal | None = None
    ) -> Any:
        """The job's record if the caller may see it (else the rpc is aborted)."""
        principal = principal or self._principal(context)
        _check_id(job_id, context)
        record = self._call(context, lambda: self._manager.get(job_id))
        if not principal.may_access(record.owner):
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"job {job_id!r} belongs to another principal",
            )
        return record


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort``, typed as never returning (it raises)."""
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def _check_id(job_id: str, context: grpc.ServicerContext) -> None:
    if not job_id:
        _abort_invalid(context, "job_id", "is required")
    if len(job_id) > MAX_ID_CHARS:
        _abort_invalid(context, "job_id", f"must be at most {MAX_ID_CHARS} characters")


def _stop_on_termination(context: grpc.ServicerContext) -> threading.Event:
    """An event set when the rpc ends (client gone, deadline, server stopping)."""
    stop = threading.Event()
    if not context.add_callback(stop.set):
        stop.set()  # already terminated
    return stop


_STATUS_OF_ERROR = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (JobNotFound, grpc.StatusCode.NOT_FOUND),
    (JobFinished, grpc.StatusCode.FAILED_PRECONDITION),
    (Unschedulable, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ClusterUnavailable, grpc.StatusCode.UNAVAILABLE),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (RecordRefused, grpc.StatusCode.FAILED_PRECONDITION),
)


def _abort_for(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, SpecError):
        _abort_spec(context, exc)
    for cls, code in _STATUS_OF_ERROR:
        if isinstance(exc, cls):
            _abort(context, code, str(exc))
    log.error("internal error in rpc", exc_info=exc)
    _abort(context, grpc.StatusCode.INTERNAL, "internal error (see the server log)")


def _abort_invalid(context: grpc.ServicerContext, field: str, rule: str) -> NoReturn:
    _abort_with_violations(context, f"{field}: {rule}", [(field, rule)])


def _abort_spec(context: grpc.ServicerContext, exc: SpecError) -> NoReturn:
    violations = []
    for error in exc.errors:
        field, sep, rule = error.partition(": ")
        violations.append((field, rule) if sep else ("spec", error))
    message = "invalid job spec:\n  " + "\n  ".join(exc.errors)
    _abort_with_violations(context, message, [(f"spec.{f}", r) for f, r in violations])


def _abort_with_violations(
    context: grpc.ServicerContext, message: str, violations: list[tuple[str, str]]
) -> NoReturn:
    """INVALID_ARGUMENT with a ``google.rpc.BadRequest`` detail listing each field."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")
