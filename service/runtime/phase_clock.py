"""Per-phase time of the training loop's micro-batches, without stalling the device.

On CPU the marks are host clocks. On CUDA they are events recorded on the
current stream, so marking never waits for the GPU; the events are read once
per reporting window (one synchronisation of the last event), not per step.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

__all__ = ["PhaseClock"]


class PhaseClock:
    """Collects ``(phase, begin, end)`` spans; :meth:`totals` sums them per phase."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._spans: list[tuple[str, object, object]] = []

    def mark(self) -> object:
        """A point in time (a host clock reading, or a CUDA event recorded now)."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, phase: str, begin: object, end: object) -> None:
        """Count the time between two marks as ``phase``."""
        self._spans.append((phase, begin, end))

    def totals(self) -> dict[str, float]:
        """Seconds per phase since the last call (reads the device's events once)."""
        spans, self._spans = self._spans, []
        totals: dict[str, float] = defaultdict(float)
        if not spans:
            return totals
        if self._cuda:
            spans[-1][2].synchronize()  # type: ignore[attr-defined]
            for phase, begin, end in spans:
                totals[phase] += begin.elapsed_time(end) / 1e3  # type: ignore[attr-defined]
        else:
            for phase, begin, end in spans:
                totals[phase] += end - begin  # type: ignore[operator]
        return totals
