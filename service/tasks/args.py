"""Typed task arguments: one :class:`Arg` per key, validated with field-named errors.

Task arguments arrive from the network inside a job spec, so every value is
checked for type and range before a task is built. Errors name the key as
``task_args.<key>`` and state the rule, like the rest of :mod:`zerotrain.service.spec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Arg", "validate_args"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Arg:
    """One task argument: its type, default, inclusive bounds and allowed choices."""

    type: type
    """``int``, ``float``, ``bool`` or ``str``."""
    default: Any
    """Value used when the key is absent."""
    doc: str = ""
    """One line shown by ``list_tasks()``."""
    min: float | None = None
    """Inclusive lower bound (numbers only)."""
    max: float | None = None
    """Inclusive upper bound (numbers only)."""
    choices: tuple[Any, ...] | None = None
    """Allowed values, if the argument is an enumeration."""

    def check(self, key: str, value: Any) -> tuple[Any, str | None]:
        """Return ``(normalised value, None)`` or ``(None, error message)``."""
        where = f"task_args.{key}"
        if self.type is bool:
            if not isinstance(value, bool):
                return None, f"{where}: must be a boolean, got {value!r}"
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return None, f"{where}: must be an integer, got {value!r}"
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None, f"{where}: must be a number, got {value!r}"
            value = float(value)
            if not math.isfinite(value):
                return None, f"{where}: must be finite, got {value!r}"
        elif self.type is str and not isinstance(value, str):
            return None, f"{where}: must be a string, got {value!r}"
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            return None, f"{where}: must be one of {allowed}, got {value!r}"
        if self.min is not None and value < self.min:
            return None, f"{where}: must be >= {self.min:g}, got {value!r}"
        if self.max is not None and value > self.max:
            return None, f"{where}: must be <= {self.max:g}, got {value!r}"
        return value, None


def validate_args(
    schema: Mapping[str, Arg], args: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Check ``args`` against ``schema``; return (args with defaults filled, errors).

    Every error is collected (unknown keys included), so a caller can report
    all of them at once.
    """
    errors: list[str] = []
    resolved: dict[str, Any] = {}
    for key in args:
        if key not in schema:
            known = ", ".join(sorted(schema)) or "(none)"
            errors.append(f"task_args.{key}: unknown argument; expected one of: {known}")
    for key, arg in schema.items():
        if key not in args:
            resolved[key] = arg.default
            continue
        value, error = arg.check(key, args[key])
        if error is not None:
            errors.append(error)
        else:
            resolved[key] = value
    return resolved, errors
