"""Protobuf <-> domain converters: the only place protobuf types meet domain types.

The servicer turns requests into domain values with the ``*_from_proto``
functions and builds replies with the ``*_to_proto`` ones; the client and the
ingest sink use the same functions in the other direction. Nothing here
validates ranges: :meth:`JobSpec.from_dict` does, so a spec that arrives over
gRPC gets exactly the checks (and messages) of one loaded from YAML; likewise
:meth:`MetricsRecord.from_dict` for a reported metrics record.

Mapping rules:

* proto3 ``optional`` scalars and enum value 0 (``*_UNSPECIFIED``) that are
  unset are omitted from the spec dict, so the spec's defaults apply;
* an enum number the schema does not know is a :class:`SpecError` naming the
  field (proto3 enums are open, so a newer client can send one);
* ``task_args`` travels as a ``google.protobuf.Struct``, whose numbers are
  doubles: integral values become ``int`` again on the way in;
* times are epoch seconds (``float``) in the domain, ``Timestamp`` on the wire;
* the API's JSON form (``trainctl --json``) lives in :mod:`zerotrain.service.convert_json`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.errors import SpecError
from zerotrain.service.model import CheckpointInfo, JobEvent, JobRecord, JobState
from zerotrain.service.records import MetricsRecord
from zerotrain.service.spec import JobSpec
from zerotrain.service.spec_rules import is_number

__all__ = [
    "checkpoint_from_proto",
    "checkpoint_to_proto",
    "event_from_proto",
    "event_to_proto",
    "integral_to_int",
    "job_from_proto",
    "job_to_proto",
    "metrics_from_proto",
    "metrics_record_from_proto",
    "metrics_to_proto",
    "spec_dict_from_proto",
    "spec_from_proto",
    "spec_to_proto",
    "state_from_proto",
    "state_name",
    "state_to_proto",
]

# Spec enum fields: (section, field) -> (proto enum, {proto number: spec value}).
_SPEC_ENUMS: dict[tuple[str, str], tuple[Any, dict[int, str]]] = {
    ("optimizer", "algorithm"): (
        pb.Algorithm,
        {pb.ALGORITHM_ADAMAX: "adamax", pb.ALGORITHM_NADAM: "nadam"},
    ),
    ("sharding", "engine"): (
        pb.Engine,
        {pb.ENGINE_NATIVE: "native", pb.ENGINE_DEEPSPEED: "deepspeed"},
    ),
    ("sharding", "grad_sync"): (
        pb.GradSync,
        {
            pb.GRAD_SYNC_ALL_REDUCE: "all_reduce",
            pb.GRAD_SYNC_REDUCE_SCATTER: "reduce_scatter",
            pb.GRAD_SYNC_AUTO: "auto",
        },
    ),
    ("scaling", "placement"): (
        pb.Placement,
        {pb.PLACEMENT_PACK: "PACK", pb.PLACEMENT_SPREAD: "SPREAD"},
    ),
    ("training", "precision"): (
        pb.Precision,
        {pb.PRECISION_FP32: "fp32", pb.PRECISION_BF16: "bf16"},
    ),
}
_SECTIONS = ("optimizer", "sharding", "scaling", "training")

_STATES: dict[JobState, pb.JobState] = {
    JobState.PENDING: pb.JOB_STATE_PENDING,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLING: pb.JOB_STATE_CANCELLING,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
_STATES_BY_NUMBER: dict[int, JobState] = {int(n): state for state, n in _STATES.items()}

# Metrics-record keys with a typed field of their own.
_RECORD_INTS = ("attempt", "step", "rank", "world_size")
_RECORD_OPTIONAL_FLOATS = ("loss", "accuracy", "samples_per_second", "lr")
_RECORD_KEYS = frozenset(
    {
        "job_id", "time", "phase_seconds", "optimizer", "state_bytes_per_rank", "final",
        "checkpoint", *_RECORD_INTS, *_RECORD_OPTIONAL_FLOATS,
    }
)  # fmt: skip


# ----------------------------------------------------------------------------- time
def _to_timestamp(seconds: float, field: str) -> timestamp_pb2.Timestamp:
    if (
        not isinstance(seconds, int | float)
        or isinstance(seconds, bool)
        or not math.isfinite(seconds)
    ):
        raise ValueError(f"{field}: must be a finite number of epoch seconds, got {seconds!r}")
    # Whole seconds and the fraction apart: ``seconds * 1e9`` would round to 256 ns at
    # today's epoch, and the float that comes back would not be the one that went in.
    whole = math.floor(seconds)
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(whole * 1_000_000_000 + round((seconds - whole) * 1e9))
    return ts


def _from_timestamp(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


# ----------------------------------------------------------------------------- spec
def spec_dict_from_proto(msg: pb.JobSpec) -> dict[str, Any]:
    """The plain spec dict a ``JobSpec`` message describes (unset fields omitted).

    Raises :class:`SpecError` for enum numbers the schema does not define.
    """
    data, errors = _spec_dict(msg)
    if errors:
        raise SpecError(errors)
    return data


def spec_from_proto(msg: pb.JobSpec) -> JobSpec:
    """Validate a ``JobSpec`` message into the domain spec.

    Raises :class:`SpecError` listing every bad field (unknown enum numbers and
    every rule of :meth:`JobSpec.from_dict`) at once.
    """
    data, enum_errors = _spec_dict(msg)
    try:
        spec = JobSpec.from_dict(data)
    except SpecError as exc:
        raise SpecError(enum_errors + exc.errors) from None
    if enum_errors:
        raise SpecError(enum_errors)
    return spec


def _spec_dict(msg: pb.JobSpec) -> tuple[dict[str, Any], list[str]]:
    """(spec dict, errors): unknown enum numbers are reported and left out."""
    errors: list[str] = []
    data: dict[str, Any] = {"name": msg.name, "task": msg.task}
    if msg.HasField("task_args"):
        data["task_args"] = integral_to_int(json_format.MessageToDict(msg.task_args))
    if msg.labels:
        data["labels"] = dict(msg.labels)
    for section in _SECTIONS:
        if not msg.HasField(section):
            continue
        sub = getattr(msg, section)
        values: dict[str, Any] = {}
        for fd in sub.DESCRIPTOR.fields:
            name = fd.name
            if (section, name) in _SPEC_ENUMS:
                number = getattr(sub, name)
                if number == 0:
                    continue
                enum_type, mapping = _SPEC_ENUMS[(section, name)]
                if number in mapping:
                    values[name] = mapping[number]
                else:
                    known = ", ".join(enum_type.Name(n) for n in mapping)
                    errors.append(
                        f"{section}.{name}: unknown enum value {number}; expected one of {known}"
                    )
            elif fd.is_repeated:
                if len(getattr(sub, name)):
                    values[name] = list(getattr(sub, name))
            elif sub.HasField(name):  # every other spec scalar is proto3 `optional`
                values[name] = getattr(sub, name)
        data[section] = values
    return data, errors


def spec_to_proto(spec: JobSpec) -> pb.JobSpec:
    """The ``JobSpec`` message of a domain spec (every field set explicitly)."""
    data = spec.to_dict()
    msg = pb.JobSpec(name=data["name"], task=data["task"], labels=data["labels"])
    if data["task_args"]:
        msg.task_args.update(data["task_args"])
    for section in _SECTIONS:
        sub = getattr(msg, section)
        sub.SetInParent()
        for name, value in data[section].items():
            if value is None:
                continue  # e.g. foreach / clip_grad_norm left to the default
            if (section, name) in _SPEC_ENUMS:
                _, mapping = _SPEC_ENUMS[(section, name)]
                value = {v: n for n, v in mapping.items()}[value]
            if isinstance(value, list):
                getattr(sub, name).extend(value)
            else:
                setattr(sub, name, value)
    return msg


def integral_to_int(value: Any) -> Any:
    """``value`` with integral floats (a ``Struct``'s numbers are doubles) as ``int``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: integral_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_to_int(v) for v in value]
    return value


# ---------------------------------------------------------------------------- state
def state_to_proto(state: JobState) -> pb.JobState:
    """The ``JobState`` enum number of a domain state."""
    return _STATES[JobState(state)]


def state_from_proto(number: int) -> JobState | None:
    """The domain state of an enum number; ``None`` for ``JOB_STATE_UNSPECIFIED``.

    Raises ``ValueError`` naming the field for a number the schema does not define.
    """
    if number == pb.JOB_STATE_UNSPECIFIED:
        return None
    try:
        return _STATES_BY_NUMBER[number]
    except KeyError:
        raise ValueError(f"state: unknown enum value {number}") from None


def state_name(number: int) -> str:
    """Short display name of a ``JobState`` number (``RUNNING``)."""
    state = _STATES_BY_NUMBER.get(number)
    return state.value if state is not None else f"UNKNOWN({number})"


# -------------------------------------------------------------------------- metrics
def checkpoint_to_proto(info: CheckpointInfo | Mapping[str, Any]) -> pb.Checkpoint:
    """A ``Checkpoint`` message from a :class:`CheckpointInfo` or a ``{step, path, time}`` dict."""
    time: float | None
    if isinstance(info, CheckpointInfo):
        step, path, time = info.step, info.path, info.time
    else:
        step, path, time = info.get("step", 0), info.get("path", ""), info.get("time")
    msg = pb.Checkpoint(step=int(step), path=str(path))
    if time is not None:
        msg.time.CopyFrom(_to_timestamp(time, "checkpoint.time"))
    return msg


def checkpoint_from_proto(msg: pb.Checkpoint) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of a ``Checkpoint`` message (an unset time reads as 0)."""
    return CheckpointInfo(step=msg.step, path=msg.path, time=_from_timestamp(msg.time))


def metrics_to_proto(record: Mapping[str, Any]) -> pb.MetricsRecord:
    """A ``MetricsRecord`` message from a metrics-record dict (docs/ARCHITECTURE.md).

    Unknown numeric top-level keys go to ``extra``; unknown non-numeric keys are
    dropped. Raises ``ValueError`` naming the field for a value of the wrong type.
    """
    msg = pb.MetricsRecord()
    try:
        msg.job_id = str(record.get("job_id", ""))
        for key in _RECORD_INTS:
            if record.get(key) is not None:
                setattr(msg, key, int(record[key]))
        for key in _RECORD_OPTIONAL_FLOATS:
            if record.get(key) is not None:
                setattr(msg, key, float(record[key]))
        if record.get("time") is not None:
            msg.time.CopyFrom(_to_timestamp(record["time"], "time"))
        for key in ("phase_seconds", "optimizer"):
            for name, value in (record.get(key) or {}).items():
                if is_number(value):
                    getattr(msg, key)[str(name)] = float(value)
        msg.state_bytes_per_rank.extend(int(n) for n in record.get("state_bytes_per_rank") or ())
        msg.final = bool(record.get("final", False))
        if isinstance(record.get("checkpoint"), Mapping):
            msg.checkpoint.CopyFrom(checkpoint_to_proto(record["checkpoint"]))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"invalid metrics record: {exc}") from None
    for key, value in record.items():
        if key not in _RECORD_KEYS and is_number(value):
            msg.extra[str(key)] = float(value)
    return msg


def metrics_from_proto(msg: pb.MetricsRecord) -> dict[str, Any]:
    """The metrics-record dict of a ``MetricsRecord`` message (unset optionals omitted)."""
    record: dict[str, Any] = {"job_id": msg.job_id}
    for key in _RECORD_INTS:
        record[key] = getattr(msg, key)
    if msg.HasField("time"):
        record["time"] = _from_timestamp(msg.time)
    for key in _RECORD_OPTIONAL_FLOATS:
        if msg.HasField(key):
            record[key] = getattr(msg, key)
    record["phase_seconds"] = dict(msg.phase_seconds)
    record["optimizer"] = dict(msg.optimizer)
    record["state_bytes_per_rank"] = list(msg.state_bytes_per_rank)
    record["final"] = msg.final
    if msg.HasField("checkpoint"):
        record["checkpoint"] = {
            "step": msg.checkpoint.step,
            "path": msg.checkpoint.path,
            "time": _from_timestamp(msg.checkpoint.time)
            if msg.checkpoint.HasField("time")
            else None,
        }
    for key, value in msg.extra.items():
        record.setdefault(key, value)
    return record


def metrics_record_from_proto(msg: pb.MetricsRecord, job_id: str) -> MetricsRecord:
    """The validated :class:`MetricsRecord` of ``job_id`` in a ``ReportMetrics`` request.

    Raises :class:`InvalidArgument` naming every bad field.
    """
    return MetricsRecord.from_dict(job_id, {**metrics_from_proto(msg), "job_id": job_id})


# ----------------------------------------------------------------------- jobs/events
# id(spec) -> (spec, its message). The store hands out one shared JobSpec per
# stored spec, so GetJob/ListJobs build each spec's message once instead of per
# call (~20 us of ~35 us per job). The entry keeps the spec alive, so its id
# cannot be reused while cached; the cached message is only ever copied from.
_SPEC_MESSAGES: dict[int, tuple[JobSpec, pb.JobSpec]] = {}
_SPEC_MESSAGES_MAX = 4096


def _spec_message(spec: JobSpec) -> pb.JobSpec:
    entry = _SPEC_MESSAGES.get(id(spec))
    if entry is not None and entry[0] is spec:
        return entry[1]
    msg = spec_to_proto(spec)
    if len(_SPEC_MESSAGES) >= _SPEC_MESSAGES_MAX:
        _SPEC_MESSAGES.clear()
    _SPEC_MESSAGES[id(spec)] = (spec, msg)
    return msg


def job_to_proto(record: JobRecord) -> pb.Job:
    """The ``Job`` message of a :class:`JobRecord`."""
    msg = pb.Job(
        job_id=record.job_id,
        owner=record.owner,
        spec=_spec_message(record.spec),
        state=state_to_proto(record.state),
        state_reason=record.state_reason,
        attempt=record.attempt,
        idempotency_key=record.idempotency_key or "",
        ray_job_id=record.ray_job_id or "",
    )
    for name in ("created_at", "updated_at", "started_at", "finished_at"):
        value = getattr(record, name)
        if value is not None:
            getattr(msg, name).CopyFrom(_to_timestamp(value, name))
    if record.latest_metrics:
        msg.latest_metrics.CopyFrom(metrics_to_proto(record.latest_metrics))
    if record.checkpoint is not None:
        msg.checkpoint.CopyFrom(checkpoint_to_proto(record.checkpoint))
    return msg


# Serialized spec message -> spec, the client's side of the cache above:
# validating a spec costs ~150 us, and a page of ListJobs repeats few distinct specs.
_SPECS: dict[bytes, JobSpec] = {}


def _spec_of_message(msg: pb.JobSpec) -> JobSpec:
    key = msg.SerializeToString(deterministic=True)
    spec = _SPECS.get(key)
    if spec is None:
        spec = spec_from_proto(msg)
        if len(_SPECS) >= _SPEC_MESSAGES_MAX:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec


def job_from_proto(msg: pb.Job) -> JobRecord:
    """The :class:`JobRecord` of a ``Job`` message (client side).

    The spec goes through :func:`spec_from_proto`, the rules the server applied
    when it accepted the job, so it is the same :class:`JobSpec`; a custom task
    (``package.module:function``) passes them, since whether one may run is the
    server's decision at submission, not a rule of the spec. Raises
    ``ValueError`` for a job without a state.
    """
    state = state_from_proto(msg.state)
    if state is None:
        raise ValueError(f"job {msg.job_id}: state is JOB_STATE_UNSPECIFIED")

    def when(name: str) -> float | None:
        return _from_timestamp(getattr(msg, name)) if msg.HasField(name) else None

    return JobRecord(
        job_id=msg.job_id, owner=msg.owner, spec=_spec_of_message(msg.spec), state=state,
        state_reason=msg.state_reason, created_at=_from_timestamp(msg.created_at),
        updated_at=_from_timestamp(msg.updated_at), started_at=when("started_at"),
        finished_at=when("finished_at"), attempt=msg.attempt,
        latest_metrics=(
            metrics_from_proto(msg.latest_metrics) if msg.HasField("latest_metrics") else None
        ),
        checkpoint=checkpoint_from_proto(msg.checkpoint) if msg.HasField("checkpoint") else None,
        idempotency_key=msg.idempotency_key or None, ray_job_id=msg.ray_job_id or None,
    )  # fmt: skip


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    """The ``JobEvent`` message of a domain :class:`JobEvent`."""
    msg = pb.JobEvent(sequence=event.sequence, job_id=event.job_id, attempt=event.attempt)
    msg.time.CopyFrom(_to_timestamp(event.time, "time"))
    if event.kind == "state":
        assert event.state is not None, "a state event carries its state"
        msg.state_change.state = state_to_proto(event.state)
        msg.state_change.reason = event.reason
    elif event.kind == "metrics":
        msg.metrics.CopyFrom(metrics_to_proto(event.metrics or {}))
    else:
        raise ValueError(f"event.kind: must be 'state' or 'metrics', got {event.kind!r}")
    return msg


def event_from_proto(msg: pb.JobEvent) -> JobEvent:
    """The domain :class:`JobEvent` of a ``JobEvent`` message (client side)."""
    kind = msg.WhichOneof("event")
    if kind == "state_change":
        return JobEvent(
            sequence=msg.sequence, job_id=msg.job_id, time=_from_timestamp(msg.time), kind="state",
            state=state_from_proto(msg.state_change.state), reason=msg.state_change.reason,
            metrics=None, attempt=msg.attempt,
        )  # fmt: skip
    return JobEvent(
        sequence=msg.sequence, job_id=msg.job_id, time=_from_timestamp(msg.time), kind="metrics",
        state=None, reason="", metrics=metrics_from_proto(msg.metrics), attempt=msg.attempt,
    )  # fmt: skip
