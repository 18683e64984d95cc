"""Per-step time split of ``ZeroOptimizer.step()``: communication vs optimizer compute.

Communication is the time ``step()`` spends blocked on collectives: waiting for
the gradient reductions launched during backward (and launching the ones still
pending), the one small all-reduce that agrees on the global norm and on
non-finite gradients, and launching / waiting for the parameter all-gathers.
Everything else in ``step()`` is the optimizer's compute (averaging, norm,
clipping, the shard update, master-copy casts). No synchronisation is added:
only waits ``step()`` performs anyway are timed.

On CPU (gloo) a wait blocks the calling thread, so host clocks measure it. On
CUDA a wait only makes the current stream wait for the communication stream,
so CUDA events recorded around each wait measure how long the compute stream
stalled; they are read (one event synchronisation) only when the timings are
asked for, after the step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

__all__ = ["StepClock"]


class StepClock:
    """Times one ``step()`` at a time: :meth:`start`, :meth:`communication` spans, :meth:`stop`."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._result: dict[str, float] = {}
        self._spans: list[tuple[object, object]] = []
        self._begin: object = None
        self._end: object = None

    def _mark(self) -> object:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Begin timing a step (forgets the previous one)."""
        self._spans = []
        self._result = {}
        self._end = None
        self._begin = self._mark()

    @contextlib.contextmanager
    def communication(self) -> Iterator[None]:
        """Count the enclosed block (a wait on, or launch of, a collective) as communication."""
        begin = self._mark()
        try:
            yield
        finally:
            self._spans.append((begin, self._mark()))

    def stop(self) -> None:
        """End the step."""
        self._end = self._mark()

    def result(self) -> dict[str, float]:
        """``{"communication", "optimizer", "step"}`` in seconds for the last finished step."""
        if self._end is None:
            return {}
        if not self._result:
            if self._cuda:
                self._end.synchronize()  # type: ignore[attr-defined]

                def elapsed(a: object, b: object) -> float:
                    return a.elapsed_time(b) / 1e3  # type: ignore[attr-defined]
            else:

                def elapsed(a: object, b: object) -> float:
                    return b - a  # type: ignore[operator]

            total = max(elapsed(self._begin, self._end), 0.0)
            comm = min(sum(max(elapsed(a, b), 0.0) for a, b in self._spans), total)
            self._result = {"communication": comm, "optimizer": total - comm, "step": total}
        return dict(self._result)
