"""Reporters: stdout JSON lines, and a buffered sink that never stalls training."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from zerotrain.service.runtime.reporter import (
    METRICS_PREFIX,
    BufferedReporter,
    MultiReporter,
    StdoutReporter,
    make_reporter,
)


class FlakySink:
    """Fails while ``down`` is set; records what it received."""

    def __init__(self, down: bool = False):
        self.down = threading.Event()
        if down:
            self.down.set()
        self.received: list[dict] = []
        self.calls = 0

    def send(self, record: dict) -> None:
        self.calls += 1
        if self.down.is_set():
            raise ConnectionError("sink unreachable")
        self.received.append(record)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_stdout_reporter_writes_prefixed_json_lines():
    stream = io.StringIO()
    reporter = StdoutReporter(stream)
    reporter.emit({"step": 1, "loss": 0.5})
    reporter.emit({"step": 2, "loss": 0.25})
    lines = stream.getvalue().splitlines()
    assert [json.loads(line.removeprefix(METRICS_PREFIX)) for line in lines] == [
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": 0.25},
    ]
    assert all(line.startswith(METRICS_PREFIX) for line in lines)


def test_buffered_reporter_retries_in_order_after_an_outage():
    sink = FlakySink(down=True)
    reporter = BufferedReporter(sink, capacity=100, retry_initial_s=0.01, retry_max_s=0.02)
    start = time.perf_counter()
    for step in range(20):
        reporter.emit({"step": step})
    assert time.perf_counter() - start < 0.1  # emit never waits for the sink
    assert wait_for(lambda: sink.calls >= 3)  # retried while down
    sink.down.clear()
    assert wait_for(lambda: len(sink.received) == 20)
    assert [r["step"] for r in sink.received] == list(range(20))
    reporter.close()
    assert reporter.failures >= 3 and reporter.dropped == 0


def test_buffered_reporter_is_bounded_and_close_does_not_hang():
    sink = FlakySink(down=True)
    reporter = BufferedReporter(sink, capacity=5, retry_initial_s=0.01, close_timeout_s=0.3)
    for step in range(50):
        reporter.emit({"step": step})
    assert reporter.pending() <= 5
    assert reporter.dropped >= 45
    start = time.perf_counter()
    reporter.close()
    assert time.perf_counter() - start < 2.0
    reporter.emit({"step": 99})  # after close: ignored, no error


def test_multi_reporter_isolates_failures():
    class Broken(StdoutReporter):
        def emit(self, record):
            raise RuntimeError("boom")

    stream = io.StringIO()
    MultiReporter([Broken(), StdoutReporter(stream)]).emit({"step": 3})
    assert json.loads(stream.getvalue().removeprefix(METRICS_PREFIX)) == {"step": 3}


def test_make_reporter_from_environment(tmp_path):
    assert isinstance(make_reporter({}), StdoutReporter)
    metrics = tmp_path / "m.jsonl"
    reporter = make_reporter({}, metrics_file=str(metrics))
    reporter.emit({"step": 1})
    reporter.close()
    assert json.loads(metrics.read_text()) == {"step": 1}


def test_make_reporter_with_unreachable_ingest_never_stalls():
    pytest.importorskip("grpc")
    env = {"ZEROTRAIN_INGEST_ADDRESS": "127.0.0.1:9", "ZEROTRAIN_JOB_ID": "j-1"}
    reporter = make_reporter(env)
    assert isinstance(reporter, MultiReporter)
    buffered = reporter.reporters[1]
    assert isinstance(buffered, BufferedReporter)
    assert type(buffered.sink).__name__ == "GrpcSink"
    buffered.close_timeout_s = 0.5
    start = time.perf_counter()
    for step in range(100):
        reporter.emit({"job_id": "j-1", "step": step})
    assert time.perf_counter() - start < 0.5
    reporter.close()
    assert time.perf_counter() - start < 3.0
