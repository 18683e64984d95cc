"""Custom tasks for the fault tests (run as ``faulty_tasks:<function>`` by servers that
allow custom tasks; ``tests/reliability`` is on the test Ray head's ``PYTHONPATH``)."""

from __future__ import annotations

import time
from typing import Any

from zerotrain.service.tasks import get_task

__all__ = ["RAISE_AT_STEP", "paced_digits", "raising_regression"]

RAISE_AT_STEP = 3
"""The forward pass of this step (1-based, counted per process) raises."""


def raising_regression(args: dict[str, Any], *, seed: int) -> Any:
    """The built-in regression task whose loss raises on step :data:`RAISE_AT_STEP`."""
    task = get_task("regression").build({}, seed=seed)
    inner = task.loss
    calls = {"n": 0}

    def loss(outputs: Any, targets: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == RAISE_AT_STEP:
            raise RuntimeError(f"faulty task: injected failure at step {RAISE_AT_STEP}")
        return inner(outputs, targets)

    task.loss = loss
    return task


def paced_digits(args: dict[str, Any], *, seed: int) -> Any:
    """The built-in digits task, with each step lasting at least ``step_period_s``.

    Only wall time changes (the numbers are the digits task's), so fault tests
    keep a window to act in on a fast machine, and a slow machine is not slowed.
    """
    args = dict(args)
    period = float(args.pop("step_period_s", 0.05))
    task = get_task("digits").build(args, seed=seed)
    inner = task.loss
    last = {"t": time.monotonic()}

    def loss(outputs: Any, targets: Any) -> Any:
        wait = last["t"] + period - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        last["t"] = time.monotonic()
        return inner(outputs, targets)

    task.loss = loss
    return task
