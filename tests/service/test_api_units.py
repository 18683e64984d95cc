"""Converters, tokens file, configuration and trainctl input handling (no server needed)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from api_support import hermetic_client_env  # noqa: F401 - autouse fixture

from zerotrain.service import __main__ as serve_main
from zerotrain.service import cli, convert
from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.auth import Authenticator, TokenFileError, load_tokens
from zerotrain.service.config import ConfigError, ServerConfig, load_client_config
from zerotrain.service.convert_json import job_to_json, message_to_json
from zerotrain.service.errors import SpecError
from zerotrain.service.model import CheckpointInfo, JobEvent, JobRecord, JobState
from zerotrain.service.spec import JobSpec

# ---------------------------------------------------------------- converters
SPECS = [
    {"name": "defaults", "task": "digits"},
    {
        "name": "everything", "task": "digits", "task_args": {"hidden": 64, "depth": 2},
        "labels": {"team": "ml", "run": "a-1"},
        "optimizer": {"algorithm": "adamax", "lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6,
                      "weight_decay": 0.1, "maximize": True, "foreach": False},
        "sharding": {"engine": "native", "stage": 1, "grad_sync": "all_reduce", "bucket_mb": 4.5,
                     "overlap": False},
        "scaling": {"num_workers": 3, "cpus_per_worker": 0.5, "placement": "SPREAD"},
        "training": {"max_steps": 7, "batch_size": 5, "seed": 11, "grad_accum_steps": 2,
                     "clip_grad_norm": 1.5, "precision": "bf16", "checkpoint_every": 0,
                     "max_failures": 0, "metrics_every": 3},
    },
    {"name": "nadam", "task": "regression",
     "optimizer": {"algorithm": "nadam", "momentum_decay": 0.01, "decoupled_weight_decay": True},
     "sharding": {"engine": "deepspeed", "stage": 2}},
]  # fmt: skip


@pytest.mark.parametrize("data", SPECS, ids=[s["name"] for s in SPECS])
def test_spec_round_trip(data):
    spec = JobSpec.from_dict(data)
    message = convert.spec_to_proto(spec)
    wire = pb.JobSpec.FromString(message.SerializeToString())
    assert convert.spec_from_proto(wire) == spec
    assert isinstance(convert.spec_from_proto(wire).task_args.get("hidden", 0), int)


def test_unset_fields_take_the_spec_defaults():
    message = pb.JobSpec(name="n", task="digits")
    message.training.max_steps = 9
    assert convert.spec_from_proto(message) == JobSpec.from_dict(
        {"name": "n", "task": "digits", "training": {"max_steps": 9}}
    )


def test_unknown_enums_and_rule_errors_are_reported_together():
    message = pb.JobSpec(name="n", task="digits")
    message.scaling.placement = 7
    message.training.precision = 9
    message.optimizer.lr = 0.0
    with pytest.raises(SpecError) as info:
        convert.spec_from_proto(message)
    assert info.value.errors == [
        "scaling.placement: unknown enum value 7; expected one of PLACEMENT_PACK, PLACEMENT_SPREAD",
        "training.precision: unknown enum value 9; expected one of PRECISION_FP32, PRECISION_BF16",
        "optimizer.lr: must be > 0, got 0",
    ]


RECORD = {
    "job_id": "j-1", "attempt": 2, "step": 20, "time": 1764100000.25, "rank": 0,
    "world_size": 2, "loss": 0.83, "accuracy": 0.71, "samples_per_second": 412.0, "lr": 0.001,
    "phase_seconds": {"data": 0.001, "forward": 0.01, "backward": 0.02, "communication": 0.004,
                      "optimizer": 0.003},
    "optimizer": {"grad_norm": 1.2, "nadam_mu_t": 0.9},
    "state_bytes_per_rank": [123456, 123400], "final": False,
    "checkpoint": {"step": 20, "path": "/runs/j-1/step-20", "time": 1764100000.5},
    "skipped_steps": 1,
}  # fmt: skip


def test_metrics_record_round_trip():
    wire = pb.MetricsRecord.FromString(convert.metrics_to_proto(RECORD).SerializeToString())
    back = convert.metrics_from_proto(wire)
    assert back.pop("time") == pytest.approx(RECORD["time"], abs=1e-6)
    assert back.pop("checkpoint")["time"] == pytest.approx(1764100000.5, abs=1e-6)
    expected = {k: v for k, v in RECORD.items() if k not in ("time", "checkpoint")}
    assert back == expected


def test_metrics_optional_fields_stay_absent_and_nan_survives():
    back = convert.metrics_from_proto(convert.metrics_to_proto({"step": 1, "loss": math.nan}))
    assert "accuracy" not in back and math.isnan(back["loss"])
    with pytest.raises(ValueError, match="time"):
        convert.metrics_to_proto({"step": 1, "time": math.inf})


def test_events_round_trip():
    state = JobEvent(sequence=3, job_id="j", time=5.5, kind="state", state=JobState.FAILED,
                     reason="boom", metrics=None, attempt=1)  # fmt: skip
    assert convert.event_from_proto(convert.event_to_proto(state)) == state
    metrics = JobEvent(sequence=4, job_id="j", time=6.0, kind="metrics", state=None, reason="",
                       metrics={**RECORD, "time": 6.0, "checkpoint": None}, attempt=2)  # fmt: skip
    back = convert.event_from_proto(convert.event_to_proto(metrics))
    assert back.sequence == 4 and back.metrics["step"] == 20 and back.kind == "metrics"


@pytest.mark.parametrize(
    "spec",
    [SPECS[1], {"name": "custom", "task": "faulty_tasks:paced_digits", "task_args": {"x": 1}}],
    ids=["builtin", "custom-task"],
)
def test_jobs_round_trip_and_json_is_the_servers(spec):
    """What a client makes of a ``Job`` message is the server's record, custom tasks included,
    and its JSON (``trainctl --json``) is the server message's, byte for byte."""
    record = JobRecord(
        job_id="j-1", owner="alice", spec=JobSpec.from_dict(spec), state=JobState.RUNNING,
        state_reason="", created_at=1764100000.123456, updated_at=1764100001.5,
        started_at=1764100000.987654321, finished_at=None, attempt=2,
        latest_metrics=RECORD,
        checkpoint=CheckpointInfo(step=20, path="/runs/j-1/step-20", time=1764100000.5),
        idempotency_key=None, ray_job_id="j-1",
    )  # fmt: skip
    wire = pb.Job.FromString(convert.job_to_proto(record).SerializeToString())
    back = convert.job_from_proto(wire)
    assert back == record
    assert json.dumps(job_to_json(back)) == json.dumps(message_to_json(wire))
    assert message_to_json(wire)["spec"]["task"] == spec["task"]


def test_a_job_without_a_state_is_refused():
    with pytest.raises(ValueError, match="JOB_STATE_UNSPECIFIED"):
        convert.job_from_proto(pb.Job(job_id="j", spec=pb.JobSpec(name="n", task="digits")))


# ------------------------------------------------------------------- tokens
def test_tokens_file_yaml_json_and_hashed(tmp_path: Path):
    yaml_file = tmp_path / "tokens.yaml"
    digest = hashlib.sha256(b"bob-secret-0123456789").hexdigest()
    yaml_file.write_text(
        "tokens:\n"
        "  - {token: alice-secret-0123456789, principal: alice}\n"
        f"  - {{token_sha256: {digest}, principal: bob, admin: true}}\n"
    )
    auth = Authenticator.from_file(yaml_file)
    md = lambda t: [("authorization", f"Bearer {t}")]  # noqa: E731
    assert auth.authenticate(md("alice-secret-0123456789")).name == "alice"
    bob = auth.authenticate(md("bob-secret-0123456789"))
    assert bob.name == "bob" and bob.admin
    assert auth.authenticate(md("alice-secret-012345678")) is None
    assert auth.authenticate([]) is None
    json_file = tmp_path / "tokens.json"
    json_file.write_text(json.dumps({"tokens": [{"token": "x" * 16, "principal": "c"}]}))
    assert [p.name for _, p in load_tokens(json_file)] == ["c"]


def test_tokens_reload_is_all_or_nothing(tmp_path: Path):
    path = tmp_path / "tokens.yaml"
    path.write_text("tokens:\n  - {token: first-secret-0123456789, principal: a}\n")
    auth = Authenticator.from_file(path)
    md = lambda t: [("authorization", f"Bearer {t}")]  # noqa: E731
    path.write_text("tokens:\n  - {token: second-secret-012345678, principal: a}\n")
    assert auth.reload(path) == 1
    assert auth.authenticate(md("first-secret-0123456789")) is None
    assert auth.authenticate(md("second-secret-012345678")).name == "a"
    path.write_text("tokens:\n  - {token: short, principal: a}\n")
    with pytest.raises(TokenFileError):
        auth.reload(path)
    assert auth.authenticate(md("second-secret-012345678")).name == "a"  # kept


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("tokens: []", "non-empty list"),
        ("tokens:\n  - {token: short-secret, principal: a}", "tokens[0].token: must be a string of >= 16"),
        ("tokens:\n  - {token: long-enough-secret-1, principal: ''}", "tokens[0].principal"),
        ("tokens:\n  - {token: long-enough-secret-1, principal: a, admin: 'yes'}", "tokens[0].admin"),
        ("tokens:\n  - {token: long-enough-secret-1, principal: a}\n"
         "  - {token: long-enough-secret-1, principal: b}", "tokens[1]: duplicate token"),
        ("tokens:\n  - {principal: a}", "exactly one of token, token_sha256"),
        ("tokens: [ {token: long-enough-secret-1", "not valid YAML/JSON"),
    ],
)  # fmt: skip
def test_bad_tokens_files_name_the_entry_but_never_the_token(tmp_path: Path, content, message):
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(TokenFileError) as info:
        load_tokens(path)
    assert message in str(info.value)
    assert "secret" not in str(info.value)


# ------------------------------------------------------------------- config
def test_server_config_rules():
    with pytest.raises(ConfigError) as info:
        ServerConfig(address="nohost", metrics_port=70000, tls_cert=Path("c.pem"))
    text = str(info.value)
    for fragment in ("--address", "--metrics-port", "--tls-cert/--tls-key", "--tokens-file"):
        assert fragment in text
    env = {"ZEROTRAIN_LISTEN_ADDRESS": "0.0.0.0:1", "ZEROTRAIN_INSECURE_NO_AUTH": "maybe"}
    with pytest.raises(ConfigError, match="ZEROTRAIN_INSECURE_NO_AUTH"):
        ServerConfig.env_defaults(env)


def test_every_path_flag_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A relative --tls-cert once reached the workers as is and silently disabled all metrics."""
    monkeypatch.chdir(tmp_path)
    args = serve_main.build_parser().parse_args(
        ["serve", "--data-dir", "data", "--tokens-file", "tokens.yaml", "--tls-cert",
         "tls/server.pem", "--tls-key", "tls/server.key", "--tls-client-ca", "tls/ca.pem",
         "--ingest-ca", "../ca.pem"]
    )  # fmt: skip
    config = serve_main.config_from_args(args, env={})
    assert config.tls_cert == tmp_path / "tls" / "server.pem"
    assert config.ingest_ca == tmp_path.parent / "ca.pem"
    for name in ("data_dir", "tokens_file", "tls_cert", "tls_key", "tls_client_ca", "ingest_ca"):
        assert getattr(config, name).is_absolute(), name
    from_env = ServerConfig(**ServerConfig.env_defaults({"ZEROTRAIN_TOKENS_FILE": "t.yaml"}))
    assert from_env.tokens_file == tmp_path / "t.yaml"


def test_budget_and_limit_settings_are_checked():
    with pytest.raises(ConfigError) as info:
        ServerConfig(
            insecure_no_auth=True, max_streams_per_principal=100, max_streams=50,
            min_cpus_per_worker=0, metrics_grace_s=-1, health_port=70000,
        )  # fmt: skip
    text = str(info.value)
    for fragment in ("--max-streams-per-principal", "--min-cpus-per-worker",
                     "--metrics-grace-s", "--health-port"):  # fmt: skip
        assert fragment in text
    env = {"ZEROTRAIN_MIN_CPUS_PER_WORKER": "0.25", "ZEROTRAIN_MAX_STREAMS": "8"}
    values = ServerConfig.env_defaults(env)
    assert values == {"min_cpus_per_worker": 0.25, "max_streams": 8}


def test_no_auth_flag_forces_loopback():
    args = serve_main.build_parser().parse_args(
        ["serve", "--address", "0.0.0.0:7000", "--insecure-no-auth"]
    )
    config = serve_main.config_from_args(args, env={})
    assert config.address == "127.0.0.1:7000" and config.insecure_no_auth


def test_client_config_precedence(tmp_path: Path):
    file = tmp_path / "config.yaml"
    file.write_text("address: file:1\ntoken: from-file\n")
    env = {"ZEROTRAIN_TOKEN": "from-env"}
    config = load_client_config(env=env, config_file=file)
    assert (config.address, config.token) == ("file:1", "from-env")
    config = load_client_config(address="arg:2", token="from-arg", env=env, config_file=file)
    assert (config.address, config.token) == ("arg:2", "from-arg")
    file.write_text("adress: typo:1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_client_config(env={}, config_file=file)


# ------------------------------------------------------------------ trainctl
def test_trainctl_malformed_yaml_is_exit_2(tmp_path: Path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\n  task: [\n")
    assert cli.main(["submit", "-f", str(path)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_trainctl_invalid_spec_lists_every_field(tmp_path: Path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\ntask: digits\noptimizer: {lr: -1}\nscaling: {num_workers: 0}\n")
    assert cli.main(["submit", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lr: must be > 0" in err and "scaling.num_workers: must be >= 1" in err


def test_trainctl_usage_and_unreachable(capsys):
    assert cli.main(["submit", "--name", "x"]) == 2
    assert cli.main(["--address", "127.0.0.1:1", "--timeout", "2", "get", "j-1"]) == 5
    assert "UNAVAILABLE" in capsys.readouterr().err
