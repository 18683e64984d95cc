"""No single client can starve the service: header floods, per-principal budgets, the health port.

A real server on an ephemeral loopback port over a real SQLite store (jobs are
seeded; nothing here reaches Ray). The floods are bounded (a few hundred
streams, seconds) and stay on 127.0.0.1. A raw HTTP/2 client (``h2``) sends
HEADERS frames that gRPC's own client would never send alone: a call's
headers and then never its request message.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from zerotrain.service.model import JobState
from zerotrain.service.server import MAX_STREAMS_PER_CONNECTION
from zerotrain.service.spec import JobSpec

from .support import Served, bearer, health_status, seed_job, serve_manager

SERVING = 1
SPEC = JobSpec.from_dict({"name": "budget", "task": "regression"})
UNAUTHENTICATED = "16"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve_manager(tmp_path, None) as s:
        seed_job(s.manager.store, "j-alice", "alice", SPEC, JobState.RUNNING)
        seed_job(s.manager.store, "j-bob", "bob", SPEC, JobState.RUNNING)
        yield s


class RawHttp2:
    """One TCP connection speaking HTTP/2 directly: HEADERS frames without request bodies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.statuses: dict[int, str] = {}
        self.resets: dict[int, Any] = {}

    def send_headers(self, count: int, method: str, token: str | None = None) -> None:
        """Open ``count`` calls of ``method``: headers only, the stream left open for a body."""
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", method),
            (":authority", f"127.0.0.1:{self.port}"), ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]  # fmt: skip
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        for _ in range(count):
            self.conn.send_headers(self.conn.get_next_available_stream_id(), headers)
        self.sock.sendall(self.conn.data_to_send())

    def read_for(self, seconds: float) -> None:
        """Collect the server's answers (grpc-status per stream, stream resets)."""
        self.sock.settimeout(0.1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    status = dict(event.headers).get("grpc-status")
                    if status is not None:
                        self.statuses[event.stream_id] = status
                elif isinstance(event, h2.events.StreamReset):
                    self.resets.setdefault(event.stream_id, event.error_code)
            if out := self.conn.data_to_send():
                self.sock.sendall(out)

    def close(self) -> None:
        self.sock.close()


def _served_normally(served: Served) -> None:
    """Every kind of caller still gets through: users, a worker, both health endpoints."""
    stub = served.stub()
    assert stub.GetJob(pb.GetJobRequest(job_id="j-bob"), metadata=bearer("bob"), timeout=5)
    assert stub.ListJobs(pb.ListJobsRequest(), metadata=bearer("root"), timeout=5).jobs
    token = served.auth.ingest_token_for("j-bob")
    stub.ReportMetrics(
        pb.ReportMetricsRequest(job_id="j-bob", record=pb.MetricsRecord(step=1, attempt=1)),
        metadata=(("authorization", f"Bearer {token}"), ("zerotrain-job-id", "j-bob")),
        timeout=5,
    )
    assert health_status(served.port) == SERVING
    assert health_status(served.health_port) == SERVING


def test_unauthenticated_header_flood_holds_nothing(served: Served) -> None:
    """Six connections each open 30 unauthenticated GetJob calls (180 in all, more than the
    server has threads) and never send a body. Each is refused at its headers, so all of
    them together hold no thread and no budget, while the connections stay open."""
    flooders = [RawHttp2(served.port) for _ in range(6)]
    try:
        for flood in flooders:
            flood.send_headers(30, "/zerotrain.v1.JobService/GetJob")
        for flood in flooders:
            flood.read_for(1.0)
        for flood in flooders:
            assert Counter(flood.statuses.values()) == {UNAUTHENTICATED: 30}, flood.statuses
        _served_normally(served)
        # Bodiless ReportMetrics without a valid ingest token: refused at the headers too.
        flood = RawHttp2(served.port)
        flooders.append(flood)
        flood.send_headers(30, "/zerotrain.v1.JobService/ReportMetrics", token="f" * 64)
        flood.read_for(1.0)
        assert Counter(flood.statuses.values()) == {UNAUTHENTICATED: 30}
        _served_normally(served)
    finally:
        for flood in flooders:
            flood.close()


def test_one_connection_may_open_only_so_many_streams(served: Served) -> None:
    """130 HEADERS frames on one connection (the issue's attack): the server advertises its
    cap and resets every stream beyond it; the rest are refused at once."""
    flood = RawHttp2(served.port)
    try:
        flood.send_headers(130, "/zerotrain.v1.JobService/GetJob")
        flood.read_for(1.5)
        assert flood.conn.remote_settings.max_concurrent_streams == MAX_STREAMS_PER_CONNECTION
        answered = set(flood.statuses)
        assert len(answered) <= MAX_STREAMS_PER_CONNECTION
        assert set(flood.statuses.values()) == {UNAUTHENTICATED}
        assert answered | set(flood.resets) == set(range(1, 261, 2)), "a stream was left hanging"
        _served_normally(served)
    finally:
        flood.close()


def _open_watches(served: Served, who: str, job_id: str, count: int) -> tuple[list, list, list]:
    """``count`` WatchJob streams spread over several connections (each allows a few dozen).

    Returns ``(open streams, refusals as (code, details), channels)``.
    """
    channels = [  # a private subchannel pool: one TCP connection per channel
        grpc.insecure_channel(
            f"127.0.0.1:{served.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(-(-count // 20))
    ]
    calls = [
        pb_grpc.JobServiceStub(channels[i // 20]).WatchJob(
            pb.WatchJobRequest(job_id=job_id), metadata=bearer(who), timeout=60
        )
        for i in range(count)
    ]
    opened, refused = [], []
    lock = threading.Lock()

    def first_event(call: Any) -> None:
        try:
            next(call)  # the job's first state event: the stream is open
            with lock:
                opened.append(call)
        except grpc.RpcError as exc:
            with lock:
                refused.append((exc.code(), exc.details()))

    threads = [threading.Thread(target=first_event, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return opened, refused, channels


def test_one_principal_cannot_lock_out_the_others(served: Served) -> None:
    """alice opens 200 WatchJob streams on her own job: 16 open, 184 refused naming the
    limit; bob, workers and health checks are served as if she were not there."""
    opened, refused, channels = _open_watches(served, "alice", "j-alice", 200)
    try:
        assert len(opened) == 16 and len(refused) == 184
        codes = {code for code, _ in refused}
        assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("--max-streams-per-principal" in d and "16" in d for _, d in refused)
        _served_normally(served)
        # bob's own streams come from his own budget.
        bob_open, bob_refused, bob_channels = _open_watches(served, "bob", "j-bob", 4)
        channels += bob_channels
        assert len(bob_open) == 4 and not bob_refused
        for call in bob_open:
            call.cancel()
        # alice's unary calls are a separate budget from her streams.
        assert served.stub().GetJob(
            pb.GetJobRequest(job_id="j-alice"), metadata=bearer("alice"), timeout=5
        )
    finally:
        for call in opened:
            call.cancel()
        for channel in channels:
            channel.close()
    # Closing her streams gives alice her budget back.
    deadline = time.monotonic() + 10
    while True:
        again, refused, channels = _open_watches(served, "alice", "j-alice", 1)
        for call in again:
            call.cancel()
        for channel in channels:
            channel.close()
        if again or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(again) == 1, refused


def test_bodiless_calls_of_a_principal_are_bounded_and_released(served: Served) -> None:
    """A principal's calls count from their headers: sixteen calls that never send their
    request are all alice may hold; when they go away her budget comes back."""
    release = threading.Event()

    def never() -> Iterator[pb.GetJobRequest]:
        release.wait(30)
        return
        yield  # a generator that sends nothing

    channel = served.channel()
    raw = channel.stream_unary(
        "/zerotrain.v1.JobService/GetJob",
        request_serializer=pb.GetJobRequest.SerializeToString,
        response_deserializer=pb.Job.FromString,
    )
    pending = [raw.future(never(), metadata=bearer("alice"), timeout=30) for _ in range(16)]
    try:
        time.sleep(0.5)  # let their headers arrive
        with pytest.raises(grpc.RpcError) as info:
            served.stub().GetJob(
                pb.GetJobRequest(job_id="j-alice"), metadata=bearer("alice"), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-calls-per-principal" in info.value.details()
        _served_normally(served)  # bob, workers and probes are untouched
    finally:
        for future in pending:
            future.cancel()
        release.set()
        channel.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            served.stub().GetJob(
                pb.GetJobRequest(job_id="j-alice"), metadata=bearer("alice"), timeout=5
            )
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "alice's budget was never released"
            time.sleep(0.1)
