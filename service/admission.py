"""Call budgets: how many rpcs each kind of caller may have in flight at once.

Every rpc holds one server thread from the moment its headers arrive until it
ends (a watch stream for as long as it is open), and grpc-python has no
per-caller limits of its own: one principal holding every thread locks all
others out. :class:`Admission` counts calls per *kind* and per caller and
refuses a call, at once and naming the limit, when admitting it would go over:

==========  =====================================  ====================================
kind        what                                   limits
==========  =====================================  ====================================
``stream``  WatchJob, StreamLogs (user streams)    ``max_streams_per_principal`` each,
                                                   ``max_streams`` together
``call``    every other user rpc (unary)           ``max_calls_per_principal`` each,
                                                   ``max_calls`` together
``ingest``  ReportMetrics (workers)                ``ingest_calls_per_job`` each,
                                                   ``ingest_calls`` together
``open``    health and reflection on the API port  ``open_calls`` together
==========  =====================================  ====================================

The four totals are separate shares of the server's threads
(:attr:`CallLimits.threads`), so streams can never take the threads unary
calls and ingestion need, and unauthenticated callers can never take any of
them. This module only counts; :mod:`zerotrain.service.gate` applies it to gRPC.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from dataclasses import dataclass

__all__ = ["Admission", "CallKind", "CallLimits"]


class CallKind(enum.StrEnum):
    """The budget a call is counted in."""

    STREAM = "stream"
    CALL = "call"
    INGEST = "ingest"
    OPEN = "open"


#: Threads beyond the budgets, for the refusals themselves (each takes microseconds).
_SPARE_THREADS = 8


@dataclass(frozen=True, kw_only=True)
class CallLimits:
    """Concurrent-call limits of one server (see the module docstring)."""

    max_streams_per_principal: int = 16
    """Open WatchJob/StreamLogs streams one principal may hold."""
    max_streams: int = 64
    """Open streams of all principals together."""
    max_calls_per_principal: int = 16
    """Unary calls one principal may have in flight (headers received, not yet answered)."""
    max_calls: int = 48
    """Unary user calls in flight in total."""
    ingest_calls_per_job: int = 4
    """ReportMetrics calls in flight for one job (its reporter sends one at a time)."""
    ingest_calls: int = 16
    """ReportMetrics calls in flight in total (reserved for workers)."""
    open_calls: int = 8
    """Health and reflection calls in flight on the API port (no token needed)."""

    def __post_init__(self) -> None:
        errors = [
            f"{name}: must be >= 1, got {getattr(self, name)}"
            for name in self.__dataclass_fields__
            if getattr(self, name) < 1
        ]
        for each, total in (
            ("max_streams_per_principal", "max_streams"),
            ("max_calls_per_principal", "max_calls"),
            ("ingest_calls_per_job", "ingest_calls"),
        ):
            if getattr(self, each) > getattr(self, total):
                errors.append(f"{each}: must be <= {total} ({getattr(self, total)})")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def threads(self) -> int:
        """Server threads needed so that admitted calls never queue for one."""
        return (
            self.max_streams + self.max_calls + self.ingest_calls + self.open_calls + _SPARE_THREADS
        )


class Admission:
    """Thread-safe counters of the calls in flight, checked against :class:`CallLimits`."""

    def __init__(self, limits: CallLimits | None = None) -> None:
        self.limits = limits or CallLimits()
        self._lock = threading.Lock()
        self._totals: Counter[CallKind] = Counter()
        self._per_caller: Counter[tuple[CallKind, str]] = Counter()

    def try_admit(self, kind: CallKind, caller: str) -> str | None:
        """Count one more call of ``caller``; ``None`` when admitted, else why not.

        The refusal names the limit that was hit and the server setting behind it.
        """
        each, total = self._limits_of(kind)
        with self._lock:
            held = self._per_caller[(kind, caller)]
            if each is not None and held >= each[0]:
                return (
                    f"{caller} already has {held} {_NOUNS[kind]} in flight; the limit is "
                    f"{each[0]} per {'job' if kind == CallKind.INGEST else 'principal'} "
                    f"({each[1]}); wait for one to end"
                )
            if self._totals[kind] >= total[0]:
                return (
                    f"the server already has {self._totals[kind]} {_NOUNS[kind]} in flight; "
                    f"the limit is {total[0]} ({total[1]}); retry shortly"
                )
            self._per_caller[(kind, caller)] = held + 1
            self._totals[kind] += 1
        return None

    def release(self, kind: CallKind, caller: str) -> None:
        """Forget one call counted by :meth:`try_admit` (exactly once per admitted call)."""
        with self._lock:
            key = (kind, caller)
            self._per_caller[key] -= 1
            if self._per_caller[key] <= 0:
                del self._per_caller[key]
            self._totals[kind] -= 1

    def in_flight(self, kind: CallKind, caller: str | None = None) -> int:
        """Calls of ``kind`` in flight (of ``caller`` only, when given)."""
        with self._lock:
            if caller is None:
                return self._totals[kind]
            return self._per_caller[(kind, caller)]

    def _limits_of(
        self, kind: CallKind
    ) -> tuple[tuple[int, str] | None, tuple[int, str]]:
        limits = self.limits
        if kind == CallKind.STREAM:
            return (
                (limits.max_streams_per_principal, "--max-streams-per-principal"),
                (limits.max_streams, "--max-streams"),
            )
        if kind == CallKind.CALL:
            return (
                (limits.max_calls_per_principal, "--max-calls-per-principal"),
                (limits.max_calls, "unary calls of all principals"),
            )
        if kind == CallKind.INGEST:
            return (
                (limits.ingest_calls_per_job, "ReportMetrics per job"),
                (limits.ingest_calls, "ReportMetrics of all jobs"),
            )
        return None, (limits.open_calls, "health and reflection on the API port")


_NOUNS = {
    CallKind.STREAM: "open streams (WatchJob/StreamLogs)",
    CallKind.CALL: "unary calls",
    CallKind.INGEST: "ReportMetrics calls",
    CallKind.OPEN: "health/reflection calls",
}
