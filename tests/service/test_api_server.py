"""The gRPC server without Ray: auth matrix, bad input, TLS/mTLS, health, reflection, limits.

The job manager here has a real SQLite store but no Ray adapter: every request
in this file is answered (or refused) before the manager would need Ray, and
jobs are seeded straight into the store.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api_support import (
    TOKENS,
    bearer,
    hermetic_client_env,  # noqa: F401 - autouse fixture
    make_auth,
    make_pki,
    seed_job,
    serving,
    stub,
)
from api_support import spec as api_spec
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.auth import Authenticator
from zerotrain.service.client import ApiError, JobClient
from zerotrain.service.ingest_client import GrpcSink, IngestError
from zerotrain.service.jobs import JobManager
from zerotrain.service.model import JobState
from zerotrain.service.server import create_ingest_server, create_server, stop_server
from zerotrain.service.store import JobStore


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[JobManager]:
    """A manager that is never started and has no Ray: nothing here may reach Ray."""
    m = JobManager(JobStore(tmp_path / "jobs.db"), None, data_dir=tmp_path)  # type: ignore[arg-type]
    yield m
    m.store.close()


@pytest.fixture
def port(manager: JobManager) -> Iterator[int]:
    seed_job(manager.store, "j-alice", "alice")
    seed_job(manager.store, "j-bob", "bob")
    with serving(manager, make_auth()) as p:
        yield p


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _snapshot(store: JobStore) -> list[tuple]:
    jobs, _ = store.list_jobs(page_size=1000)
    return [(j.job_id, j.state, store.last_sequence(j.job_id)) for j in jobs]


# --------------------------------------------------------------------- auth
AUTH_MATRIX = [
    # (caller, rpc, job, expected)
    (None, "GetJob", "j-alice", grpc.StatusCode.UNAUTHENTICATED),
    ("bad", "GetJob", "j-alice", grpc.StatusCode.UNAUTHENTICATED),
    ("alice", "GetJob", "j-alice", grpc.StatusCode.OK),
    ("bob", "GetJob", "j-alice", grpc.StatusCode.PERMISSION_DENIED),
    ("root", "GetJob", "j-alice", grpc.StatusCode.OK),
    (None, "CancelJob", "j-alice", grpc.StatusCode.UNAUTHENTICATED),
    ("bob", "CancelJob", "j-alice", grpc.StatusCode.PERMISSION_DENIED),
    ("bob", "WatchJob", "j-alice", grpc.StatusCode.PERMISSION_DENIED),
    ("bob", "StreamLogs", "j-alice", grpc.StatusCode.PERMISSION_DENIED),
    (None, "ListJobs", None, grpc.StatusCode.UNAUTHENTICATED),
    (None, "SubmitJob", None, grpc.StatusCode.UNAUTHENTICATED),
    ("bad", "SubmitJob", None, grpc.StatusCode.UNAUTHENTICATED),
    (None, "WatchJob", "j-alice", grpc.StatusCode.UNAUTHENTICATED),
    (None, "StreamLogs", "j-alice", grpc.StatusCode.UNAUTHENTICATED),
    (None, "ReportMetrics", "j-alice", grpc.StatusCode.UNAUTHENTICATED),
    ("alice", "ReportMetrics", "j-alice", grpc.StatusCode.UNAUTHENTICATED),  # users do not ingest
]


def _request(rpc: str, job: str | None):
    return {
        "GetJob": lambda: pb.GetJobRequest(job_id=job),
        "CancelJob": lambda: pb.CancelJobRequest(job_id=job),
        "WatchJob": lambda: pb.WatchJobRequest(job_id=job),
        "StreamLogs": lambda: pb.StreamLogsRequest(job_id=job),
        "ListJobs": lambda: pb.ListJobsRequest(),
        "SubmitJob": lambda: pb.SubmitJobRequest(spec=pb.JobSpec(name="x", task="digits")),
        "ReportMetrics": lambda: pb.ReportMetricsRequest(
            job_id=job, record=pb.MetricsRecord(step=1, attempt=1)
        ),
    }[rpc]()


@pytest.mark.parametrize(("caller", "rpc", "job", "expected"), AUTH_MATRIX)
def test_auth_matrix(port: int, caller, rpc, job, expected):
    metadata = (
        (("authorization", "Bearer not-a-known-token"),) if caller == "bad" else bearer(caller)
    )
    method = getattr(stub(port), rpc)

    def call():
        reply = method(_request(rpc, job), metadata=metadata, timeout=10)
        if rpc in ("WatchJob", "StreamLogs"):
            next(iter(reply), None)  # the status arrives with the first message

    assert _code(call) == expected


def test_listing_is_scoped_to_the_principal(port: int):
    s = stub(port)

    def ids(who: str, **kw) -> set[str]:
        reply = s.ListJobs(pb.ListJobsRequest(**kw), metadata=bearer(who))
        return {j.job_id for j in reply.jobs}

    assert ids("alice") == {"j-alice"}
    assert ids("bob") == {"j-bob"}
    assert ids("root") == {"j-alice", "j-bob"}
    assert ids("root", owner="bob") == {"j-bob"}
    assert _code(s.ListJobs, pb.ListJobsRequest(owner="bob"), metadata=bearer("alice")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_owner_and_admin_can_cancel(port: int, manager: JobManager):
    s = stub(port)
    job = s.CancelJob(pb.CancelJobRequest(job_id="j-alice"), metadata=bearer("alice"))
    assert job.state == pb.JOB_STATE_CANCELLED  # never reached Ray: cancelled at once
    job = s.CancelJob(pb.CancelJobRequest(job_id="j-bob"), metadata=bearer("root"))
    assert job.state == pb.JOB_STATE_CANCELLED
    assert manager.get("j-bob").state == JobState.CANCELLED
    # Cancelling a finished job is a precondition failure, and changes nothing.
    before = _snapshot(manager.store)
    assert _code(s.CancelJob, pb.CancelJobRequest(job_id="j-bob"), metadata=bearer("root")) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert _snapshot(manager.store) == before


def test_health_and_reflection_need_no_token(port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "zerotrain.v1.JobService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"zerotrain.v1.JobService", "grpc.health.v1.Health"} <= names


def test_tokens_never_echoed(port: int, caplog):
    secret = "Bearer sk-very-secret-value-123456"
    try:
        stub(port).GetJob(pb.GetJobRequest(job_id="j-alice"), metadata=(("authorization", secret),))
    except grpc.RpcError as exc:
        assert "sk-very-secret" not in (exc.details() or "")
    assert "sk-very-secret" not in caplog.text
    for token in TOKENS.values():
        assert token not in caplog.text


# ---------------------------------------------------------------- bad input
def _spec(**fields) -> pb.JobSpec:
    msg = pb.JobSpec(name="ok", task="digits")
    for path, value in fields.items():
        section, _, name = path.partition("__")
        target = getattr(msg, section) if name else msg
        attr = name or section
        if isinstance(value, list):
            getattr(target, attr).extend(value)
        else:
            setattr(target, attr, value)
    return msg


def _page_token(after: int) -> str:
    """A page token in the store's format (base64 of ``{"v": 1, "after": N}``)."""
    raw = json.dumps({"v": 1, "after": after}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_INPUTS = [
    # (id, rpc, request, expected status, text the message must contain)
    ("empty spec", "SubmitJob", pb.SubmitJobRequest(), grpc.StatusCode.INVALID_ARGUMENT,
     "name: must not be empty"),
    ("unknown task", "SubmitJob", pb.SubmitJobRequest(spec=_spec(task="nope")),
     grpc.StatusCode.INVALID_ARGUMENT, "task: unknown task 'nope'"),
    ("negative lr", "SubmitJob", pb.SubmitJobRequest(spec=_spec(optimizer__lr=-1.0)),
     grpc.StatusCode.INVALID_ARGUMENT, "optimizer.lr: must be > 0"),
    ("nan lr", "SubmitJob", pb.SubmitJobRequest(spec=_spec(optimizer__lr=float("nan"))),
     grpc.StatusCode.INVALID_ARGUMENT, "optimizer.lr: must be finite"),
    ("one beta", "SubmitJob", pb.SubmitJobRequest(spec=_spec(optimizer__betas=[0.9])),
     grpc.StatusCode.INVALID_ARGUMENT, "optimizer.betas: must be a pair"),
    ("unknown enum", "SubmitJob", pb.SubmitJobRequest(spec=_spec(optimizer__algorithm=42)),
     grpc.StatusCode.INVALID_ARGUMENT, "optimizer.algorithm: unknown enum value 42"),
    ("zero workers", "SubmitJob", pb.SubmitJobRequest(spec=_spec(scaling__num_workers=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "scaling.num_workers: must be >= 1"),
    ("stage 3", "SubmitJob", pb.SubmitJobRequest(spec=_spec(sharding__stage=3)),
     grpc.StatusCode.INVALID_ARGUMENT, "sharding.stage: must be one of 1, 2"),
    ("huge name", "SubmitJob", pb.SubmitJobRequest(spec=_spec(name="x" * 5000)),
     grpc.StatusCode.INVALID_ARGUMENT, "name: must have at most 128"),
    ("custom task disabled", "SubmitJob", pb.SubmitJobRequest(spec=_spec(task="os.path:join")),
     grpc.StatusCode.PERMISSION_DENIED, "custom tasks"),
    # The server's own limits (not the shared spec's): refused before Ray is asked anything.
    ("cpus floor", "SubmitJob",
     pb.SubmitJobRequest(spec=_spec(scaling__num_workers=4, scaling__cpus_per_worker=0.01)),
     grpc.StatusCode.INVALID_ARGUMENT, "scaling.cpus_per_worker: must be >= 0.5 on this server"),
    ("1024 tiny workers", "SubmitJob",
     pb.SubmitJobRequest(spec=_spec(scaling__num_workers=1024, scaling__cpus_per_worker=0.001)),
     grpc.StatusCode.INVALID_ARGUMENT, "scaling.num_workers: must be <= 64 on this server"),
    ("workers cap", "SubmitJob", pb.SubmitJobRequest(spec=_spec(scaling__num_workers=65)),
     grpc.StatusCode.INVALID_ARGUMENT, "--max-workers-per-job"),
    ("long idempotency key", "SubmitJob",
     pb.SubmitJobRequest(spec=_spec(), idempotency_key="k" * 500),
     grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key"),
    ("unknown job", "GetJob", pb.GetJobRequest(job_id="j-nope"), grpc.StatusCode.NOT_FOUND,
     "j-nope"),
    ("empty job id", "GetJob", pb.GetJobRequest(), grpc.StatusCode.INVALID_ARGUMENT,
     "job_id: is required"),
    ("cancel unknown", "CancelJob", pb.CancelJobRequest(job_id="j-nope"),
     grpc.StatusCode.NOT_FOUND, "j-nope"),
    ("watch from -1", "WatchJob", pb.WatchJobRequest(job_id="j-alice", from_sequence=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "from_sequence"),
    ("page size", "ListJobs", pb.ListJobsRequest(page_size=100000),
     grpc.StatusCode.INVALID_ARGUMENT, "page_size"),
    ("page token", "ListJobs", pb.ListJobsRequest(page_token="garbage!"),
     grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    # Well-formed tokens whose position SQLite cannot hold (was INTERNAL: OverflowError).
    ("page token 2**63", "ListJobs", pb.ListJobsRequest(page_token=_page_token(2**63)),
     grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    ("page token 10**30", "ListJobs", pb.ListJobsRequest(page_token=_page_token(10**30)),
     grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    ("negative page token", "ListJobs", pb.ListJobsRequest(page_token=_page_token(-(2**70))),
     grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    ("state enum", "ListJobs", pb.ListJobsRequest(state=99),
     grpc.StatusCode.INVALID_ARGUMENT, "state"),
    ("oversized", "SubmitJob",
     pb.SubmitJobRequest(spec=pb.JobSpec(name="x", task="digits", labels={"k": "v" * (2 << 20)})),
     grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]  # fmt: skip


@pytest.mark.parametrize(("rpc", "request_", "expected", "text"),
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])  # fmt: skip
def test_bad_input_is_refused_and_changes_nothing(port, manager, rpc, request_, expected, text):
    before = _snapshot(manager.store)
    method = getattr(stub(port), rpc)
    with pytest.raises(grpc.RpcError) as info:
        reply = method(request_, metadata=bearer("alice"), timeout=10)
        if rpc == "WatchJob":
            next(iter(reply))
    assert info.value.code() == expected, info.value.details()
    assert text in info.value.details()
    assert _snapshot(manager.store) == before


def test_invalid_spec_lists_every_field_as_bad_request_detail(port: int):
    request = pb.SubmitJobRequest(spec=_spec(name="", optimizer__lr=-1.0, scaling__num_workers=0))
    with pytest.raises(grpc.RpcError) as info:
        stub(port).SubmitJob(request, metadata=bearer("alice"))
    status = rpc_status.from_call(info.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    fields = {v.field for v in bad.field_violations}
    assert fields == {"spec.name", "spec.optimizer.lr", "spec.scaling.num_workers"}
    # The Python client surfaces the same list (it never sends an invalid spec itself:
    # JobClient.submit takes domain specs, which validate on construction).
    api = ApiError.from_rpc_error(info.value)
    assert api.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in api.field_violations} == fields


def test_report_metrics_with_the_job_ingest_token(port: int, manager: JobManager, tmp_path: Path):
    # A server whose authenticator we hold, to derive the per-job ingest tokens.
    auth = make_auth()
    with serving(manager, auth) as p:
        good = GrpcSink(f"127.0.0.1:{p}", "j-alice", token=auth.ingest_token_for("j-alice"))
        good.send({"attempt": 1, "step": 3, "time": time.time(), "loss": 0.5, "final": False})
        record = manager.get("j-alice")
        assert record.state == JobState.RUNNING and record.latest_metrics["step"] == 3
        assert record.latest_metrics["loss"] == 0.5
        # A job's token does not let it report for another job.
        other = GrpcSink(f"127.0.0.1:{p}", "j-bob", token=auth.ingest_token_for("j-alice"))
        with pytest.raises(IngestError) as info:
            other.send({"attempt": 1, "step": 1})
        assert info.value.code == "UNAUTHENTICATED" and not info.value.retryable
        # A malformed record is refused with the field named.
        with pytest.raises(IngestError) as info:
            good.send({"attempt": -1, "step": 1})
        assert info.value.code == "INVALID_ARGUMENT" and "attempt" in str(info.value)
    with pytest.raises(IngestError) as info:
        GrpcSink("127.0.0.1:1", "j-alice", timeout_s=2).send({"step": 1})
    assert info.value.retryable


def test_no_auth_mode_requires_loopback(manager: JobManager):
    with pytest.raises(ValueError, match="loopback"):
        create_server("0.0.0.0:0", manager, auth=Authenticator(None))
    with serving(manager, Authenticator(None)) as p:
        assert _code(stub(p).ListJobs, pb.ListJobsRequest()) == grpc.StatusCode.OK


# ---------------------------------------------------------------------- TLS
def test_tls_and_mutual_tls(manager: JobManager, tmp_path: Path):
    pki, rogue = make_pki(), make_pki("rogue-ca")
    (tmp_path / "rogue").mkdir()
    files, rogue_files = pki.write(tmp_path), rogue.write(tmp_path / "rogue")
    seed_job(manager.store, "j-alice", "alice")
    auth = make_auth()

    def get(p: int, **tls) -> grpc.StatusCode:
        client = JobClient(f"localhost:{p}", token=TOKENS["alice"], timeout_s=5, **tls)
        try:
            client.get("j-alice")
            return grpc.StatusCode.OK
        except ApiError as exc:
            return exc.code
        finally:
            client.close()

    with serving(manager, auth, tls=pki.server_tls()) as p:
        assert get(p, ca=files["ca"]) == grpc.StatusCode.OK
        # Workers push metrics over TLS, verifying the server with ZEROTRAIN_INGEST_CA.
        sink = GrpcSink.from_env(
            {
                "ZEROTRAIN_INGEST_ADDRESS": f"127.0.0.1:{p}",
                "ZEROTRAIN_JOB_ID": "j-alice",
                "ZEROTRAIN_INGEST_TOKEN": auth.ingest_token_for("j-alice"),
                "ZEROTRAIN_INGEST_CA": str(files["ca"]),
            }
        )
        sink.send({"attempt": 1, "step": 2})
        sink.close()
        assert manager.get("j-alice").latest_metrics["step"] == 2
        assert get(p, ca=rogue_files["ca"]) == grpc.StatusCode.UNAVAILABLE  # untrusted server
        plaintext = grpc.insecure_channel(f"127.0.0.1:{p}")
        assert (
            _code(
                health_pb2_grpc.HealthStub(plaintext).Check,
                health_pb2.HealthCheckRequest(),
                timeout=3,
            )
            == grpc.StatusCode.UNAVAILABLE
        )

    with serving(manager, auth, tls=pki.server_tls(mutual=True)) as p:
        mtls = {"client_cert": files["client_cert"], "client_key": files["client_key"]}
        assert get(p, ca=files["ca"], **mtls) == grpc.StatusCode.OK
        assert get(p, ca=files["ca"]) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        rogue_client = {
            "client_cert": rogue_files["client_cert"],
            "client_key": rogue_files["client_key"],
        }
        assert get(p, ca=files["ca"], **rogue_client) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_workers_report_on_the_ingest_only_port(manager: JobManager, tmp_path: Path):
    pki = make_pki()
    files = pki.write(tmp_path)
    seed_job(manager.store, "j-alice", "alice")
    auth = make_auth()
    server, port = create_ingest_server(
        "127.0.0.1:0", manager, auth=auth, tls=pki.server_tls(mutual=True)
    )
    try:
        # No client certificate needed here, only the job's ingest token.
        sink = GrpcSink(f"127.0.0.1:{port}", "j-alice", token=auth.ingest_token_for("j-alice"),
                        ca=files["ca"])  # fmt: skip
        sink.send({"attempt": 1, "step": 7})
        assert manager.get("j-alice").latest_metrics["step"] == 7
        with pytest.raises(IngestError) as info:  # a user token is no ingest token
            GrpcSink(f"127.0.0.1:{port}", "j-alice", token=TOKENS["alice"], ca=files["ca"]).send(
                {"attempt": 1, "step": 8}
            )
        assert info.value.code == "UNAUTHENTICATED"
        # Nothing else is served on this port.
        client = JobClient(f"127.0.0.1:{port}", token=TOKENS["root"], ca=files["ca"], timeout_s=5)
        with pytest.raises(ApiError) as api:
            client.get("j-alice")
        assert api.value.code == grpc.StatusCode.UNIMPLEMENTED
        client.close()
        sink.close()
    finally:
        stop_server(server, grace=0.5)


# -------------------------------------------------------------- idempotency
def test_idempotency_key_reused_with_another_spec_is_already_exists(
    port: int, manager: JobManager
):
    """The same key and spec return the first job; another spec is ALREADY_EXISTS naming it.

    Neither answer needs Ray: the key is looked up before anything is scheduled.
    """
    from zerotrain.service.convert import spec_to_proto
    from zerotrain.service.model import JobRecord

    first = api_spec("keyed")
    now = time.time()
    manager.store.create_job(
        JobRecord(
            job_id="j-keyed", owner="alice", spec=first, state=JobState.RUNNING,
            state_reason="seeded", created_at=now, updated_at=now, started_at=now,
            finished_at=None, attempt=1, latest_metrics=None, checkpoint=None,
            idempotency_key="k-1", ray_job_id="j-keyed",
        )
    )  # fmt: skip
    s = stub(port)
    before = _snapshot(manager.store)
    same = s.SubmitJob(
        pb.SubmitJobRequest(spec=spec_to_proto(first), idempotency_key="k-1"),
        metadata=bearer("alice"),
    )
    assert same.job_id == "j-keyed"
    other = spec_to_proto(api_spec("keyed", training={"max_steps": 5}))
    with pytest.raises(grpc.RpcError) as info:
        s.SubmitJob(pb.SubmitJobRequest(spec=other, idempotency_key="k-1"), metadata=bearer("alice"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "j-keyed" in info.value.details() and "idempotency_key" in info.value.details()
    assert _snapshot(manager.store) == before
