"""Custom tasks for the fault tests (run as ``faulty_tasks:<function>`` by servers that
allow custom tasks; ``tests/reliability`` is on the test Ray head's ``PYTHONPATH``)."""

from __future__ import annotations

from typing import Any

from service.tasks import get_task

__all__ = ["RAISE_AT_STEP", "raising_regression"]

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
