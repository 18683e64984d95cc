"""Event streams: a job's events (``WatchJob``) and its driver log (``GetJobLogs``), live.

Read-only: :class:`EventStreams` reads the store and Ray's logs and waits on
the :class:`JobWriter`'s change notification; it never writes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from zerotrain.service.errors import InvalidArgument
from zerotrain.service.job_writer import JobWriter
from zerotrain.service.model import TERMINAL_STATES, JobEvent
from zerotrain.service.ray_jobs import RayJobs

__all__ = ["EventStreams"]


class EventStreams:
    """Streams of one job's events and log lines.

    Args:
        writer: the job store's writer (its store is read, its changes awaited).
        ray: the Ray Jobs adapter (for logs).
        stopping: set when the manager stops; every open stream then ends.
    """

    def __init__(self, writer: JobWriter, ray: RayJobs, stopping: threading.Event) -> None:
        self.writer = writer
        self.store = writer.store
        self.ray = ray
        self._stopping = stopping

    def watch(
        self, job_id: str, from_sequence: int = 0, *, stop: threading.Event | None = None
    ) -> Iterator[JobEvent]:
        """The job's events after ``from_sequence``; see :meth:`zerotrain.service.jobs.JobManager.watch`."""
        if (
            isinstance(from_sequence, bool)
            or not isinstance(from_sequence, int)
            or (from_sequence < 0)
        ):
            raise InvalidArgument(f"from_sequence: must be an integer >= 0, got {from_sequence!r}")
        self.store.get_job(job_id)
        return self._watch(job_id, from_sequence, stop)

    def _watch(self, job_id: str, after: int, stop: threading.Event | None) -> Iterator[JobEvent]:
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
            self.writer.wait_for_change(job_id, after, timeout=1.0)

    def logs(
        self, job_id: str, *, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """The job's driver log lines; see :meth:`zerotrain.service.jobs.JobManager.logs`."""
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


class _Either:
    """Set when either event is set (a manager stop ends caller streams too)."""

    def __init__(self, first: threading.Event | None, second: threading.Event) -> None:
        self._events = [e for e in (first, second) if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)
