"""Metrics reporting from worker rank 0: stdout JSON lines, plus remote sinks that never stall training.

A :class:`Reporter` takes metrics records (see docs/ARCHITECTURE.md, "Metrics
record"). :class:`StdoutReporter` prints each as one line prefixed
``ZEROTRAIN_METRICS``. :class:`BufferedReporter` hands records to a *sink*
(any object with ``send(record: dict) -> None`` that raises on failure) from a
background thread: a bounded buffer (oldest records dropped first, counted) and
retries with capped exponential backoff, so an unreachable sink costs training
nothing. :func:`make_reporter` picks the reporters from the environment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol, TextIO

__all__ = [
    "METRICS_PREFIX",
    "BufferedReporter",
    "JsonlFileSink",
    "MultiReporter",
    "Reporter",
    "Sink",
    "StdoutReporter",
    "make_reporter",
]

METRICS_PREFIX = "ZEROTRAIN_METRICS "
"""Prefix of each metrics line on stdout (the rest of the line is one JSON object)."""

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a :class:`BufferedReporter` delivers records; ``send`` raises on failure."""

    def send(self, record: dict) -> None: ...


class Reporter:
    """Receives metrics records. ``emit`` must never block training or raise."""

    def emit(self, record: dict) -> None:
        """Report one metrics record."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush what can be flushed quickly and release resources."""


class StdoutReporter(Reporter):
    """Writes each record as ``ZEROTRAIN_METRICS {json}`` on one line (the default reporter)."""

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream

    def emit(self, record: dict) -> None:
        stream = self._stream or sys.stdout
        try:
            stream.write(METRICS_PREFIX + json.dumps(record, allow_nan=True) + "\n")
            stream.flush()
        except (OSError, ValueError, TypeError) as exc:  # a closed pipe must not kill training
            log.warning("metrics record not written to stdout: %s", exc)


class JsonlFileSink:
    """Appends each record as one JSON line to a local file (a sink for :class:`BufferedReporter`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def send(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


class BufferedReporter(Reporter):
    """Delivers records to ``sink`` from a daemon thread, in order, with bounded memory.

    ``emit`` only appends to a deque (``capacity`` records; when full the oldest
    is dropped and ``dropped`` counts it). A failing ``send`` is retried with
    exponential backoff from ``retry_initial_s`` up to ``retry_max_s``; the
    record stays at the head of the buffer meanwhile. An error that says a
    retry cannot help (``retryable`` false, e.g. a refused record) drops that
    record (``rejected``); one that says the sink takes nothing more (``final``
    true: the service ended the job) stops delivery for good. ``close`` waits
    at most ``close_timeout_s`` for the buffer to drain.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        capacity: int = 1024,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        close_timeout_s: float = 5.0,
    ):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.sink = sink
        self.capacity = capacity
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.close_timeout_s = close_timeout_s
        self.dropped = 0
        """Records dropped because the buffer was full."""
        self.sent = 0
        """Records delivered."""
        self.failures = 0
        """Failed ``send`` attempts."""
        self.rejected = 0
        """Records dropped because the sink refused them for good."""
        self.finished = False
        """The sink said it takes no more records; nothing is sent any more."""
        self._buffer: deque[dict] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="zerotrain-reporter", daemon=True)
        self._thread.start()

    def emit(self, record: dict) -> None:
        with self._cond:
            if self._closing or self.finished:
                return
            if len(self._buffer) >= self.capacity:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(record)
            self._cond.notify()

    def pending(self) -> int:
        """Records waiting to be delivered."""
        with self._cond:
            return len(self._buffer)

    def close(self) -> None:
        deadline = time.monotonic() + self.close_timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._buffer and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._buffer.clear()  # undeliverable in time: give up rather than hang the job
            self._cond.notify_all()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.1)
        close = getattr(self.sink, "close", None)
        if callable(close):
            try:
                close()
            except Exception as exc:  # closing a sink must never fail the job
                log.debug("sink close failed: %s", exc)

    def _run(self) -> None:
        delay = self.retry_initial_s
        while True:
            with self._cond:
                while not self._buffer and not self._closing:
                    self._cond.wait()
                if not self._buffer:
                    return
                record = self._buffer[0]
            try:
                self.sink.send(record)
            except Exception as exc:
                self.failures += 1
                if getattr(exc, "final", False) or getattr(exc, "retryable", True) is False:
                    self._give_up(record, exc)
                    if self.finished:
                        return
                    continue
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    log.warning("metrics sink failed (%d failures so far): %s", self.failures, exc)
                with self._cond:
                    self._cond.wait(timeout=delay)  # close() wakes us up early
                    if self._closing and not self._buffer:
                        return
                delay = min(delay * 2, self.retry_max_s)
                continue
            delay = self.retry_initial_s
            with self._cond:
                # The head may have been dropped while sending if the buffer overflowed.
                if self._buffer and self._buffer[0] is record:
                    self._buffer.popleft()
                self.sent += 1
                self._cond.notify_all()


    def _give_up(self, record: dict, exc: Exception) -> None:
        """Drop ``record`` (and, after a final error, everything) without retrying."""
        with self._cond:
            if getattr(exc, "final", False):
                self.finished = True
                self.rejected += len(self._buffer)
                self._buffer.clear()
            elif self._buffer and self._buffer[0] is record:
                self._buffer.popleft()
                self.rejected += 1
            self._cond.notify_all()
        log.warning(
            "metrics record%s refused, not retried: %s",
            "s from now on" if self.finished else "", exc,
        )  # fmt: skip


class MultiReporter(Reporter):
    """Sends every record to each of ``reporters``; one failing never affects the others."""

    def __init__(self, reporters: Sequence[Reporter]):
        self.reporters = list(reporters)

    def emit(self, record: dict) -> None:
        for reporter in self.reporters:
            try:
                reporter.emit(record)
            except Exception as exc:  # reporting never fails training
                log.warning("reporter %s failed: %s", type(reporter).__name__, exc)

    def close(self) -> None:
        for reporter in self.reporters:
            try:
                reporter.close()
            except Exception as exc:
                log.warning("reporter %s failed to close: %s", type(reporter).__name__, exc)


def make_reporter(
    environ: Mapping[str, str] | None = None, *, metrics_file: str | None = None
) -> Reporter:
    """The reporter for this process: stdout always; the service's ingestion rpc when
    ``ZEROTRAIN_INGEST_ADDRESS`` and ``ZEROTRAIN_JOB_ID`` are set (``ZEROTRAIN_INGEST_TOKEN_FILE``
    or ``ZEROTRAIN_INGEST_TOKEN``, and ``ZEROTRAIN_INGEST_CA``, optional); a JSON-lines file
    when ``metrics_file`` is given.
    """
    env = os.environ if environ is None else environ
    reporters: list[Reporter] = [StdoutReporter()]
    address, job_id = env.get("ZEROTRAIN_INGEST_ADDRESS"), env.get("ZEROTRAIN_JOB_ID")
    if address and job_id:
        try:
            from zerotrain.service.ingest_client import (
                GrpcSink,  # lazy: gRPC only when a service is used
            )

            sink = GrpcSink.from_env(env)
            assert sink is not None  # the address is set
            reporters.append(BufferedReporter(sink))
        except Exception as exc:  # no ingestion beats no training
            log.warning("metrics ingestion to %s disabled: %s", address, exc)
    if metrics_file:
        reporters.append(BufferedReporter(JsonlFileSink(metrics_file)))
    return reporters[0] if len(reporters) == 1 else MultiReporter(reporters)
