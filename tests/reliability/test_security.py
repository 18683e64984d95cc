"""Security: every rpc without a token, with a wrong one and across principals;
TLS and mutual TLS with wrong certificates; no token in logs or error messages;
nothing in a spec can point the service outside its data dir.

A real server on an ephemeral port over a real SQLite store. No request here
reaches Ray (jobs are seeded straight into the store), so no Ray is started.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from zerotrain.service.auth import TokenFileError, load_tokens
from zerotrain.service.model import JobState
from zerotrain.service.ray_jobs import runtime_entrypoint
from zerotrain.service.runtime.trainer import build_trainer
from zerotrain.service.server import TlsConfig
from zerotrain.service.spec import JobSpec, load_spec, save_spec

from .support import (
    TOKENS,
    LogCapture,
    Served,
    bearer,
    health_status,
    make_pki,
    seed_job,
    self_signed_pair,
    serve_manager,
    store_ids,
)

SERVING = 1
WRONG_TOKEN = "wrong-token-that-looks-real-0123456789"
SPEC = JobSpec.from_dict({"name": "sec", "task": "regression"})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve_manager(tmp_path, None) as s:
        seed_job(s.manager.store, "j-alice", "alice", SPEC, JobState.RUNNING)
        seed_job(s.manager.store, "j-alice-2", "alice", SPEC, JobState.RUNNING)
        seed_job(s.manager.store, "j-bob", "bob", SPEC, JobState.SUCCEEDED)
        yield s


def _requests(job_id: str) -> list[tuple[str, Any]]:
    record = pb.MetricsRecord(job_id=job_id, step=1, attempt=1, loss=0.5)
    return [
        ("SubmitJob", pb.SubmitJobRequest(spec=pb.JobSpec(name="x", task="regression"))),
        ("GetJob", pb.GetJobRequest(job_id=job_id)),
        ("ListJobs", pb.ListJobsRequest()),
        ("CancelJob", pb.CancelJobRequest(job_id=job_id)),
        ("WatchJob", pb.WatchJobRequest(job_id=job_id)),
        ("StreamLogs", pb.StreamLogsRequest(job_id=job_id)),
        ("ReportMetrics", pb.ReportMetricsRequest(job_id=job_id, record=record)),
    ]


def _code(stub: pb_grpc.JobServiceStub, rpc: str, request: Any, metadata: Any) -> tuple:
    try:
        reply = getattr(stub, rpc)(request, metadata=metadata, timeout=10)
        if rpc in ("WatchJob", "StreamLogs"):
            reply = next(iter(reply), None)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _snapshot(served: Served) -> list[tuple]:
    store = served.manager.store
    jobs, _ = store.list_jobs(page_size=1000)
    return sorted((j.job_id, j.state, j.attempt, store.last_sequence(j.job_id)) for j in jobs)


# ----------------------------------------------------------------------- tokens
@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-token"),
        pytest.param(bearer(WRONG_TOKEN), id="wrong-token"),
        pytest.param((("authorization", f"Basic {TOKENS['alice']}"),), id="wrong-scheme"),
        pytest.param((("authorization", "Bearer "),), id="empty-bearer"),
        pytest.param(bearer(TOKENS["alice"][:-1]), id="token-prefix"),
        pytest.param(bearer(TOKENS["alice"] + "x"), id="token-extended"),
    ],
)
def test_every_rpc_refuses_unauthenticated_calls(served: Served, metadata: Any) -> None:
    stub = served.stub()
    before = _snapshot(served)
    for rpc, request in _requests("j-alice"):
        code, details = _code(stub, rpc, request, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, f"{rpc}: {code.name} {details}"
        assert TOKENS["alice"] not in details and WRONG_TOKEN not in details
    assert _snapshot(served) == before, "a refused call changed the store"
    assert health_status(served.port) == SERVING  # health stays open without a token


def test_principals_see_and_cancel_only_their_own_jobs(served: Served) -> None:
    stub = served.stub()
    before = _snapshot(served)
    # bob on alice's job: every job rpc refused, nothing changes.
    for rpc, request in _requests("j-alice"):
        if rpc in ("SubmitJob", "ListJobs"):
            continue
        code, details = _code(stub, rpc, request, bearer("bob"))
        expected = (
            grpc.StatusCode.UNAUTHENTICATED  # a user token is not the job's ingest token
            if rpc == "ReportMetrics"
            else grpc.StatusCode.PERMISSION_DENIED
        )
        assert code == expected, f"{rpc}: {code.name} {details}"
    assert _snapshot(served) == before
    # Listing: bob sees only bob's jobs, and may not ask for alice's.
    page = stub.ListJobs(pb.ListJobsRequest(page_size=100), metadata=bearer("bob"))
    assert {j.job_id for j in page.jobs} == {"j-bob"}
    code, _ = _code(stub, "ListJobs", pb.ListJobsRequest(owner="alice"), bearer("bob"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # An unknown id is NOT_FOUND for everyone (same answer whoever asks).
    for who in ("alice", "bob", "root"):
        code, _ = _code(stub, "GetJob", pb.GetJobRequest(job_id="j-nobody"), bearer(who))
        assert code == grpc.StatusCode.NOT_FOUND
    # The ingest token of one job cannot report for another.
    token = served.auth.ingest_token_for("j-alice-2")
    for claimed in ("j-alice", "j-alice-2"):  # the job named in the headers, or not
        metadata = (("authorization", f"Bearer {token}"), ("zerotrain-job-id", claimed))
        code, _ = _code(stub, *_requests("j-alice")[-1], metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    metadata = (("authorization", f"Bearer {token}"), ("zerotrain-job-id", "j-alice-2"))
    code, _ = _code(stub, *_requests("j-alice-2")[-1], metadata)
    assert code == grpc.StatusCode.OK
    # The owner and an admin may; the admin sees everyone's jobs.
    assert stub.GetJob(pb.GetJobRequest(job_id="j-alice"), metadata=bearer("alice")).owner == "alice"
    page = stub.ListJobs(pb.ListJobsRequest(page_size=100), metadata=bearer("root"))
    assert {j.job_id for j in page.jobs} == {"j-alice", "j-alice-2", "j-bob"}
    job = stub.CancelJob(pb.CancelJobRequest(job_id="j-alice"), metadata=bearer("root"))
    assert job.state == pb.JOB_STATE_CANCELLED  # never handed to Ray: cancelled at once


# -------------------------------------------------------------------------- TLS
def _tls_channel_works(port: int, credentials: grpc.ChannelCredentials) -> bool:
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    with channel:
        try:
            pb_grpc.JobServiceStub(channel).GetJob(
                pb.GetJobRequest(job_id="j-alice"), metadata=bearer("alice"), timeout=5
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # refused at the handshake
            return False
    return True


def test_tls_refuses_a_server_certificate_from_another_ca(tmp_path: Path) -> None:
    pki, other = make_pki("server-ca"), make_pki("some-other-ca")
    tls = TlsConfig(pki.server_cert, pki.server_key)
    with serve_manager(tmp_path, None, tls=tls) as s:
        seed_job(s.manager.store, "j-alice", "alice", SPEC, JobState.RUNNING)
        assert _tls_channel_works(s.port, grpc.ssl_channel_credentials(pki.ca))
        assert not _tls_channel_works(s.port, grpc.ssl_channel_credentials(other.ca))
        intruder_cert, _ = self_signed_pair()
        assert not _tls_channel_works(s.port, grpc.ssl_channel_credentials(intruder_cert))
        # Plaintext to a TLS port gets nothing either.
        with pytest.raises(grpc.RpcError) as err:
            health_status(s.port)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_missing_foreign_and_expired_client_certificates(
    tmp_path: Path,
) -> None:
    pki = make_pki("mtls-ca")
    expired = make_pki("mtls-ca", client_valid_days=-1)  # same CA name, other key: foreign
    tls = TlsConfig(pki.server_cert, pki.server_key, client_ca=pki.ca)
    with serve_manager(tmp_path, None, tls=tls) as s:
        seed_job(s.manager.store, "j-alice", "alice", SPEC, JobState.RUNNING)
        good = grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)
        assert _tls_channel_works(s.port, good)
        no_cert = grpc.ssl_channel_credentials(pki.ca)
        assert not _tls_channel_works(s.port, no_cert)
        foreign = grpc.ssl_channel_credentials(pki.ca, expired.client_key, expired.client_cert)
        assert not _tls_channel_works(s.port, foreign)
        cert, key = self_signed_pair("client")
        assert not _tls_channel_works(s.port, grpc.ssl_channel_credentials(pki.ca, key, cert))

    # A client certificate signed by the right CA but expired.
    pki2 = make_pki("mtls-ca-2", client_valid_days=-1)
    tls2 = TlsConfig(pki2.server_cert, pki2.server_key, client_ca=pki2.ca)
    with serve_manager(tmp_path / "expired", None, tls=tls2) as s:
        creds = grpc.ssl_channel_credentials(pki2.ca, pki2.client_key, pki2.client_cert)
        assert not _tls_channel_works(s.port, creds)


# ------------------------------------------------------------------ no token leaks
def test_tokens_never_appear_in_logs_or_error_messages(tmp_path: Path) -> None:
    capture = LogCapture()
    details: list[str] = []
    with capture.installed(), serve_manager(tmp_path, None) as s:
        seed_job(s.manager.store, "j-alice", "alice", SPEC, JobState.RUNNING)
        stub = s.stub()
        ingest = s.auth.ingest_token_for("j-alice")
        for metadata in (bearer("alice"), bearer("bob"), bearer(WRONG_TOKEN), bearer("root"),
                         (("authorization", f"Bearer {ingest}"), ("zerotrain-job-id", "j-alice"))):  # fmt: skip
            for rpc, request in _requests("j-alice"):
                _, text = _code(stub, rpc, request, metadata)
                details.append(text)
            # Bad input too: the error quotes the request, never the metadata.
            _, text = _code(
                stub,
                "SubmitJob",
                pb.SubmitJobRequest(spec=pb.JobSpec(name="\x00", task=TOKENS["alice"])),
                metadata,
            )
            details.append(text)
    secrets = [*TOKENS.values(), WRONG_TOKEN, ingest]
    text = capture.text + "\n".join(details)
    assert capture.lines, "the server logged nothing: the capture is not wired"
    for secret in secrets:
        # The one legitimate echo: alice's token sent as a *task name* in a bad spec.
        if secret == TOKENS["alice"]:
            text = text.replace(f"'{secret}'", "")
        assert secret not in text, "a token leaked into a log line or an error message"
        assert secret[:12] not in capture.text


def test_tokens_file_errors_never_quote_tokens(tmp_path: Path) -> None:
    secret = "s3cr3t-token-value-0123456789"
    for text in (
        f"tokens:\n  - token: {secret}\n    principal: [unclosed\n",
        f"tokens:\n  - token: {secret}\n    principal: alice\n    admin: maybe\n",
        f"tokens:\n  - token: {secret}\n    principal: a\n  - token: {secret}\n    principal: b\n",
        f'{{"tokens": [{{"token": "{secret}", "principal": "a", "extra": 1}}]}}',
    ):
        path = tmp_path / ("tokens.json" if text.startswith("{") else "tokens.yaml")
        path.write_text(text)
        with pytest.raises(TokenFileError) as err:
            load_tokens(path)
        assert secret not in str(err.value) and str(path) in str(err.value)


# -------------------------------------------------------------- data-dir escapes
def test_spec_strings_cannot_escape_the_data_dir_or_the_command(
    served: Served, tmp_path: Path
) -> None:
    """No spec field is a path: the run dir is ``<data_dir>/runs/<server job id>``,
    path-like values are refused or stay inert text, and the spec reaches the
    worker command as one quoted argument (no shell injection)."""
    stub = served.stub()
    before = store_ids(served.manager.store)
    refused = [
        pb.JobSpec(name="x", task="../../etc/passwd"),
        pb.JobSpec(name="x", task="os:system"),  # custom code: disabled on this server
        pb.JobSpec(name="x", task="charlm", task_args=_struct({"corpus": "../../../etc"})),
        pb.JobSpec(name="x", task="regression", task_args=_struct({"../x": 1})),
        pb.JobSpec(name="x", task="regression", labels={"../../k": "v"}),
        pb.JobSpec(name="x", task="regression", labels={"k": "../../v"}),
        pb.JobSpec(name="bad\x00name", task="regression"),
    ]
    for spec in refused:
        code, details = _code(stub, "SubmitJob", pb.SubmitJobRequest(spec=spec), bearer("alice"))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), (
            spec, details,
        )  # fmt: skip
    for job_id in ("../../jobs.db", "/etc/passwd", "j-alice/../j-bob", "..", "."):
        code, _ = _code(stub, "GetJob", pb.GetJobRequest(job_id=job_id), bearer("root"))
        assert code == grpc.StatusCode.NOT_FOUND
    assert store_ids(served.manager.store) == before

    # A name full of shell and path syntax is accepted as inert text ...
    hostile = "$(touch /tmp/pwned); `id` ../../../../tmp/x '\"; rm -rf /"
    spec = JobSpec.from_dict({"name": hostile[:128], "task": "regression"})
    storage = served.manager.data_dir / "runs"
    spec_path = save_spec(spec, storage / "j-0123456789abcdef" / "spec.json")
    command = shlex.split(runtime_entrypoint("j-0123456789abcdef", spec_path, storage))
    # ... and reaches the worker in its spec.json, named by one argument beside the
    # server's storage: never on the command line (where ps and Ray's logs show it).
    # It runs in its run directory, never with the checkout's root importable.
    assert command[:4] == ["cd", str(spec_path.parent.resolve()), "&&", "exec"]
    assert command[4:8] == [sys.executable, "-P", "-m", "zerotrain.service.runtime"]
    assert Path(command[command.index("--spec") + 1]) == spec_path
    assert load_spec(spec_path) == spec
    assert "--spec-json" not in command and not any(hostile[:20] in part for part in command)
    assert Path(command[command.index("--storage") + 1]) == storage
    assert command.count("--storage") == 1 and command.count("--job-id") == 1
    # The run directory is named by the job id, which must be a plain name.
    for job_id in ("../escape", "a/b", "/abs", "..", ""):
        with pytest.raises(ValueError, match="job id must match"):
            build_trainer(spec, job_id=job_id, storage=storage)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s
