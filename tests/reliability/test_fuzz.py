"""Property-based fuzzing of every rpc and of ``trainctl submit -f``.

One real server (real SQLite store, real job manager, real gRPC on port 0)
over the suite's real local Ray head. Accepted jobs are real Ray jobs whose
command is ``true`` (they end at once: no training), so fuzzed specs never
start workers. Properties, for every generated request:

* the reply is OK or one of the rpc's documented error statuses (never
  INTERNAL, UNKNOWN or a hang), an INVALID_ARGUMENT names the field;
* the server stays healthy (``grpc.health.v1`` reports SERVING);
* the store holds exactly the seeded jobs plus the accepted submissions, and
  a repeated idempotency key never creates a second job.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from zerotrain.service import cli, convert
from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.errors import SpecError
from zerotrain.service.model import TERMINAL_STATES, JobState
from zerotrain.service.spec import JobSpec

from .support import (
    Served,
    bearer,
    health_status,
    seed_job,
    serve_manager,
    store_ids,
)

pytestmark = pytest.mark.ray

FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
SERVING = 1
RPC_TIMEOUT_S = 15
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

SUBMIT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,  # a bad field
    grpc.StatusCode.FAILED_PRECONDITION,  # the cluster can never run it
    grpc.StatusCode.PERMISSION_DENIED,  # a custom task while they are disabled
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # an oversized message
    grpc.StatusCode.ALREADY_EXISTS,  # an idempotency key reused with another spec
}
JOB_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,  # cancel of a finished job
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Ledger:
    """What the store must hold: seeded jobs, accepted submits, idempotency keys."""

    def __init__(self) -> None:
        self.expected: set[str] = set()
        self.by_key: dict[str, tuple[str, dict]] = {}  # key -> (job id, its spec)
        self.statuses: dict[str, dict[str, int]] = {}
        self.examples = 0

    def saw(self, rpc: str, code: grpc.StatusCode) -> None:
        self.examples += 1
        counts = self.statuses.setdefault(rpc, {})
        counts[code.name] = counts.get(code.name, 0) + 1


@pytest.fixture(scope="module")
def fuzz_server(
    ray_head: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, Ledger]]:
    data_dir = tmp_path_factory.mktemp("fuzz")
    with serve_manager(data_dir, ray_head) as served:
        ledger = Ledger()
        spec = JobSpec.from_dict({"name": "seed", "task": "regression"})
        for job_id, owner, state in (
            ("j-alice-done", "alice", JobState.SUCCEEDED),
            ("j-bob-done", "bob", JobState.FAILED),
            ("j-alice-cancelled", "alice", JobState.CANCELLED),
        ):
            seed_job(served.manager.store, job_id, owner, spec, state)
            ledger.expected.add(job_id)
        yield served, ledger
        # The final property: exactly the accepted jobs, nothing half-written.
        assert store_ids(served.manager.store) == ledger.expected
        for rpc, counts in sorted(ledger.statuses.items()):
            print(f"fuzz {rpc}: {counts}")


def _call(method: Any, request: Any, who: str = "alice") -> tuple[grpc.StatusCode, Any, str]:
    try:
        reply = method(request, metadata=bearer(who), timeout=RPC_TIMEOUT_S)
        if isinstance(reply, Iterator):
            reply = list(reply)
    except grpc.RpcError as exc:
        return exc.code(), None, exc.details() or ""
    return grpc.StatusCode.OK, reply, ""


def _after(served: Served, rpc: str, code: grpc.StatusCode, details: str, allowed: set) -> None:
    assert code in allowed, f"{rpc}: status {code.name} is not documented ({details[:300]})"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert ": " in details, f"{rpc}: INVALID_ARGUMENT must name the field: {details[:300]}"
    assert health_status(served.port) == SERVING


# ------------------------------------------------------------------ strategies
def _texts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(["", " ", "../../etc/passwd", "a" * 129, "\x00", "os:system", "ï¿½\u202e"]),
        st.integers(1000, 200_000).map(lambda n: "é" * n),  # enormous (still under 1 MiB)
    )


DOUBLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300, math.nan, math.inf, -math.inf, 0.5, 1.0]),
)
INTS32 = st.one_of(st.integers(*INT32), st.sampled_from([0, -1, 1, 2, INT32[1]]))
INTS64 = st.one_of(st.integers(*INT64), st.sampled_from([0, -1, 1, 3, INT64[1]]))
ENUMS = st.one_of(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1))
STRUCT_VALUES = st.one_of(
    st.none(), st.booleans(), DOUBLES, _texts(), st.lists(st.integers(), max_size=3)
)

# (section, field, strategy): one perturbation sets one field of a valid spec.
_FIELDS: list[tuple[str, str, st.SearchStrategy[Any]]] = [
    ("optimizer", "algorithm", ENUMS),
    ("optimizer", "lr", DOUBLES),
    ("optimizer", "betas", st.lists(DOUBLES, max_size=4)),
    ("optimizer", "eps", DOUBLES),
    ("optimizer", "weight_decay", DOUBLES),
    ("optimizer", "maximize", st.booleans()),
    ("optimizer", "foreach", st.booleans()),
    ("optimizer", "momentum_decay", DOUBLES),
    ("optimizer", "decoupled_weight_decay", st.booleans()),
    ("sharding", "engine", ENUMS),
    ("sharding", "stage", INTS32),
    ("sharding", "grad_sync", ENUMS),
    ("sharding", "bucket_mb", DOUBLES),
    ("sharding", "overlap", st.booleans()),
    ("scaling", "num_workers", INTS32),
    ("scaling", "use_gpu", st.booleans()),
    ("scaling", "cpus_per_worker", DOUBLES),
    ("scaling", "placement", ENUMS),
    ("training", "max_steps", INTS64),
    ("training", "batch_size", INTS32),
    ("training", "seed", INTS64),
    ("training", "grad_accum_steps", INTS32),
    ("training", "clip_grad_norm", DOUBLES),
    ("training", "precision", ENUMS),
    ("training", "checkpoint_every", INTS64),
    ("training", "max_failures", INTS32),
    ("training", "metrics_every", INTS64),
    ("", "name", _texts()),
    ("", "task", st.one_of(st.sampled_from(["digits", "regression", "charlm", "nope"]), _texts())),
    ("", "labels", st.dictionaries(_texts(), _texts(), max_size=4)),
    ("", "task_args", st.dictionaries(st.text(max_size=70), STRUCT_VALUES, max_size=4)),
]
PERTURBATION = st.sampled_from(range(len(_FIELDS))).flatmap(
    lambda i: st.tuples(st.just(i), _FIELDS[i][2])
)


def _build_spec(perturbations: list[tuple[int, Any]]) -> pb.JobSpec:
    msg = pb.JobSpec(name="fuzz", task="regression")
    msg.scaling.num_workers = 1
    msg.scaling.cpus_per_worker = 0.5
    msg.training.max_steps = 2
    for index, value in perturbations:
        section, name, _ = _FIELDS[index]
        target = getattr(msg, section) if section else msg
        if name == "labels":
            target.labels.clear()
            target.labels.update(value)
        elif name == "task_args":
            target.task_args.Clear()
            target.task_args.update(value)
        elif name == "betas":
            del target.betas[:]
            target.betas.extend(value)
        else:
            setattr(target, name, value)
    return msg


SPECS = st.lists(PERTURBATION, max_size=3).map(_build_spec)
KEYS = st.one_of(st.just(""), st.sampled_from(["k1", "k2", "k3"]), _texts())


# ----------------------------------------------------------------------- rpcs
@settings(FUZZ, max_examples=40)
@given(spec=SPECS, key=KEYS)
def test_submit_job_fuzz(fuzz_server: tuple[Served, Ledger], spec: pb.JobSpec, key: str) -> None:
    served, ledger = fuzz_server
    before = store_ids(served.manager.store)
    code, job, details = _call(
        served.stub().SubmitJob, pb.SubmitJobRequest(spec=spec, idempotency_key=key)
    )
    ledger.saw("SubmitJob", code)
    _after(served, "SubmitJob", code, details, SUBMIT_CODES)
    after = store_ids(served.manager.store)
    if code == grpc.StatusCode.ALREADY_EXISTS:  # only for a known key with another spec
        first_id, first_spec = ledger.by_key[key]
        assert first_id in details and convert.spec_from_proto(spec).to_dict() != first_spec
    if code != grpc.StatusCode.OK:
        assert after == before, f"a refused submit ({code.name}) changed the store"
        return
    assert job.owner == "alice" and job.job_id in after
    if key and key in ledger.by_key:
        assert job.job_id == ledger.by_key[key][0], "a repeated idempotency key made a second job"
        assert convert.spec_from_proto(job.spec).to_dict() == ledger.by_key[key][1]
        assert after == before
    else:
        assert after == before | {job.job_id}
    if key:
        ledger.by_key[key] = (job.job_id, convert.spec_from_proto(job.spec).to_dict())
    ledger.expected.add(job.job_id)


def test_submit_job_oversized(fuzz_server: tuple[Served, Ledger]) -> None:
    served, ledger = fuzz_server
    before = store_ids(served.manager.store)
    for spec in (
        pb.JobSpec(name="x" * (2 << 20), task="regression"),
        pb.JobSpec(name="big", task="regression", labels={f"k{i}": "v" * 60 for i in range(30_000)}),
    ):
        code, _, details = _call(served.stub().SubmitJob, pb.SubmitJobRequest(spec=spec))
        ledger.saw("SubmitJob", code)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert health_status(served.port) == SERVING
    # Under the message limit but over the spec's: every field named, nothing stored.
    args = struct_pb2.Struct()
    args.update({"corpus": "é" * 300_000})
    code, _, details = _call(
        served.stub().SubmitJob,
        pb.SubmitJobRequest(spec=pb.JobSpec(name="n" * 5000, task="charlm", task_args=args)),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in details and "task_args.corpus" in details
    assert store_ids(served.manager.store) == before


JOB_IDS = st.one_of(
    st.sampled_from(["j-alice-done", "j-bob-done", "j-alice-cancelled", "j-missing", ""]),
    _texts(),
)


@FUZZ
@given(job_id=JOB_IDS, who=st.sampled_from(["alice", "bob", "root"]))
def test_get_cancel_logs_fuzz(fuzz_server: tuple[Served, Ledger], job_id: str, who: str) -> None:
    served, ledger = fuzz_server
    stub = served.stub()
    before = store_ids(served.manager.store)
    for rpc, method, request in (
        ("GetJob", stub.GetJob, pb.GetJobRequest(job_id=job_id)),
        ("CancelJob", stub.CancelJob, pb.CancelJobRequest(job_id=job_id)),
        ("StreamLogs", stub.StreamLogs, pb.StreamLogsRequest(job_id=job_id, follow=False)),
    ):
        code, _, details = _call(method, request, who)
        ledger.saw(rpc, code)
        _after(served, rpc, code, details, JOB_CODES)
        if job_id not in before:
            assert code != grpc.StatusCode.OK, f"{rpc} of unknown id {job_id[:40]!r} succeeded"
    assert store_ids(served.manager.store) == before


@FUZZ
@given(job_id=JOB_IDS, from_sequence=INTS64, who=st.sampled_from(["alice", "bob"]))
def test_watch_job_fuzz(
    fuzz_server: tuple[Served, Ledger], job_id: str, from_sequence: int, who: str
) -> None:
    served, ledger = fuzz_server
    code, events, details = _call(
        served.stub().WatchJob, pb.WatchJobRequest(job_id=job_id, from_sequence=from_sequence), who
    )
    ledger.saw("WatchJob", code)
    _after(served, "WatchJob", code, details, JOB_CODES)
    if code == grpc.StatusCode.OK:  # only seeded, finished jobs: the stream ends
        sequences = [e.sequence for e in events]
        assert sequences == sorted(sequences) and all(s > from_sequence for s in sequences)
    if from_sequence < 0 and code != grpc.StatusCode.OK:
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip


def _page_token(after: int) -> str:
    """A page token in the store's own format, for any position."""
    raw = json.dumps({"v": 1, "after": after}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@FUZZ
@given(
    state=ENUMS,
    labels=st.dictionaries(_texts(), _texts(), max_size=3),
    page_size=INTS32,
    page_token=st.one_of(
        st.just(""), _texts(), st.binary(max_size=40).map(lambda b: b.hex()),
        # Well-formed tokens whose position SQLite cannot hold (was INTERNAL: OverflowError).
        st.one_of(st.integers(2**63, 2**200), st.integers(-(2**200), -1)).map(_page_token),
    ),
    owner=st.one_of(st.just(""), st.sampled_from(["alice", "bob"]), _texts()),
    who=st.sampled_from(["alice", "root"]),
)
def test_list_jobs_fuzz(
    fuzz_server: tuple[Served, Ledger],
    state: int,
    labels: dict[str, str],
    page_size: int,
    page_token: str,
    owner: str,
    who: str,
) -> None:
    served, ledger = fuzz_server
    request = pb.ListJobsRequest(
        state=state, labels=labels, page_size=page_size, page_token=page_token, owner=owner
    )
    code, reply, details = _call(served.stub().ListJobs, request, who)
    ledger.saw("ListJobs", code)
    _after(served, "ListJobs", code, details, JOB_CODES)
    if code == grpc.StatusCode.OK:
        assert len(reply.jobs) <= (page_size or 50)
        if who == "alice":
            assert all(j.owner == "alice" for j in reply.jobs), "a principal saw another's jobs"


RECORD_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "attempt": INTS32,
        "step": INTS64,
        "rank": INTS32,
        "world_size": INTS32,
        "loss": DOUBLES,
        "accuracy": DOUBLES,
        "samples_per_second": DOUBLES,
        "lr": DOUBLES,
        "final": st.booleans(),
        "job_id": JOB_IDS,
        "phase_seconds": st.dictionaries(_texts(), DOUBLES, max_size=3),
        "optimizer": st.dictionaries(_texts(), DOUBLES, max_size=3),
        "extra": st.dictionaries(_texts(), DOUBLES, max_size=3),
        "state_bytes_per_rank": st.lists(INTS64, max_size=4),
        "checkpoint": st.tuples(INTS64, _texts()),
    },
)


@FUZZ
@given(
    job_id=JOB_IDS,
    fields=RECORD_FIELDS,
    token=st.sampled_from(["ingest", "ingest-other", "root", "alice", None]),
)
def test_report_metrics_fuzz(
    fuzz_server: tuple[Served, Ledger], job_id: str, fields: dict[str, Any], token: str | None
) -> None:
    served, ledger = fuzz_server
    record = pb.MetricsRecord()
    for name, value in fields.items():
        if name in ("phase_seconds", "optimizer", "extra"):
            getattr(record, name).update(value)
        elif name == "state_bytes_per_rank":
            record.state_bytes_per_rank.extend(value)
        elif name == "checkpoint":
            record.checkpoint.step, record.checkpoint.path = value
        else:
            setattr(record, name, value)
    if token == "ingest":
        metadata = (("authorization", f"Bearer {served.auth.ingest_token_for(job_id)}"),)
        if job_id.isascii() and job_id.isprintable() and len(job_id) < 1000:  # a legal header
            metadata += (("zerotrain-job-id", job_id),)
    elif token == "ingest-other":
        metadata = (("authorization", f"Bearer {served.auth.ingest_token_for('j-other')}"),
                    ("zerotrain-job-id", "j-other"))  # fmt: skip
    else:
        metadata = bearer(token)
    before = store_ids(served.manager.store)
    try:
        served.stub().ReportMetrics(
            pb.ReportMetricsRequest(job_id=job_id, record=record),
            metadata=metadata,
            timeout=RPC_TIMEOUT_S,
        )
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    ledger.saw("ReportMetrics", code)
    allowed = JOB_CODES | {grpc.StatusCode.UNAUTHENTICATED}
    _after(served, "ReportMetrics", code, details, allowed)
    if token in (None, "alice", "ingest-other"):
        assert code != grpc.StatusCode.OK, "metrics accepted without the job's ingest token"
    assert store_ids(served.manager.store) == before


# ------------------------------------------------------------ malformed messages
METHODS = ("SubmitJob", "GetJob", "ListJobs", "CancelJob", "WatchJob", "StreamLogs",
           "ReportMetrics")  # fmt: skip
DESERIALIZING = "Exception deserializing request!"  # grpc-python's own answer


def _raw_call(served: Served, method: str, payload: bytes, who: str | None) -> tuple:
    """Send ``payload`` as the request of ``method`` byte for byte (no serializer)."""
    with served.channel() as channel:
        path = f"/zerotrain.v1.JobService/{method}"
        streaming = method in ("WatchJob", "StreamLogs")
        call = channel.unary_stream(path) if streaming else channel.unary_unary(path)
        try:
            reply = call(payload, metadata=bearer(who), timeout=RPC_TIMEOUT_S)
            if streaming:
                list(reply)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@FUZZ
@given(
    method=st.sampled_from(METHODS),
    # Wire type 7 does not exist: whatever follows, this is never a valid message.
    payload=st.binary(max_size=300).map(lambda b: b"\x0f" + b),
    who=st.sampled_from(["alice", "root", None]),
)
def test_malformed_protobuf_changes_nothing(
    fuzz_server: tuple[Served, Ledger], method: str, payload: bytes, who: str | None
) -> None:
    """grpc-python answers INTERNAL "Exception deserializing request!" before any handler
    runs (documented in RELIABILITY.md); unauthenticated, the call is refused first."""
    served, ledger = fuzz_server
    before = _store_snapshot(served)
    code, details = _raw_call(served, method, payload, who)
    ledger.saw(f"malformed {method}", code)
    if who is None and method != "ReportMetrics":
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
    else:
        assert (code, details) in (
            (grpc.StatusCode.INTERNAL, DESERIALIZING),
            (grpc.StatusCode.UNAUTHENTICATED, details),  # ReportMetrics without a job token
        ), (code, details)
    assert health_status(served.port) == SERVING
    _assert_store_unchanged(served, before)


def test_task_args_nested_60_deep_changes_nothing(fuzz_server: tuple[Served, Ledger]) -> None:
    """A Struct 60 levels deep is ~180 messages deep: past protobuf's recursion limit.

    protobuf itself will not build such a message, so its bytes are written here
    field by field (every field is length-delimited: wire type 2)."""
    served, ledger = fuzz_server

    def field(number: int, payload: bytes) -> bytes:
        length, size = b"", len(payload)
        while True:  # varint
            byte, size = size & 0x7F, size >> 7
            length += bytes([byte | (0x80 if size else 0)])
            if not size:
                break
        return bytes([number << 3 | 2]) + length + payload

    def request(depth: int) -> bytes:
        struct = b""
        for _ in range(depth):  # Struct{fields: {"a": Value{struct_value: struct}}}
            struct = field(1, field(1, b"a") + field(2, field(5, struct)))
        spec = field(1, b"deep") + field(2, b"regression") + field(3, struct)  # JobSpec
        return field(1, spec)  # SubmitJobRequest.spec

    shallow = pb.SubmitJobRequest.FromString(request(3))  # the encoding itself is right
    assert shallow.spec.task_args.fields["a"].struct_value.fields["a"].HasField("struct_value")
    payload = request(60)
    before = _store_snapshot(served)
    for who in ("alice", None):
        code, details = _raw_call(served, "SubmitJob", payload, who)
        ledger.saw("SubmitJob (60-deep task_args)", code)
        expected = grpc.StatusCode.INTERNAL if who else grpc.StatusCode.UNAUTHENTICATED
        assert code == expected, (code, details)
        if who:
            assert details == DESERIALIZING
        assert health_status(served.port) == SERVING
    _assert_store_unchanged(served, before)


def _store_snapshot(served: Served) -> tuple[set[str], dict[str, int]]:
    """Every job id, and every finished job's event count (the reconciler moves the rest)."""
    store = served.manager.store
    ids = store_ids(store)
    finished = [i for i in ids if store.get_job(i).state in TERMINAL_STATES]
    return ids, {i: store.last_sequence(i) for i in finished}


def _assert_store_unchanged(served: Served, before: tuple[set[str], dict[str, int]]) -> None:
    """No job added or removed, and no event added to a job that had already finished.

    A job accepted earlier in the run may finish between the two snapshots (the
    reconciler moves it): only the jobs finished *before* the call are compared."""
    ids, finished = before
    ids_now, finished_now = _store_snapshot(served)
    assert ids_now == ids
    assert {i: finished_now.get(i) for i in finished} == finished


# ------------------------------------------------------------------------ CLI
_VALID_YAML = "name: y\ntask: regression\ntraining:\n  max_steps: 2\n"
MALFORMED = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.integers(1, len(_VALID_YAML) - 1).map(lambda n: _VALID_YAML[:n]),
    st.sampled_from(
        [
            "name: [unclosed\n",
            "name: y\n\ttask: digits\n",
            "- just\n- a list\n",
            "name: y\ntask: digits\noptimizer: {lr: -1, betas: [2, 2]}\nbogus: 1\n",
            "name: y\ntask: digits\ntraining: {max_steps: .nan}\n",
            "a: &a [*a]\n",
            "!!python/object/apply:os.system ['echo pwned']\n",
            "name: " + "x" * 100_000 + "\n",
        ]
    ),
)


def _spec_is_valid(text: str) -> bool:
    try:
        JobSpec.from_dict(yaml.safe_load(text))
    except (SpecError, yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError):
        return False
    return True


@settings(FUZZ, max_examples=30)
@given(text=MALFORMED)
def test_cli_submit_malformed_yaml(
    text: str, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    assume(not _spec_is_valid(text))
    path = tmp_path_factory.mktemp("yaml") / "bad.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    capsys.readouterr()
    # Port 9 (discard) on loopback: nothing listens; a spec that got as far as the network
    # would fail with a connection error and another exit code.
    code = cli.main(["--address", "127.0.0.1:9", "submit", "-f", str(path)])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code} for {text[:80]!r}: {err[-300:]}"
    assert "error" in err and len(err) < 20_000
    assert "Traceback" not in err


def test_cli_submit_bad_yaml_exit_code(tmp_path: Path) -> None:
    """The installed ``trainctl`` console script itself: exit 2 and a field-named error."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: y\ntask: digits\noptimizer: {lr: -1}\ntraining: {max_steps: 0}\n")
    trainctl = Path(sys.executable).with_name("trainctl")
    proc = subprocess.run(
        [str(trainctl), "--address", "127.0.0.1:9", "submit", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "optimizer.lr: must be > 0" in proc.stderr
    assert "training.max_steps" in proc.stderr
    assert "Traceback" not in proc.stderr
