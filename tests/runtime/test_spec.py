"""JobSpec validation: every bad field named with its rule, all errors at once, round trips."""

from __future__ import annotations

import json
import pickle

import pytest

from zerotrain.service.errors import SpecError
from zerotrain.service.spec import JobSpec, OptimizerSpec, TrainingSpec, load_spec
from zerotrain.service.tasks.registry import is_custom_task

BASE = {"name": "demo", "task": "digits"}


def with_(**sections):
    data = dict(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


BAD_SPECS = [
    (with_(optimizer={"lr": -1}), "optimizer.lr: must be > 0, got -1"),
    (with_(optimizer={"lr": "fast"}), "optimizer.lr: must be a number, got 'fast'"),
    (with_(optimizer={"lr": float("nan")}), "optimizer.lr: must be finite, got nan"),
    (with_(optimizer={"betas": [0.9, 1.0]}), "optimizer.betas[1]: must be < 1, got 1"),
    (with_(optimizer={"betas": [-0.1, 0.9]}), "optimizer.betas[0]: must be >= 0, got -0.1"),
    (with_(optimizer={"betas": 0.9}), "optimizer.betas: must be a pair [beta1, beta2], got 0.9"),
    (with_(optimizer={"eps": -1e-8}), "optimizer.eps: must be >= 0, got -1e-08"),
    (with_(optimizer={"weight_decay": -0.1}), "optimizer.weight_decay: must be >= 0, got -0.1"),
    (
        with_(optimizer={"algorithm": "adam"}),
        "optimizer.algorithm: must be one of 'adamax', 'nadam', got 'adam'",
    ),
    (
        with_(optimizer={"maximize": "yes"}),
        "optimizer.maximize: must be a boolean (true/false), got 'yes'",
    ),
    (
        with_(optimizer={"algorithm": "adamax", "decoupled_weight_decay": True}),
        "optimizer.decoupled_weight_decay: only applies to algorithm 'nadam'",
    ),
    (
        with_(optimizer={"lrr": 1}),
        "optimizer.lrr: unknown field; expected one of: algorithm, lr, "
        "betas, eps, weight_decay, maximize, foreach, momentum_decay, decoupled_weight_decay",
    ),
    (
        with_(sharding={"engine": "fsdp"}),
        "sharding.engine: must be one of 'native', 'deepspeed', got 'fsdp'",
    ),
    (with_(sharding={"stage": 3}), "sharding.stage: must be one of 1, 2, got 3"),
    (with_(sharding={"bucket_mb": 0}), "sharding.bucket_mb: must be > 0, got 0"),
    (
        with_(sharding={"stage": 1, "grad_sync": "reduce_scatter"}),
        "sharding.grad_sync: 'reduce_scatter' is ZeRO stage 2; set sharding.stage: 2 or use 'all_reduce'",
    ),
    (
        with_(sharding={"engine": "deepspeed", "grad_sync": "all_reduce"}),
        "sharding.grad_sync: must be 'auto' with engine 'deepspeed' (DeepSpeed chooses its own "
        "collectives), got 'all_reduce'",
    ),
    (with_(scaling={"num_workers": 0}), "scaling.num_workers: must be >= 1, got 0"),
    (with_(scaling={"num_workers": 5000}), "scaling.num_workers: must be <= 1024, got 5000"),
    (with_(scaling={"num_workers": True}), "scaling.num_workers: must be an integer, got True"),
    (with_(scaling={"cpus_per_worker": 0}), "scaling.cpus_per_worker: must be > 0, got 0"),
    (
        with_(scaling={"placement": "pack"}),
        "scaling.placement: must be one of 'PACK', 'SPREAD', got 'pack'",
    ),
    (with_(training={"max_steps": 0}), "training.max_steps: must be >= 1, got 0"),
    (
        with_(training={"max_steps": 10**8}),
        "training.max_steps: must be <= 10000000, got 100000000",
    ),
    (with_(training={"batch_size": 2.5}), "training.batch_size: must be an integer, got 2.5"),
    (
        with_(training={"precision": "fp16"}),
        "training.precision: must be one of 'fp32', 'bf16', got 'fp16'",
    ),
    (with_(training={"clip_grad_norm": 0}), "training.clip_grad_norm: must be > 0, got 0"),
    (with_(training={"checkpoint_every": -1}), "training.checkpoint_every: must be >= 0, got -1"),
    (with_(training={"seed": -1}), "training.seed: must be >= 0, got -1"),
    (with_(training="fast"), "training: must be a mapping, got str"),
    ({"task": "digits"}, "name: required field is missing"),
    (with_(name=""), "name: must not be empty"),
    (with_(name="x" * 129), "name: must have at most 128 characters, got 129"),
    (with_(name="a\nb"), "name: must not contain control characters, got 'a\\nb'"),
    (
        with_(task="nope"),
        "task: unknown task 'nope'; registered tasks: charlm, digits, regression "
        "(or package.module:function)",
    ),
    (
        with_(task="my.mod:"),
        "task: custom tasks must look like package.module:function, got 'my.mod:'",
    ),
    (with_(task_args={"hidden": 0}), "task_args.hidden: must be >= 1, got 0"),
    (with_(task_args={"hidden": "big"}), "task_args.hidden: must be an integer, got 'big'"),
    (
        with_(task_args={"width": 3}),
        "task_args.width: unknown argument; expected one of: depth, hidden, test_fraction",
    ),
    (
        with_(task_args={"x": [1]}),
        "task_args.x: values must be a string, number or boolean, got list",
    ),
    (
        with_(labels={"Team": "a"}),
        "labels.Team: label keys must be 1-63 characters of [a-z0-9_.-/], starting and ending "
        "alphanumeric, got 'Team'",
    ),
    (
        with_(labels={f"k{i}": "v" for i in range(33)}),
        "labels: must have at most 32 entries, got 33",
    ),
    (
        with_(extra=1),
        "extra: unknown field; expected one of: name, task, task_args, labels, "
        "optimizer, sharding, scaling, training",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"), BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS]
)
def test_bad_spec_names_field_and_rule(data, message):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(data)
    assert info.value.errors == [message]


def test_every_error_reported_at_once():
    data = {
        "name": "",
        "task": "digits",
        "task_args": {"depth": 0},
        "optimizer": {"lr": -1, "betas": [1, 0.5]},
        "scaling": {"num_workers": 0},
        "training": {"max_steps": 0, "precision": "fp8"},
    }
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(data)
    assert info.value.errors == [
        "name: must not be empty",
        "optimizer.lr: must be > 0, got -1",
        "optimizer.betas[0]: must be < 1, got 1",
        "scaling.num_workers: must be >= 1, got 0",
        "training.max_steps: must be >= 1, got 0",
        "training.precision: must be one of 'fp32', 'bf16', got 'fp8'",
        "task_args.depth: must be >= 1, got 0",
    ]
    assert "optimizer.lr: must be > 0, got -1" in str(info.value)


def test_round_trip_and_json():
    spec = JobSpec.from_dict(
        {
            "name": "round trip",
            "task": "charlm",
            "task_args": {"context": 32, "d_model": 32},
            "labels": {"team": "ml", "env": "dev"},
            "optimizer": {"algorithm": "adamax", "lr": 1e-3, "betas": [0.8, 0.99]},
            "sharding": {"engine": "deepspeed", "stage": 1},
            "scaling": {"num_workers": 3, "placement": "SPREAD", "cpus_per_worker": 0.5},
            "training": {"clip_grad_norm": 1.0, "precision": "bf16", "seed": 7},
        }
    )
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert spec.optimizer.betas == (0.8, 0.99)
    assert spec.optimizer.options() == {
        "lr": 1e-3,
        "betas": (0.8, 0.99),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "maximize": False,
        "foreach": None,
    }
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_defaults_and_direct_construction():
    spec = JobSpec.from_dict(BASE)
    assert spec.optimizer == OptimizerSpec()
    assert spec.training == TrainingSpec()
    assert spec.sharding.resolved_grad_sync() == "auto"
    with pytest.raises(SpecError, match=r"optimizer.lr: must be > 0, got 0"):
        OptimizerSpec(lr=0)


def test_spec_error_pickles():
    error = SpecError(["a.b: must be > 0, got -1", "c: bad; really"])
    again = pickle.loads(pickle.dumps(error))
    assert again.errors == error.errors


def test_custom_task_syntax_only():
    spec = JobSpec.from_dict(with_(task="my_pkg.tasks:build", task_args={"anything": 1}))
    assert is_custom_task(spec.task)
    assert not is_custom_task("digits")


def test_load_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("name: y\ntask: digits\noptimizer:\n  lr: 1e-3\n")
    assert load_spec(yaml_file).optimizer.lr == 1e-3  # YAML 1.1 would read "1e-3" as a string
    json_file = tmp_path / "job.json"
    json_file.write_text(json.dumps({"name": "j", "task": "regression"}))
    assert load_spec(json_file).task == "regression"


def test_load_malformed_files_name_file_and_line(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: y\ntask: digits\noptimizer: [1, 2\n")
    with pytest.raises(SpecError, match=rf"{bad_yaml}:\d+: malformed YAML"):
        load_spec(bad_yaml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"name": "j",\n "task": }')
    with pytest.raises(SpecError, match=rf"{bad_json}:2: malformed JSON"):
        load_spec(bad_json)
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path / "missing.yaml")
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- 1\n")
    with pytest.raises(SpecError, match="spec: must be a mapping, got list"):
        load_spec(top_list)


@pytest.mark.parametrize("name", ["digits_nadam", "charlm_adamax", "regression"])
def test_examples_are_valid(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.yaml"
    spec = load_spec(path)
    assert JobSpec.from_dict(spec.to_dict()) == spec
