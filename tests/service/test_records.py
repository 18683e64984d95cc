"""MetricsRecord: built and validated once where a record enters, then taken as it is."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from zerotrain.service import convert
from zerotrain.service.errors import InvalidArgument
from zerotrain.service.ingestion import check_checkpoint
from zerotrain.service.model import CheckpointInfo
from zerotrain.service.records import MetricsRecord
from zerotrain.service.store_rows import dumps, json_safe

FULL = {
    "job_id": "j-1", "attempt": 2, "step": 20, "time": 1764100000.25, "rank": 1,
    "world_size": 2, "loss": 0.83, "accuracy": 0.71, "samples_per_second": 412.0, "lr": 0.001,
    "phase_seconds": {"data": 0.001, "forward": 0.01, "weird": 0.02},
    "optimizer": {"grad_norm": 1.2, "skipped_steps": 1.0},
    "state_bytes_per_rank": [123456, 123400], "final": True,
    "checkpoint": {"step": 20, "path": "/runs/j-1/checkpoint_00000020", "time": 1764100000.5},
    "eval_loss": 0.5,
}  # fmt: skip


@pytest.mark.parametrize(
    "sent",
    [
        FULL,
        {"attempt": 1, "step": 0},
        {"attempt": 1, "step": 3, "loss": math.nan, "checkpoint": {"step": 3, "path": "/r/c"}},
    ],
    ids=["full", "minimal", "nan-loss-checkpoint-without-time"],
)
def test_the_stored_json_is_the_wire_record(sent):
    """What ReportMetrics stores (``to_dict``) is byte for byte the record the message carries."""
    message = convert.metrics_to_proto(sent)
    wire = {**convert.metrics_from_proto(message), "job_id": "j-1"}
    record = convert.metrics_record_from_proto(message, "j-1")
    assert dumps(json_safe(record.to_dict())) == dumps(json_safe(wire))


def test_a_record_is_immutable_and_typed():
    record = MetricsRecord.from_dict("j-1", FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.step = 21  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.optimizer["grad_norm"] = 0.0  # type: ignore[index]
    assert record.extra == {"eval_loss": 0.5} and record.state_bytes_per_rank == (123456, 123400)
    assert record.checkpoint is not None and record.checkpoint.path.endswith("0020")


def test_every_bad_field_is_named_at_once():
    bad = {
        "attempt": 0, "step": -1, "rank": -1, "final": "yes", "note": "text", "lr": "fast",
        "phase_seconds": {"data": -1.0}, "optimizer": {"grad_norm": None},
        "state_bytes_per_rank": [-1], "checkpoint": {"step": 1, "path": "", "time": "now"},
    }  # fmt: skip
    with pytest.raises(InvalidArgument) as info:
        MetricsRecord.from_dict("j-1", bad)
    message = str(info.value)
    for expected in (
        "record.attempt: must be an integer >= 1, got 0",
        "record.step: must be an integer >= 0, got -1",
        "record.rank: must be an integer >= 0, got -1",
        "record.final: must be true or false, got 'yes'",
        "record.note: must be a number",
        "record.lr: must be a number, got 'fast'",
        "record.phase_seconds.data: must be a number >= 0, got -1.0",
        "record.optimizer.grad_norm: must be a number, got None",
        "record.state_bytes_per_rank: must be a list of numbers >= 0",
        "record.checkpoint.path: must be a non-empty string",
        "record.checkpoint.time: must be a number, got 'now'",
    ):
        assert expected in message, message


def test_unreported_fields_stay_unreported():
    record = MetricsRecord.from_dict("j-1", {"step": 1, "loss": None, "note": None})
    assert record.attempt == 1 and record.loss is None and not record.extra
    assert "loss" not in record.to_dict() and "note" not in record.to_dict()


def test_the_checkpoint_is_placed_against_the_job(tmp_path: Path):
    """The one job-dependent check of a record's fields: inside the run directory."""
    run_dir = tmp_path / "runs" / "j-1"
    inside = {"step": 4, "path": f"{run_dir}/checkpoint_00000004"}
    timed = MetricsRecord.from_dict("j-1", {"step": 4, "time": 50.0, "checkpoint": inside})
    assert check_checkpoint(timed, run_dir=run_dir, now=99.0) == CheckpointInfo(
        step=4, path=inside["path"], time=50.0
    )
    untimed = MetricsRecord.from_dict("j-1", {"step": 4, "checkpoint": inside})
    assert check_checkpoint(untimed, run_dir=run_dir, now=99.0).time == 99.0
    none = MetricsRecord.from_dict("j-1", {"step": 4})
    assert check_checkpoint(none, run_dir=run_dir, now=1.0) is None
    outside = {"step": 4, "path": f"{run_dir}/../j-2/checkpoint_00000004"}
    escape = MetricsRecord.from_dict("j-1", {"step": 4, "checkpoint": outside})
    with pytest.raises(InvalidArgument, match="run directory"):
        check_checkpoint(escape, run_dir=run_dir, now=1.0)
