"""The API's JSON form of domain values: what ``trainctl get/list --json`` print.

It is proto3 JSON of the API's messages (the proto field names as keys, fields
at their default value left out, enums by name, times as RFC 3339) with the
types a person wrote: int64 fields as JSON numbers (proto3 JSON writes them as
strings) and a ``Struct``'s integral doubles (``task_args``) as integers. A
record goes through :func:`zerotrain.service.convert.job_to_proto` first, so a
client and the server write the same JSON for a job.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor, json_format, message

from zerotrain.service.convert import integral_to_int, job_to_proto
from zerotrain.service.model import JobRecord

__all__ = ["job_to_json", "message_to_json"]


def job_to_json(record: JobRecord) -> dict[str, Any]:
    """A job as a JSON-ready dict: its ``Job`` message in the form of :func:`message_to_json`."""
    return message_to_json(job_to_proto(record))


_INT64_TYPES = frozenset(
    {
        descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64,
        descriptor.FieldDescriptor.TYPE_SINT64, descriptor.FieldDescriptor.TYPE_FIXED64,
        descriptor.FieldDescriptor.TYPE_SFIXED64,
    }
)  # fmt: skip


def message_to_json(msg: message.Message) -> dict[str, Any]:
    """A message as a JSON-ready dict: proto3 JSON with the proto field names as keys
    (fields at their default value omitted), int64 fields as numbers, and integral
    numbers inside a ``Struct`` (``task_args``) as integers."""
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return _typed_json(msg.DESCRIPTOR, data)


def _typed_json(desc: descriptor.Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    for fd in desc.fields:
        if fd.name in data:
            data[fd.name] = _typed_value(fd, data[fd.name])
    return data


def _typed_value(fd: descriptor.FieldDescriptor, value: Any) -> Any:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        # A map has no order (protobuf iterates it in hash order): keys sorted, so the
        # same job always prints the same JSON.
        value_fd = fd.message_type.fields_by_name["value"]
        return {k: _typed_scalar(value_fd, v) for k, v in sorted(value.items())}
    if fd.is_repeated:
        return [_typed_scalar(fd, v) for v in value]
    return _typed_scalar(fd, value)


def _typed_scalar(fd: descriptor.FieldDescriptor, value: Any) -> Any:
    if fd.message_type is None:
        return int(value) if fd.type in _INT64_TYPES else value
    if fd.message_type.full_name == "google.protobuf.Struct":
        return integral_to_int(value)
    if fd.message_type.full_name.startswith("google.protobuf."):
        return value  # Timestamp, Value, ...: their JSON forms are already right
    return _typed_json(fd.message_type, value)
