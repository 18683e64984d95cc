"""The metrics record workers report (``ReportMetrics``): one typed value, validated once.

:meth:`MetricsRecord.from_dict` is the only place a record's fields are
checked: types, sizes (key count, key length, list length), finite numbers
(except ``loss``), ``step``/``attempt`` ranges, and the job id. It runs where a
record enters the service (``JobServicer.ReportMetrics``, through
:func:`zerotrain.service.convert.metrics_record_from_proto`); ingestion, the job
writer and the Prometheus exporter take the resulting :class:`MetricsRecord`
as it is. What needs the job (the checkpoint inside its run directory, the
late-record window) is :mod:`zerotrain.service.ingestion`'s. See
docs/ARCHITECTURE.md, "Metrics record".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from zerotrain.service.errors import InvalidArgument
from zerotrain.service.spec_rules import is_number

__all__ = [
    "MAX_KEYS",
    "MAX_KEY_CHARS",
    "MAX_LIST_ITEMS",
    "PHASES",
    "MetricsRecord",
    "RecordCheckpoint",
]

MAX_KEYS = 64
"""Keys of a record, and of each of its maps (``phase_seconds``, ``optimizer``, ...)."""
MAX_KEY_CHARS = 64
MAX_LIST_ITEMS = 1024
"""Items of ``state_bytes_per_rank`` (one per worker)."""
PHASES = ("data", "forward", "backward", "communication", "optimizer", "compile")
"""Step phases of ``phase_seconds``, measured by the workers each step. ``communication``
is the time the optimizer step spent blocked on collectives (``Engine.collect_step_timings``;
reductions launched from backward hooks overlap backward, and only their remaining wait
counts), and ``compile`` the time it spent building the fused kernel (the first window
only); both are taken out of ``optimizer`` and appear only when the engine measures them
(native: yes; DeepSpeed: no, its communication stays inside ``backward`` and
``optimizer``). The exporter sums any other key into ``other``, so a misbehaving worker
cannot create unbounded label values."""
NON_FINITE_ALLOWED = frozenset({"loss"})
"""A diverged run reports a NaN or infinite loss: a result, stored as null."""

_OPTIONAL_NUMBERS = ("time", "loss", "accuracy", "samples_per_second", "lr")
_KNOWN = frozenset(
    {
        "job_id", "attempt", "step", "rank", "world_size", *_OPTIONAL_NUMBERS,
        "phase_seconds", "optimizer", "state_bytes_per_rank", "final", "checkpoint",
    }
)  # fmt: skip
_EMPTY: Mapping[str, float] = MappingProxyType({})


def _empty() -> Mapping[str, float]:
    return _EMPTY


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordCheckpoint:
    """The checkpoint a record reports: where it lies is checked against the job later."""

    step: int
    path: str
    time: float | None
    """Unset on the wire: ingestion takes the record's own time, else now."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsRecord:
    """One validated metrics record of a job (build it with :meth:`from_dict`).

    ``None`` means "not reported" (such a field is neither stored nor exported);
    numbers keep the type they arrived with, so the stored JSON is the record
    as sent. Unknown numeric top-level keys (``eval_loss``, ...) are ``extra``.
    """

    job_id: str
    step: int
    attempt: int = 1
    rank: int = 0
    world_size: int = 0
    time: float | None = None
    loss: float | None = None
    accuracy: float | None = None
    samples_per_second: float | None = None
    lr: float | None = None
    phase_seconds: Mapping[str, float] = field(default_factory=_empty)
    optimizer: Mapping[str, float] = field(default_factory=_empty)
    state_bytes_per_rank: tuple[float, ...] = ()
    final: bool = False
    checkpoint: RecordCheckpoint | None = None
    extra: Mapping[str, float] = field(default_factory=_empty)

    @classmethod
    def from_dict(cls, job_id: str, data: Any) -> MetricsRecord:
        """Validate the record ``data`` (the metrics-record JSON object) of ``job_id``.

        Raises:
            InvalidArgument: naming every bad field and its rule.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"record: must be a JSON object, got {type(data).__name__}")
        errors: list[str] = []
        if not isinstance(job_id, str) or not job_id:
            errors.append(f"job_id: must be a non-empty string, got {job_id!r}")
        elif data.get("job_id") not in (None, job_id):
            errors.append(
                f"record.job_id: must be the job's id {job_id!r}, got {data['job_id']!r}"
            )
        _check_sizes(data, "record", errors)

        def integer(name: str, value: Any, minimum: int) -> bool:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                errors.append(f"record.{name}: must be an integer >= {minimum}, got {value!r}")
                return False
            return True

        integer("step", data.get("step"), 0)
        integer("attempt", data.get("attempt", 1), 1)
        for name in ("rank", "world_size"):
            if name in data:
                integer(name, data[name], 0)
        for name in _OPTIONAL_NUMBERS:
            value = data.get(name)
            if value is not None and not is_number(value):
                errors.append(f"record.{name}: must be a number, got {value!r}")
        if not isinstance(data.get("final", False), bool):
            errors.append(f"record.final: must be true or false, got {data['final']!r}")
        phases = _numbers(data.get("phase_seconds"), "phase_seconds", errors, nonnegative=True)
        optimizer = _numbers(data.get("optimizer"), "optimizer", errors, nonnegative=False)
        per_rank = data.get("state_bytes_per_rank")
        if per_rank is not None and not (
            isinstance(per_rank, list | tuple) and all(is_number(n) and n >= 0 for n in per_rank)
        ):
            errors.append(
                f"record.state_bytes_per_rank: must be a list of numbers >= 0, got {per_rank!r}"
            )
        checkpoint = _checkpoint(data.get("checkpoint"), integer, errors)
        extra = {}
        for key, value in data.items():
            if key in _KNOWN or not isinstance(key, str) or value is None:
                continue  # None: not reported
            if is_number(value):
                extra[key] = value
            else:
                errors.append(
                    f"record.{str(key)[:80]}: must be a number (unknown keys are numeric "
                    f"extras), got {type(value).__name__}"
                )
        if errors:
            raise InvalidArgument("; ".join(errors))
        return cls(
            job_id=job_id,
            step=data["step"],
            attempt=data.get("attempt", 1),
            rank=data.get("rank", 0),
            world_size=data.get("world_size", 0),
            **{name: data.get(name) for name in _OPTIONAL_NUMBERS},
            phase_seconds=phases,
            optimizer=optimizer,
            state_bytes_per_rank=tuple(per_rank or ()),
            final=data.get("final", False),
            checkpoint=checkpoint,
            extra=MappingProxyType(extra) if extra else _EMPTY,
        )

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON object, as stored (``latest_metrics``, events) and served.

        Unreported optional numbers are left out; extras sit beside the known keys.
        """
        out: dict[str, Any] = dict(self.extra)
        out.update(
            job_id=self.job_id, attempt=self.attempt, step=self.step, rank=self.rank,
            world_size=self.world_size,
        )  # fmt: skip
        for name in _OPTIONAL_NUMBERS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out["phase_seconds"] = dict(self.phase_seconds)
        out["optimizer"] = dict(self.optimizer)
        out["state_bytes_per_rank"] = list(self.state_bytes_per_rank)
        out["final"] = self.final
        if self.checkpoint is not None:
            out["checkpoint"] = {
                "step": self.checkpoint.step,
                "path": self.checkpoint.path,
                "time": self.checkpoint.time,
            }
        return out


def _numbers(
    value: Any, name: str, errors: list[str], *, nonnegative: bool
) -> Mapping[str, float]:
    """A map of numbers (``phase_seconds``, ``optimizer``), read-only; errors appended."""
    if value is None:
        return _EMPTY
    if not isinstance(value, Mapping):
        errors.append(f"record.{name}: must be a mapping, got {value!r}")
        return _EMPTY
    rule = "a number >= 0" if nonnegative else "a number"
    for key, item in value.items():
        if not is_number(item) or (nonnegative and item < 0):
            errors.append(f"record.{name}.{str(key)[:80]}: must be {rule}, got {item!r}")
    return MappingProxyType(dict(value))


def _checkpoint(
    raw: Any, integer: Callable[[str, Any, int], bool], errors: list[str]
) -> RecordCheckpoint | None:
    """The record's checkpoint, its shape checked (its place is ingestion's to check)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        errors.append(f"record.checkpoint: must be an object, got {type(raw).__name__}")
        return None
    ok = integer("checkpoint.step", raw.get("step"), 0)
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        errors.append(f"record.checkpoint.path: must be a non-empty string, got {path!r}")
        ok = False
    when = raw.get("time")
    if when is not None and not is_number(when):
        errors.append(f"record.checkpoint.time: must be a number, got {when!r}")
        ok = False
    if not ok or not isinstance(path, str):
        return None
    return RecordCheckpoint(step=raw["step"], path=path, time=when)


def _check_sizes(value: Mapping, where: str, errors: list[str]) -> None:
    """Key count and length of ``value`` and its nested maps; finite numbers; short lists."""
    if len(value) > MAX_KEYS:
        errors.append(f"{where}: must have at most {MAX_KEYS} keys, got {len(value)}")
        return
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
            errors.append(
                f"{where}: keys must be 1-{MAX_KEY_CHARS} characters, got {str(key)[:80]!r}"
            )
            continue
        name = f"{where}.{key}"
        if isinstance(item, float) and not math.isfinite(item):
            if where != "record" or key not in NON_FINITE_ALLOWED:
                errors.append(f"{name}: must be finite, got {item!r}")
        elif isinstance(item, Mapping):
            _check_sizes(item, name, errors)
        elif isinstance(item, list | tuple) and len(item) > MAX_LIST_ITEMS:
            errors.append(f"{name}: must have at most {MAX_LIST_ITEMS} items, got {len(item)}")
