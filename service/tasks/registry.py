"""Task registry: names -> :class:`TaskDef` (argument schema + lazily imported builder).

A task builds a model, a training dataset, a loss and an evaluation metric
(see :class:`zerotrain.service.tasks.base.Task`). Built-in tasks are registered by name;
a *custom* task is named ``package.module:function`` and is imported only when
the caller explicitly allows it (it runs arbitrary code).

Builders are referenced as ``"module:function"`` strings and imported on first
use, so validating a spec does not import torch or scikit-learn.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zerotrain.service.errors import SpecError
from zerotrain.service.tasks.args import Arg, validate_args

__all__ = [
    "CUSTOM_TASK_PATTERN",
    "TASK_NAME_PATTERN",
    "TaskDef",
    "get_task",
    "is_custom_task",
    "list_tasks",
    "register_task",
]

TASK_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
"""Registered task names: lower-case identifiers."""
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
CUSTOM_TASK_PATTERN = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}$")
"""Custom tasks: ``package.module:function``."""


@dataclass(frozen=True, kw_only=True)
class TaskDef:
    """A task: its name, argument schema and builder ``build(args, *, seed) -> Task``."""

    name: str
    """Registered name, or ``package.module:function`` for a custom task."""
    builder: str
    """``"module:function"`` of the builder, imported on first :meth:`build`."""
    args: Mapping[str, Arg] | None = field(default_factory=dict)
    """Argument schema; ``None`` for custom tasks (their arguments pass through)."""
    description: str = ""
    """One line for ``list_tasks()``."""
    check: Callable[[dict[str, Any]], list[str]] | None = None
    """Rules across arguments: ``check(resolved_args) -> errors`` (no heavy imports)."""

    def resolve_args(self, args: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Validate ``args``; return (args with defaults filled, errors)."""
        if self.args is None:
            return dict(args), []
        resolved, errors = validate_args(self.args, args)
        if not errors and self.check is not None:
            errors = self.check(resolved)
        return resolved, errors

    def build(self, args: Mapping[str, Any], *, seed: int) -> Any:
        """Validate ``args`` and build the task (a :class:`zerotrain.service.tasks.base.Task`)."""
        resolved, errors = self.resolve_args(args)
        if errors:
            raise SpecError(errors)
        return _import(self.builder)(resolved, seed=seed)


_lock = threading.Lock()
_registry: dict[str, TaskDef] = {}


def register_task(
    name: str,
    *,
    builder: str | Callable[..., Any],
    args: Mapping[str, Arg] | None = None,
    description: str = "",
    check: Callable[[dict[str, Any]], list[str]] | None = None,
    replace: bool = False,
) -> TaskDef:
    """Register a task under ``name`` (a lower-case identifier).

    ``builder`` is a ``"module:function"`` string (imported lazily) or a
    callable ``build(args: dict, *, seed: int) -> Task``. ``check`` adds rules
    across arguments, returning field-named errors.
    """
    if not TASK_NAME_PATTERN.match(name):
        raise ValueError(f"task name must match {TASK_NAME_PATTERN.pattern}, got {name!r}")
    if callable(builder):
        builder = f"{builder.__module__}:{builder.__qualname__}"
    task = TaskDef(
        name=name, builder=builder, args=dict(args or {}), description=description, check=check
    )
    with _lock:
        if name in _registry and not replace:
            raise ValueError(f"task {name!r} is already registered")
        _registry[name] = task
    return task


def is_custom_task(name: str) -> bool:
    """True when ``name`` has the custom-task form ``package.module:function``."""
    return ":" in name


def get_task(name: str, *, allow_custom: bool = False) -> TaskDef:
    """Return the task called ``name``.

    Raises ``KeyError`` for an unknown registered name and ``PermissionError``
    for a custom task when ``allow_custom`` is false.
    """
    if is_custom_task(name):
        if not CUSTOM_TASK_PATTERN.match(name):
            raise ValueError(f"custom task must look like package.module:function, got {name!r}")
        if not allow_custom:
            raise PermissionError(
                f"custom task {name!r} is disabled; enable custom tasks to run arbitrary code"
            )
        return TaskDef(name=name, builder=name, args=None, description="custom task")
    with _lock:
        task = _registry.get(name)
    if task is None:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(list_tasks())}")
    return task


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    with _lock:
        return sorted(_registry)


def _import(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"task builder {target!r} is not callable")
    return obj
