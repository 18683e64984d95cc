"""The service's domain types: a job's state, its record and its event log.

These are plain values. The store persists them, the job manager changes
them, the converters turn them into protobuf messages; none of that lives
here. This module imports nothing of the service at run time (the
:class:`~zerotrain.service.spec.JobSpec` annotation is for type checkers only).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zerotrain.service.spec import JobSpec

__all__ = [
    "TERMINAL_STATES",
    "CheckpointInfo",
    "JobEvent",
    "JobRecord",
    "JobState",
]


class JobState(enum.StrEnum):
    """Lifecycle state of a job."""

    PENDING = "PENDING"  # accepted; waiting for resources / for Ray to start it
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class CheckpointInfo:
    """The latest checkpoint a job reported."""

    step: int
    path: str
    time: float


@dataclass(frozen=True)
class JobRecord:
    """Everything the service knows about one job."""

    job_id: str
    owner: str
    spec: JobSpec
    state: JobState
    state_reason: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    attempt: int
    latest_metrics: dict | None
    checkpoint: CheckpointInfo | None
    idempotency_key: str | None
    ray_job_id: str | None


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event log: a state transition or a metrics record."""

    sequence: int
    job_id: str
    time: float
    kind: str  # "state" | "metrics"
    state: JobState | None
    reason: str
    metrics: dict | None
    attempt: int
