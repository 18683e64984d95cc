"""What a person sees of a bare ``python -m zerotrain.service.runtime`` run.

The same progress bar and summary as ``trainctl submit --watch``
(:mod:`zerotrain.service.display`), fed by the ``ZEROTRAIN_METRICS`` lines that Ray
forwards from rank 0 to this driver. Everything Ray prints goes to the run's
log file instead (``ray.log`` in the run directory); ``--verbose`` also shows
it above the bar. The machine-readable lines stay in the log file only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from zerotrain.service.display import job_progress, progress_fields, summary_line
from zerotrain.service.runtime.reporter import METRICS_PREFIX
from zerotrain.service.spec import JobSpec

__all__ = ["RunOutcome", "RunView"]


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, for the summary."""

    state: str
    """``SUCCEEDED`` or ``FAILED``."""
    seconds: float
    checkpoint: str | None = None
    """Path or URI of the last checkpoint."""
    result_metrics: Mapping[str, Any] | None = None
    """Ray Train's result metrics (used when no metrics line arrived)."""


class RunView:
    """A live progress bar for one run, updated from the lines of the run's captured output.

    Use as a context manager around the run; call :meth:`on_line` with every
    output line (from any thread) and :meth:`finish` afterwards.
    """

    def __init__(
        self, console: Console, spec: JobSpec, job_id: str, log_path: Path, *, verbose: bool
    ) -> None:
        self.console = console
        self.spec = spec
        self.job_id = job_id
        self.log_path = log_path
        self.verbose = verbose
        self.latest: dict[str, Any] | None = None
        self._attempt = 0
        self._lock = threading.Lock()
        self._progress = job_progress(console)
        self._bar = self._progress.add_task(
            "train", total=spec.training.max_steps, name=escape(spec.name), loss="-", rate=""
        )

    def __enter__(self) -> RunView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def header(self, run_dir: str) -> None:
        """One line: which job, how it is run, where its files go."""
        spec = self.spec
        self.console.print(
            f"zerotrain: job [bold]{escape(self.job_id)}[/]: task {escape(spec.task)}, "
            f"{spec.scaling.num_workers} workers, {spec.optimizer.algorithm} on "
            f"{spec.sharding.engine} ZeRO-{spec.sharding.stage}; files in {escape(run_dir)}"
        )

    def on_line(self, line: str) -> None:
        """Handle one line of the run's output: a metrics record moves the bar."""
        _, marker, payload = line.partition(METRICS_PREFIX)
        if not marker:
            if self.verbose:
                self._progress.console.print(line, markup=False, highlight=False)
            return
        try:
            record = json.loads(payload)
        except ValueError:
            return
        with self._lock:
            self.latest = record
            attempt = int(record.get("attempt", 1))
            if self._attempt and attempt > self._attempt:
                self._progress.console.print(
                    f"attempt {attempt}: the worker group restarted from its latest checkpoint"
                )
            self._attempt = max(self._attempt, attempt)
            self._progress.update(self._bar, **progress_fields(record))

    def finish(self, outcome: RunOutcome) -> None:
        """Print the summary: state and final metrics, the checkpoint, where Ray's log is."""
        metrics = self.latest or (dict(outcome.result_metrics) if outcome.result_metrics else None)
        self.console.print(
            summary_line(
                self.job_id,
                outcome.state,
                metrics,
                seconds=outcome.seconds,
                attempts=max(self._attempt, 1),
            )
        )
        if outcome.checkpoint:
            self.console.print(f"checkpoint: {escape(outcome.checkpoint)}")
        shown = "" if self.verbose else " (--verbose shows it as it runs)"
        self.console.print(f"Ray's log: {escape(str(self.log_path))}{shown}")
