"""Where ``ZeroOptimizer.step()`` spends its time: communication, optimizer compute, compile.

Communication is the time ``step()`` spends blocked on collectives: waiting for
the gradient reductions (and launching those still pending), the one small
all-reduce that agrees on the global norm and on non-finite gradients, and
launching / waiting for the parameter all-gathers. Compile is the time spent
building fused kernels (the first steps with ``compile=True`` only). Everything
else is the optimizer's compute. No synchronisation is added: only waits
``step()`` performs anyway are timed.

On CPU (gloo) a wait blocks the calling thread, so host clocks measure it. On
CUDA a wait only makes the current stream wait for the communication stream,
so CUDA events recorded around each wait measure how long the compute stream
stalled; they are read (one event synchronisation) only when timings are asked
for: ``last`` for the last step, ``collect`` for the sum over every step since
the previous ``collect`` (what a training loop reads once per report).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["StepClock"]


@dataclass
class _Step:
    begin: object
    end: object = None
    spans: list[tuple[object, object]] = field(default_factory=list)
    compile_s: float = 0.0


class StepClock:
    """Times steps: :meth:`start`, :meth:`communication` spans, :meth:`add_compile`, :meth:`stop`."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._steps: list[_Step] = []  # finished (and the running one) since the last collect
        self._last: dict[str, float] = {}

    def _mark(self) -> object:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Begin timing a step."""
        self._steps.append(_Step(self._mark()))
        self._last = {}

    @contextlib.contextmanager
    def communication(self) -> Iterator[None]:
        """Count the enclosed block (a wait on, or launch of, a collective) as communication."""
        begin = self._mark()
        try:
            yield
        finally:
            self._steps[-1].spans.append((begin, self._mark()))

    def add_compile(self, seconds: float) -> None:
        """Count ``seconds`` of the running step as compile time (host-measured)."""
        self._steps[-1].compile_s += seconds

    def stop(self) -> None:
        """End the step."""
        self._steps[-1].end = self._mark()
        del self._steps[:-64]  # a loop that never collects keeps a bounded history

    def last(self) -> dict[str, float]:
        """``communication``, ``optimizer``, ``step`` (and ``compile`` when > 0) of the last step."""
        if not self._last and self._steps and self._steps[-1].end is not None:
            self._last = self._resolve(self._steps[-1])
        return dict(self._last)

    def collect(self) -> dict[str, float]:
        """The same keys summed over every finished step since the last call, plus ``steps``."""
        finished = [s for s in self._steps if s.end is not None]
        self._steps = [s for s in self._steps if s.end is None]
        total: dict[str, float] = {"communication": 0.0, "optimizer": 0.0, "step": 0.0}
        for step in finished:
            for key, value in self._resolve(step).items():
                total[key] = total.get(key, 0.0) + value
        total["steps"] = float(len(finished))
        if finished:
            self._last = self._resolve(finished[-1])
        return total

    def _resolve(self, step: _Step) -> dict[str, float]:
        if self._cuda:
            step.end.synchronize()  # type: ignore[attr-defined]

            def elapsed(a: object, b: object) -> float:
                return a.elapsed_time(b) / 1e3  # type: ignore[attr-defined]
        else:

            def elapsed(a: object, b: object) -> float:
                return b - a  # type: ignore[operator]

        total = max(elapsed(step.begin, step.end), 0.0)
        comm = min(sum(max(elapsed(a, b), 0.0) for a, b in step.spans), total)
        compile_s = min(step.compile_s, total - comm)
        out = {"communication": comm, "optimizer": total - comm - compile_s, "step": total}
        if compile_s > 0:
            out["compile"] = compile_s
        return out
