"""Typed errors of the job service.

Every error is a subclass of :class:`ZerotrainError`, carries a message that
says what was wrong and what to do, and survives pickling (Ray and
multiprocessing move exceptions between processes), so each one keeps its
fields when re-raised elsewhere. The servicer maps them to gRPC status codes:

==================  =========================================
``SpecError``       INVALID_ARGUMENT (every bad field listed)
``InvalidArgument`` INVALID_ARGUMENT (e.g. a bad page token)
``JobNotFound``     NOT_FOUND
``JobFinished``     FAILED_PRECONDITION
``Unschedulable``   FAILED_PRECONDITION, with the reason
``PermissionDenied`` PERMISSION_DENIED
``ClusterUnavailable`` UNAVAILABLE (Ray cannot be reached; retry later)
``AlreadyExists``   ALREADY_EXISTS (an idempotency key reused with another spec)
``RecordRefused``   FAILED_PRECONDITION (a metrics record for an ended job; final)
==================  =========================================

A repeated idempotency key with the *same* spec is no error: it returns the
job created by the first request.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "ClusterUnavailable",
    "InvalidArgument",
    "JobFinished",
    "JobNotFound",
    "PermissionDenied",
    "RecordRefused",
    "SpecError",
    "Unschedulable",
    "ZerotrainError",
]


class SpecError(ValueError):
    """An invalid job spec. ``errors`` lists every problem as ``"<field>: <rule>, got <value>"``."""

    def __init__(self, errors: list[str] | str):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("invalid job spec: " + "; ".join(self.errors))

    def __reduce__(self):  # picklable across processes (Ray, gRPC threads)
        return (type(self), (self.errors,))


class ZerotrainError(Exception):
    """Base class of the service's domain errors."""


class InvalidArgument(ZerotrainError, ValueError):
    """A request argument other than the spec is malformed (page size, page token, record)."""


class JobNotFound(ZerotrainError, LookupError):
    """No job with this id exists (or it is not visible to the caller)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id!r} not found"


class JobFinished(ZerotrainError):
    """The job is already in a terminal state, so the operation cannot apply."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(job_id, state)
        self.job_id = job_id
        self.state = state

    def __str__(self) -> str:
        return f"job {self.job_id!r} already finished ({self.state}); nothing to cancel"


class Unschedulable(ZerotrainError):
    """The job asks for resources the cluster can never provide."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class PermissionDenied(ZerotrainError):
    """The caller may not do this (another principal's job, or a disabled feature)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ClusterUnavailable(ZerotrainError):
    """The Ray cluster cannot be reached right now; the request changed nothing."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class AlreadyExists(ZerotrainError):
    """An idempotency key was reused with a different spec; names the existing job."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(key, job_id)
        self.key = key
        self.job_id = job_id

    def __str__(self) -> str:
        return (
            f"idempotency_key: {self.key!r} was already used for job {self.job_id!r} with a "
            "different spec; resend that spec to get the job, or use a new key"
        )


class RecordRefused(ZerotrainError):
    """A metrics record the job can no longer take (it ended); the reporter must not retry."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(job_id, reason)
        self.job_id = job_id
        self.reason = reason

    def __str__(self) -> str:
        return f"job {self.job_id!r} {self.reason}"
