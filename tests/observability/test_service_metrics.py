"""ServiceMetrics and MetricsInterceptor against a real HTTP scrape, promtool and a real gRPC server."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zerotrain.service.metrics import MetricsInterceptor, ServiceMetrics
from zerotrain.service.records import MetricsRecord


def _record(step: int, job_id: str = "j-1", **overrides) -> MetricsRecord:
    return MetricsRecord.from_dict(job_id, _fields(step, job_id=job_id, **overrides))


def _fields(step: int, **overrides) -> dict:
    record = {
        "job_id": "j-1",
        "attempt": 1,
        "step": step,
        "time": 1764100000.0,
        "rank": 0,
        "world_size": 2,
        "loss": 0.83,
        "accuracy": 0.71,
        "samples_per_second": 412.0,
        "lr": 0.001,
        "phase_seconds": {
            "data": 0.001,
            "forward": 0.01,
            "backward": 0.02,
            "communication": 0.004,
            "optimizer": 0.003,
        },
        "optimizer": {
            "step": float(step),
            "lr": 0.001,
            "grad_norm": 1.2,
            "param_norm": 10.0,
            "update_norm": 0.01,
            "update_param_ratio": 0.001,
            "state_bytes_per_rank": 123456.0,
            "skipped_steps": 2.0,
            "nadam_mu_t": 0.9,
            "nadam_mu_product": 0.5,
            "nadam_bias_correction1": 0.3,
            "nadam_bias_correction2": 0.02,
            "nadam_sqrt_v_hat_mean": 0.04,
            "adamax_u_max": 3.0,
            "adamax_u_mean": 0.5,
            "adamax_u_refreshed_fraction": 0.25,
        },
        "state_bytes_per_rank": [123456, 123400],
        "final": False,
    }
    record.update(overrides)
    return record


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served():
    metrics = ServiceMetrics(retention_s=60.0, clock=_Clock())
    port = metrics.serve(0)
    yield metrics, f"http://127.0.0.1:{port}/metrics"
    metrics.close()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_training_record_becomes_series(served):
    metrics, url = served
    metrics.record_training(_record(10, "j-1"))
    metrics.record_training(_record(20, loss=0.5))
    samples = _samples(_scrape(url))
    job = (("job_id", "j-1"),)
    assert samples[("zerotrain_training_step", job)] == 20
    assert samples[("zerotrain_training_steps_total", job)] == 20
    assert samples[("zerotrain_training_loss", job)] == 0.5
    assert samples[("zerotrain_training_accuracy_ratio", job)] == 0.71
    assert samples[("zerotrain_training_samples_per_second", job)] == 412.0
    assert samples[("zerotrain_training_learning_rate", job)] == 0.001
    assert samples[("zerotrain_training_grad_norm", job)] == 1.2
    assert samples[("zerotrain_training_update_param_ratio", job)] == 0.001
    assert samples[("zerotrain_training_skipped_steps_total", job)] == 2
    assert samples[("zerotrain_training_restarts_total", job)] == 0
    assert samples[("zerotrain_training_active", job)] == 1
    assert samples[("zerotrain_adamax_u_refreshed_ratio", job)] == 0.25
    assert samples[("zerotrain_nadam_mu_product", job)] == 0.5
    assert samples[("zerotrain_nadam_bias_correction2", job)] == 0.02
    assert samples[("zerotrain_training_step_seconds", job)] == pytest.approx(0.038)
    phase = (("job_id", "j-1"), ("phase", "backward"))
    assert samples[("zerotrain_training_phase_seconds", phase)] == 0.02
    for rank, expected in ((0, 123456), (1, 123400)):
        key = ("zerotrain_training_optimizer_state_bytes", (("job_id", "j-1"), ("rank", str(rank))))
        assert samples[key] == expected


def test_restart_counts_and_step_rewind(served):
    metrics, url = served
    metrics.record_training(_record(30, "j-1"))
    # Restart from a checkpoint at step 20: the step rewinds, steps_total keeps counting.
    metrics.record_training(_record(25, attempt=2))
    metrics.record_training(_record(35, attempt=2))
    samples = _samples(_scrape(url))
    job = (("job_id", "j-1"),)
    assert samples[("zerotrain_training_step", job)] == 35
    assert samples[("zerotrain_training_steps_total", job)] == 40
    assert samples[("zerotrain_training_attempt", job)] == 2
    assert samples[("zerotrain_training_restarts_total", job)] == 1


def test_scraped_page_passes_promtool(served, promtool):
    metrics, url = served
    metrics.record_training(_record(10, "j-1"))
    metrics.record_training(_record(5, "j-2", phase_seconds={"data": 0.1, "weird": 0.2}))
    metrics.set_job_states({"RUNNING": 2, "PENDING": 0})
    metrics.inc_submissions()
    metrics.inc_reconciliation_errors()
    metrics.observe_rpc("zerotrain.v1.JobService/GetJob", "OK", 0.002)
    page = _scrape(url)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr
    )
    # Unknown phases are folded into "other": labels stay bounded.
    samples = _samples(page)
    assert (
        samples[("zerotrain_training_phase_seconds", (("job_id", "j-2"), ("phase", "other")))]
        == 0.2
    )
    assert all(name.startswith("zerotrain_") for name, _ in samples)


def test_finished_job_series_dropped_after_retention(served):
    metrics, url = served
    clock = metrics._clock
    metrics.record_training(_record(10, "j-1"))
    metrics.record_training(_record(10, "j-2"))
    metrics.job_finished("j-1")
    clock.now += 59.0
    samples = _samples(_scrape(url))
    assert samples[("zerotrain_training_active", (("job_id", "j-1"),))] == 0
    clock.now += 1.0
    page = _scrape(url)
    assert 'job_id="j-1"' not in page
    assert 'job_id="j-2"' in page
    # A late record cannot revive a retired job.
    metrics.record_training(_record(11, "j-1"))
    assert 'job_id="j-1"' not in _scrape(url)
    assert metrics.training_jobs() == ["j-2"]


def test_bad_record_is_rejected_and_changes_nothing():
    """A record is validated once, when it is built: a bad one never reaches the exporter."""
    metrics = ServiceMetrics()
    metrics.record_training(_record(10))
    bad = _fields(11, loss="high", optimizer={"grad_norm": None}, state_bytes_per_rank=[-1])
    with pytest.raises(ValueError) as excinfo:
        metrics.record_training(MetricsRecord.from_dict("j-1", bad))
    message = str(excinfo.value)
    assert "record.loss: must be a number" in message
    assert "record.optimizer.grad_norm: must be a number" in message
    assert "record.state_bytes_per_rank" in message
    assert metrics.registry.get_sample_value("zerotrain_training_step", {"job_id": "j-1"}) == 10
    with pytest.raises(ValueError, match="job_id"):
        metrics.record_training(MetricsRecord.from_dict("", _fields(1)))
    with pytest.raises(ValueError, match="retention_s"):
        ServiceMetrics(retention_s=-1)


def test_job_states_missing_become_zero():
    metrics = ServiceMetrics()
    metrics.set_job_states({"RUNNING": 2, "PENDING": 1})
    metrics.set_job_states({"SUCCEEDED": 3})
    get = metrics.registry.get_sample_value
    assert get("zerotrain_jobs", {"state": "RUNNING"}) == 0
    assert get("zerotrain_jobs", {"state": "PENDING"}) == 0
    assert get("zerotrain_jobs", {"state": "SUCCEEDED"}) == 3


# -- interceptor against a real gRPC server ------------------------------------------------


def _echo(request: bytes, context) -> bytes:
    return request


def _invalid(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.name: must not be empty")


def _crash(request: bytes, context) -> bytes:
    raise RuntimeError("boom")


def _count(request: bytes, context):
    for i in range(int(request or b"0")):
        yield str(i).encode()


@pytest.fixture
def grpc_server():
    metrics = ServiceMetrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[MetricsInterceptor(metrics)]
    )
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Invalid": grpc.unary_unary_rpc_method_handler(_invalid),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Svc", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield metrics, channel
    channel.close()
    server.stop(None)


def test_interceptor_counts_every_rpc_by_code(grpc_server):
    metrics, channel = grpc_server
    assert channel.unary_unary("/t.Svc/Echo")(b"hi", timeout=10) == b"hi"
    assert channel.unary_unary("/t.Svc/Echo")(b"again", timeout=10) == b"again"
    with pytest.raises(grpc.RpcError) as invalid:
        channel.unary_unary("/t.Svc/Invalid")(b"", timeout=10)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as crash:
        channel.unary_unary("/t.Svc/Crash")(b"", timeout=10)
    assert crash.value.code() == grpc.StatusCode.UNKNOWN
    assert list(channel.unary_stream("/t.Svc/Count")(b"3", timeout=10)) == [b"0", b"1", b"2"]
    with pytest.raises(grpc.RpcError) as missing:
        channel.unary_unary("/t.Svc/Nope")(b"", timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED

    get = metrics.registry.get_sample_value
    expected = {
        ("t.Svc/Echo", "OK"): 2,
        ("t.Svc/Invalid", "INVALID_ARGUMENT"): 1,
        ("t.Svc/Crash", "UNKNOWN"): 1,
        ("t.Svc/Count", "OK"): 1,
        ("unknown", "UNIMPLEMENTED"): 1,
    }
    for (method, code), count in expected.items():
        labels = {"method": method, "code": code}
        assert get("zerotrain_rpc_requests_total", labels) == count, labels
        assert get("zerotrain_rpc_duration_seconds_count", labels) == count, labels


def _forever(request: bytes, context):
    while context.is_active():
        yield b"tick"


def test_interceptor_counts_cancelled_stream():
    metrics = ServiceMetrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[MetricsInterceptor(metrics)]
    )
    handlers = {"Forever": grpc.unary_stream_rpc_method_handler(_forever)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Svc", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = channel.unary_stream("/t.Svc/Forever")(b"", timeout=10)
            assert next(stream) == b"tick"
            stream.cancel()
        labels = {"method": "t.Svc/Forever", "code": "CANCELLED"}
        deadline = time.monotonic() + 10
        while metrics.registry.get_sample_value("zerotrain_rpc_requests_total", labels) is None:
            assert time.monotonic() < deadline, "cancelled stream never counted"
            time.sleep(0.05)
    finally:
        server.stop(None)
