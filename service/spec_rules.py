"""Rule combinators for validated, frozen config sections (no schema here).

A *rule* takes ``(path, value)`` and returns ``(normalised value, error or
None)``; the error reads ``"<path>: <what is allowed>, got <value>"``. A
:class:`Section` is a frozen dataclass whose fields carry a rule in
``metadata["rule"]``: constructing one runs every rule and the section's
cross-field checks, and raises :class:`~zerotrain.service.errors.SpecError` listing
every problem at once. :mod:`zerotrain.service.spec` builds the job spec's schema from
these pieces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field, fields
from typing import Any

from zerotrain.service.errors import SpecError

__all__ = [
    "CONTROL_CHARACTERS",
    "Rule",
    "Section",
    "boolean",
    "choice",
    "is_number",
    "join_path",
    "number",
    "required",
    "section_rule",
    "show",
    "spec_field",
    "text",
]

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
"""Characters a spec string must not contain."""

# A rule takes (path, value) and returns (normalised value, error or None).
Rule = Callable[[str, Any], tuple[Any, str | None]]


def is_number(value: Any) -> bool:
    """True for an int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    optional: bool = False,
) -> Rule:
    """A number (``integer``: an int) within the given bounds; ``optional`` allows None."""

    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if value is None and optional:
            return None, None
        if integer:
            if isinstance(value, bool) or not isinstance(value, int):
                return None, f"{path}: must be an integer, got {value!r}"
        else:
            if not is_number(value):
                return None, f"{path}: must be a number, got {value!r}"
            if not math.isfinite(value):
                return None, f"{path}: must be finite, got {value!r}"
            value = float(value)
        shown = show(value)
        if gt is not None and not value > gt:
            return None, f"{path}: must be > {show(gt)}, got {shown}"
        if ge is not None and not value >= ge:
            return None, f"{path}: must be >= {show(ge)}, got {shown}"
        if lt is not None and not value < lt:
            return None, f"{path}: must be < {show(lt)}, got {shown}"
        if le is not None and not value <= le:
            return None, f"{path}: must be <= {show(le)}, got {shown}"
        return value, None

    return rule


def show(value: Any) -> str:
    """``value`` as an error message shows it (``2.0`` as ``2``, strings quoted)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def boolean(*, optional: bool = False) -> Rule:
    """``true`` or ``false``; ``optional`` also allows None."""

    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if value is None and optional:
            return None, None
        if not isinstance(value, bool):
            return None, f"{path}: must be a boolean (true/false), got {value!r}"
        return value, None

    return rule


def choice(*choices: Any) -> Rule:
    """One of ``choices`` (a bool never matches 0 or 1)."""

    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if isinstance(value, bool) or value not in choices:
            allowed = ", ".join(show(c) for c in choices)
            return None, f"{path}: must be one of {allowed}, got {value!r}"
        return value, None

    return rule


def text(*, max_length: int, min_length: int = 0) -> Rule:
    """A string of ``min_length``..``max_length`` characters without control characters."""

    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if not isinstance(value, str):
            return None, f"{path}: must be a string, got {value!r}"
        if len(value) < min_length:
            return None, f"{path}: must not be empty" if min_length == 1 else (
                f"{path}: must have at least {min_length} characters, got {len(value)}"
            )
        if len(value) > max_length:
            return None, f"{path}: must have at most {max_length} characters, got {len(value)}"
        if CONTROL_CHARACTERS.search(value):
            return None, f"{path}: must not contain control characters, got {value!r}"
        return value, None

    return rule


def spec_field(default: Any, rule: Rule) -> Any:
    """A section field with a default, checked by ``rule``."""
    return field(default=default, metadata={"rule": rule})


def required(rule: Rule) -> Any:
    """A section field without a default, checked by ``rule``."""
    return field(metadata={"rule": rule})


class Section:
    """A frozen dataclass of rule-checked fields: checks on construction, from_dict, to_dict."""

    _path: str = ""

    def __post_init__(self) -> None:
        errors: list[str] = []
        for f in fields(self):  # type: ignore[arg-type]
            value, error = f.metadata["rule"](join_path(self._path, f.name), getattr(self, f.name))
            if error:
                errors.extend(error.split("\n"))
            else:
                object.__setattr__(self, f.name, value)
        errors.extend(self._cross_check())
        if errors:
            raise SpecError(errors)

    def _cross_check(self) -> list[str]:
        """Rules that involve more than one field (override per section)."""
        return []

    @classmethod
    def _from_dict(cls, data: Any, path: str, errors: list[str]) -> Any:
        """Build the section from ``data``, appending every problem to ``errors``."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            errors.append(f"{path}: must be a mapping, got {type(data).__name__}")
            return None
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                errors.append(
                    f"{join_path(path, str(key))}: unknown field; expected one of: {', '.join(names)}"
                )
        values: dict[str, Any] = {}
        ok = True
        for f in fields(cls):  # type: ignore[arg-type]
            where = join_path(path, f.name)
            if f.name in data:
                raw = data[f.name]
            elif f.default is not MISSING:
                raw = f.default
            elif f.default_factory is not MISSING:
                raw = f.default_factory()
            else:
                errors.append(f"{where}: required field is missing")
                ok = False
                continue
            value, error = f.metadata["rule"](where, raw)
            if error:
                errors.extend(error.split("\n"))
                ok = False
            else:
                values[f.name] = value
        if not ok:
            return None
        try:
            return cls(**values)
        except SpecError as exc:  # cross-field rules
            errors.extend(exc.errors)
            return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(to_dict())`` gives an equal section."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out


def join_path(path: str, name: str) -> str:
    """``path.name``, or ``name`` at the top level."""
    return f"{path}.{name}" if path else name


def section_rule(cls: type[Section]) -> Rule:
    """A nested section: a mapping built into ``cls`` (or an instance of it)."""

    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if isinstance(value, cls):
            return value, None
        errors: list[str] = []
        section = cls._from_dict(value, path, errors)
        if errors:
            return None, "\n".join(errors)
        return section, None

    return rule
