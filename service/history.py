"""A job's metrics history as the service stores it: what ``trainctl plot`` draws.

:func:`fetch_history` reads the job and replays its stored events over
``WatchJob`` (from sequence 0); :func:`history_from_events` turns domain
:class:`~zerotrain.service.model.JobEvent` values into a :class:`MetricsHistory`. The
store keeps every state change but only a job's newest metrics events
(``DEFAULT_MAX_METRICS_EVENTS``); event sequence numbers have no gaps
otherwise, so a gap means older records were dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from zerotrain.service.model import JobEvent

if TYPE_CHECKING:
    from zerotrain.service.client import JobClient

__all__ = ["MetricsHistory", "NoMetrics", "fetch_history", "history_from_events"]


class NoMetrics(LookupError):
    """The job has no metrics records (yet): nothing to draw."""


@dataclass(frozen=True)
class MetricsHistory:
    """A job's stored metrics records, oldest first, and what they belong to."""

    job_id: str
    state: str
    """The job's state when the history was read (``SUCCEEDED``, ``RUNNING``, ...)."""
    spec: Mapping[str, Any]
    """The job's spec as a plain dict (``name``, ``optimizer.algorithm``, ...)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """Metrics records in the order they were stored."""
    truncated: bool = False
    """The store's cap dropped the oldest metrics records of this job."""


def history_from_events(
    job_id: str, state: str, spec: Mapping[str, Any], events: Iterable[JobEvent]
) -> MetricsHistory:
    """The history of ``events`` (a replay from the job's first event, in order).

    Raises:
        NoMetrics: no event carries a metrics record.
    """
    events = list(events)
    records = [e.metrics for e in events if e.kind == "metrics" and e.metrics is not None]
    if not records:
        raise NoMetrics(f"job {job_id} has no metrics records yet ({state}); nothing to plot")
    truncated = bool(events) and (
        events[0].sequence != 1 or any(b.sequence != a.sequence + 1 for a, b in pairwise(events))
    )
    return MetricsHistory(job_id, state, spec, records, truncated)


def fetch_history(client: JobClient, job_id: str) -> MetricsHistory:
    """Read a job's history from the service.

    A finished job's replay ends at its terminal event; a running job's at the
    newest metrics record it had when this was called, so it never waits for
    the job.

    Raises:
        zerotrain.service.client.ApiError: e.g. NOT_FOUND for an unknown job id.
        NoMetrics: the job has not reported any metrics yet.
    """
    from zerotrain.service.client import TERMINAL_STATES

    job = client.get(job_id)
    state = job.state.value
    latest = job.latest_metrics
    if latest is None:
        raise NoMetrics(f"job {job_id} has no metrics records yet ({state}); nothing to plot")
    newest = (latest.get("attempt", 0), latest.get("step", 0))
    events = []
    for event in client.watch(job_id):
        events.append(event)
        if job.state in TERMINAL_STATES or event.metrics is None:
            continue
        if (event.attempt, event.metrics.get("step", 0)) >= newest:
            break
    return history_from_events(job_id, state, job.spec.to_dict(), events)
