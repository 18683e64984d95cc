"""JobWriter: the one piece of the job manager that writes to the job store.

Every write of a job (its creation, a state transition, its Ray id, a metrics
record) goes through here, so the ``jobs``, ``job_labels`` and ``events``
tables have exactly one writer. The writer holds the manager's write lock,
wakes the watchers after each change, and runs the terminal-state hooks
(clean the run directory, retire the job's training series).

Writers race (a cancel against the reconciliation loop against ingestion):
each transition is a compare-and-set on the current state, and callers that
read before they write hold :attr:`JobWriter.lock` around both.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from zerotrain.service.ingest_token import remove_token_file
from zerotrain.service.model import TERMINAL_STATES, CheckpointInfo, JobRecord, JobState
from zerotrain.service.records import MetricsRecord
from zerotrain.service.runtime.staging import STAGING_DIR
from zerotrain.service.store import JobStore

__all__ = ["ACTIVE", "MAX_REASON_CHARS", "UNFINISHED", "JobWriter", "truncate"]

logger = logging.getLogger(__name__)

MAX_REASON_CHARS = 2000
ACTIVE = (JobState.PENDING, JobState.RUNNING)
"""States a job can leave by being cancelled, failing or succeeding."""
UNFINISHED = (JobState.PENDING, JobState.RUNNING, JobState.CANCELLING)
"""States the reconciler keeps in step with Ray."""


class JobWriter:
    """Writes jobs, their state transitions and metrics into a :class:`JobStore`.

    Args:
        store: the job store (the writer is its only writer).
        runs_dir: the directory of the jobs' run directories (``<data_dir>/runs``).
        clock: wall clock for ``updated_at`` and event times.
        on_finished: called with the job id after every transition into a
            terminal state (e.g. retire its Prometheus series).
    """

    def __init__(
        self,
        store: JobStore,
        *,
        runs_dir: Path,
        clock: Callable[[], float],
        on_finished: Iterable[Callable[[str], None]] = (),
    ) -> None:
        self.store = store
        self.runs_dir = runs_dir
        self.clock = clock
        self.lock = threading.RLock()
        """Held by callers whose write depends on what they read just before."""
        self._on_finished = list(on_finished)
        self._changed = threading.Condition()

    def run_dir(self, job_id: str) -> Path:
        """Where the job's checkpoints and run files live (Ray Train's experiment dir)."""
        return self.runs_dir / job_id

    # -- writes ----------------------------------------------------------

    def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Store a new job with its first state event; see :meth:`JobStore.create_job`."""
        result = self.store.create_job(record)
        if result[1]:
            self.notify()
        return result

    def set_ray_job_id(self, job_id: str, ray_job_id: str) -> JobRecord:
        """Record the id Ray gave the job's submission; returns the updated record."""
        with self.lock:
            result = self.store.update_job(job_id, now=self.clock(), ray_job_id=ray_job_id)
        assert result is not None  # no compare-and-set, so always a record
        return result[0]

    def transition(
        self,
        job_id: str,
        state: JobState,
        reason: str,
        *,
        expect: tuple[JobState, ...],
        **fields: Any,
    ) -> JobRecord | None:
        """Compare-and-set the job's state; returns the new record or ``None``.

        ``None`` means the job was not in one of the ``expect`` states (another
        writer got there first) and nothing changed.
        """
        with self.lock:
            now = self.clock()
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
        self.notify()
        if state in TERMINAL_STATES:
            self._clean_run_dir(job_id)
            for hook in self._on_finished:
                hook(job_id)
        return result[0]

    def append_metrics(
        self,
        record: MetricsRecord,
        *,
        now: float,
        checkpoint: CheckpointInfo | None,
        append_event: bool,
    ) -> None:
        """Store a metrics record as its JSON object; see :meth:`JobStore.append_metrics`."""
        with self.lock:
            self.store.append_metrics(
                record.job_id,
                record.to_dict(),
                now=now,
                attempt=record.attempt,
                checkpoint=checkpoint,
                append_event=append_event,
            )
        self.notify()

    # -- change notification ---------------------------------------------

    def notify(self) -> None:
        """Wake every watcher waiting in :meth:`wait_for_change`."""
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, job_id: str, after: int, timeout: float) -> None:
        """Block until the job has an event past ``after``, a notify, or ``timeout``."""
        with self._changed:
            # Re-check under the condition's lock: no wake-up can be lost.
            if self.store.last_sequence(job_id) <= after:
                self._changed.wait(timeout=timeout)

    def _clean_run_dir(self, job_id: str) -> None:
        """An ended job's token file and checkpoint staging leftovers go (Ray has stopped it)."""
        run_dir = self.run_dir(job_id)
        try:
            remove_token_file(run_dir)
            shutil.rmtree(run_dir / STAGING_DIR, ignore_errors=True)
        except OSError as exc:  # never fails the transition
            logger.warning("cleaning the run directory of job %s: %s", job_id, exc)


def truncate(text: str) -> str:
    """``text`` cut to :data:`MAX_REASON_CHARS` (a state reason stays readable)."""
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
