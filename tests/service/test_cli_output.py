"""What a person sees from ``trainctl``, against a real server on port 0 and a real SQLite store.

No Ray: jobs are seeded into the store and their metrics records arrive
through the real ingestion rpc (``GrpcSink`` with the job's ingest token),
as a worker's would. Covers the list at 80 columns, ``get --json`` types,
errors that say what to do, watch lines and ``trainctl plot``.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import (
    TOKENS,
    hermetic_client_env,  # noqa: F401 - autouse fixture
    make_auth,
    seed_job,
    serving,
)

from zerotrain.service import cli, cli_views
from zerotrain.service.auth import Authenticator
from zerotrain.service.client import JobClient
from zerotrain.service.display import strip_ansi
from zerotrain.service.history import fetch_history
from zerotrain.service.ingest_client import GrpcSink
from zerotrain.service.jobs import JobManager
from zerotrain.service.model import JobState
from zerotrain.service.spec import JobSpec
from zerotrain.service.store import JobStore

LONG_NAME = "a-very-long-job-name-that-would-wrap-over-several-lines-" * 2


@pytest.fixture
def auth() -> Authenticator:
    return make_auth()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[JobManager]:
    """A manager with a real store and no Ray (never started: nothing here needs Ray)."""
    m = JobManager(JobStore(tmp_path / "jobs.db"), None, data_dir=tmp_path)  # type: ignore[arg-type]
    yield m
    m.store.close()


@pytest.fixture
def port(manager: JobManager, auth: Authenticator) -> Iterator[int]:
    with serving(manager, auth) as p:
        yield p


def trainctl(port: int, *argv: str, who: str = "alice") -> list[str]:
    return ["--address", f"127.0.0.1:{port}", "--token", TOKENS[who], *argv]


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def record(step: int, *, attempt: int = 1, algorithm: str = "nadam", **extra: Any) -> dict:
    """A metrics record shaped like the worker's (docs/ARCHITECTURE.md)."""
    optimizer: dict[str, float] = {
        "grad_norm": 2.0 * math.exp(-step / 60) + 0.3,
        "update_param_ratio": 1e-2 * math.exp(-step / 80),
    }
    if algorithm == "nadam":
        optimizer.update(
            nadam_mu_t=0.9 * (1 - 0.5 * 0.96 ** (step * 0.004)),
            nadam_bias_correction1=1.0,
            nadam_bias_correction2=1 - 0.999**step,
        )
    else:
        optimizer["adamax_u_refreshed_fraction"] = 0.5 * math.exp(-step / 50)
    return {
        "attempt": attempt, "step": step, "time": time.time(), "rank": 0, "world_size": 2,
        "loss": 2.3 * math.exp(-step / 40), "eval_loss": 2.3 * math.exp(-step / 45) + 0.05,
        "accuracy": 1 - math.exp(-step / 30), "samples_per_second": 9000.0 + step,
        "lr": 2e-3, "phase_seconds": {"forward": 0.001, "backward": 0.002, "optimizer": 0.001},
        "optimizer": optimizer, "state_bytes_per_rank": [130_000, 129_000], "final": False,
        **extra,
    }  # fmt: skip


def report(port: int, auth: Authenticator, job_id: str, records: list[dict]) -> None:
    """Deliver records through the ingestion rpc, as the job's rank-0 worker does."""
    with GrpcSink(f"127.0.0.1:{port}", job_id, token=auth.ingest_token_for(job_id)) as sink:
        for r in records:
            sink.send(r)


def finish(manager: JobManager, job_id: str) -> None:
    now = time.time()
    manager.store.update_job(
        job_id, state=JobState.SUCCEEDED, reason="finished", now=now, finished_at=now
    )


# -------------------------------------------------------------------------- list
def test_list_fits_80_columns_without_wrapping_ids_or_names(
    port, manager, auth, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "80")
    ids = [f"j-{i:016x}" for i in range(3)]
    long_named = JobSpec.from_dict({"name": LONG_NAME[:128], "task": "digits"})
    for job_id in ids:
        seed_job(manager.store, job_id, "alice", job_spec=long_named if job_id == ids[1] else None)
    report(port, auth, ids[2], [record(100_000, final=True)])

    code, out, _ = run(capsys, trainctl(port, "list"))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 + len(ids), out  # a header and one line per job: nothing wraps
    assert all(len(line) <= 80 for line in lines), out
    assert lines[0].split()[:5] == ["JOB", "STATE", "NAME", "STEP", "LOSS"]  # headers whole
    for job_id in ids:
        assert sum(line.split()[0] == job_id for line in lines) == 1
    long_line = next(line for line in lines if line.startswith(ids[1]))
    assert "a-very-long-job-name" in long_line and "…" in long_line
    assert "100000/" in out and "OWNER" not in lines[0]  # one owner: not worth 80 columns


def test_list_of_several_owners_keeps_the_owner_column(port, manager, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    seed_job(manager.store, "j-alice", "alice")
    seed_job(manager.store, "j-bob", "bob")
    code, out, _ = run(capsys, trainctl(port, "list", who="root"))
    assert code == 0 and "OWNER" in out.splitlines()[0]
    assert all(len(line) <= 80 for line in out.splitlines())


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (200, {"JOB": 18, "STATE": 9, "NAME": 40, "STEP": 9, "LOSS": 6, "CREATED": 11, "OWNER": 5}),
        (80, {"JOB": 18, "STATE": 9, "NAME": 30, "STEP": 9, "LOSS": 6}),
        (60, {"JOB": 18, "STATE": 9, "NAME": 29}),
        (30, {"JOB": 18, "STATE": 9}),
        (10, {"JOB": 18}),  # an id is never cut or dropped
    ],
)
def test_fit_columns_drops_by_priority_and_gives_name_the_rest(total, expected):
    natural = {"JOB": 18, "STATE": 9, "NAME": 40, "STEP": 9, "LOSS": 6, "CREATED": 11, "OWNER": 5}
    assert cli_views.fit_columns(natural, cli_views.LIST_COLUMNS, total) == expected


# ------------------------------------------------------------------------- json
def test_get_json_keeps_the_types_the_user_wrote(port, manager, auth, capsys):
    typed = JobSpec.from_dict(
        {"name": "typed", "task": "digits", "task_args": {"hidden": 128, "test_fraction": 0.25},
         "training": {"max_steps": 150, "seed": 7}}
    )  # fmt: skip
    seed_job(manager.store, "j-alice", "alice", job_spec=typed)
    report(port, auth, "j-alice", [record(10)])

    code, out, _ = run(capsys, trainctl(port, "get", "j-alice", "--json"))
    assert code == 0
    job = json.loads(out)
    args, training = job["spec"]["task_args"], job["spec"]["training"]
    assert args == {"hidden": 128, "test_fraction": 0.25} and type(args["hidden"]) is int
    assert training["max_steps"] == 150 and type(training["max_steps"]) is int
    assert training["seed"] == 7 and type(training["seed"]) is int
    metrics = job["latest_metrics"]
    assert metrics["step"] == 10 and metrics["state_bytes_per_rank"] == [130_000, 129_000]
    # The keys are the API's field names, as before.
    assert {"job_id", "owner", "spec", "state", "latest_metrics"} <= set(job)
    code, out, _ = run(capsys, trainctl(port, "list", "--json"))
    assert json.loads(out)[0]["spec"]["task_args"]["hidden"] == 128


def test_help_states_the_default_address_and_the_json_promise(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "default 127.0.0.1:50051" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["get", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "field names as keys (stable" in text and "128, not 128.0" in text


# ----------------------------------------------------------------------- errors
def test_unauthenticated_says_how_to_pass_a_token(port, capsys):
    code, _, err = run(capsys, ["--address", f"127.0.0.1:{port}", "list"])
    assert code == cli.EXIT_AUTH
    assert "--token" in err and "ZEROTRAIN_TOKEN" in err and "metadata" not in err
    code, _, err = run(capsys, ["--address", f"127.0.0.1:{port}", "--token", "wrong", "list"])
    assert code == cli.EXIT_AUTH and "rejected" in err and "--token" in err


def test_unavailable_asks_whether_the_server_runs_there(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    code, _, err = run(capsys, ["--address", address, "--timeout", "3", "list"])
    assert code == cli.EXIT_UNAVAILABLE
    assert f"is zerotrain-serve running at {address}?" in " ".join(err.split())


def test_unknown_job_is_named(port, capsys):
    code, _, err = run(capsys, trainctl(port, "get", "j-nope"))
    assert code == cli.EXIT_NOT_FOUND and "j-nope" in err and "not found" in err


# ------------------------------------------------------------------------ watch
def test_watch_prints_state_changes_without_event_numbers(port, manager, auth, capsys):
    seed_job(manager.store, "j-alice", "alice")
    report(port, auth, "j-alice", [record(s) for s in (1, 2, 3, 4)])
    finish(manager, "j-alice")
    code, out, _ = run(capsys, trainctl(port, "watch", "j-alice"))
    assert code == 0
    assert "#" not in out
    states = [
        line.split()[1].rstrip(":")
        for line in out.splitlines()
        if re.match(r"\d\d:\d\d:\d\d ", line)
    ]
    assert states == ["PENDING", "RUNNING", "SUCCEEDED"]
    assert "job j-alice: SUCCEEDED, step 4" in out


def test_strip_ansi_removes_ray_colours():
    line = "\x1b[36m(RayTrainWorker pid=1)\x1b[0m ZEROTRAIN_METRICS {}\x1b[32m [repeated 2x]\x1b[0m"
    assert strip_ansi(line) == "(RayTrainWorker pid=1) ZEROTRAIN_METRICS {} [repeated 2x]"


# ------------------------------------------------------------------------- plot
def read_png(path: Path):
    from matplotlib import image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return image.imread(path)


def test_plot_draws_a_png_from_the_servers_stored_events(
    port, manager, auth, capsys, tmp_path: Path
):
    seed_job(manager.store, "j-alice", "alice")
    records = [record(s) for s in range(10, 90, 10)]
    records += [record(s, attempt=2) for s in range(60, 160, 10)]  # a restart from step 50
    records[-1]["final"] = True
    report(port, auth, "j-alice", records)
    finish(manager, "j-alice")

    out_path = tmp_path / "run.png"
    code, out, err = run(capsys, trainctl(port, "plot", "j-alice", "-o", str(out_path)))
    assert code == 0, err
    pixels = read_png(out_path)
    assert out_path.stat().st_size > 20_000 and pixels.shape[0] > 500 and pixels.shape[1] > 800
    assert pixels.std() > 0.05  # not a blank sheet
    assert f"wrote {out_path}: 18 metrics records" in " ".join(out.split())
    for panel in ("loss", "gradient norm", "update / parameter norm", "Nadam", "throughput",
                  "optimizer state per rank"):  # fmt: skip
        assert panel in out


def test_plot_leaves_out_panels_without_data(port, manager, auth, capsys, tmp_path: Path):
    seed_job(manager.store, "j-alice", "alice")
    bare = [
        {"attempt": 1, "step": s, "time": time.time(), "loss": 1.0 / s,
         "samples_per_second": 500.0, "optimizer": {"grad_norm": 1.0}, "final": s == 30}
        for s in (10, 20, 30)
    ]  # fmt: skip  (DeepSpeed-like: no optimizer internals, no state bytes, no eval)
    report(port, auth, "j-alice", bare)
    finish(manager, "j-alice")
    code, out, err = run(capsys, trainctl(port, "plot", "j-alice", "-o", str(tmp_path / "x.png")))
    assert code == 0, err
    assert "loss" in out and "gradient norm" in out and "throughput" in out
    for absent in ("update / parameter norm", "Nadam", "Adamax", "state per rank"):
        assert absent not in out


def test_plot_of_an_unknown_job_is_a_clear_error(port, capsys, tmp_path: Path):
    out_path = tmp_path / "nope.png"
    code, _, err = run(capsys, trainctl(port, "plot", "j-nope", "-o", str(out_path)))
    assert code == cli.EXIT_NOT_FOUND
    assert "NOT_FOUND" in err and "j-nope" in err and not out_path.exists()


def test_plot_of_a_job_without_metrics_says_so(port, manager, capsys, tmp_path: Path):
    seed_job(manager.store, "j-alice", "alice")
    code, _, err = run(capsys, trainctl(port, "plot", "j-alice", "-o", str(tmp_path / "x.png")))
    assert code == cli.EXIT_CONFLICT and "no metrics records yet" in err


def test_plot_says_when_the_store_cap_cut_the_history(auth, capsys, tmp_path: Path):
    manager = JobManager(JobStore(tmp_path / "jobs.db", max_metrics_events=5), None,  # type: ignore[arg-type]
                         data_dir=tmp_path)  # fmt: skip
    try:
        adamax = JobSpec.from_dict({"name": "long", "task": "digits",
                                    "optimizer": {"algorithm": "adamax"}})  # fmt: skip
        seed_job(manager.store, "j-alice", "alice", job_spec=adamax)
        with serving(manager, auth) as port:
            report(port, auth, "j-alice", [record(s, algorithm="adamax") for s in range(1, 13)])
            with JobClient(f"127.0.0.1:{port}", token=TOKENS["alice"]) as client:
                history = fetch_history(client, "j-alice")  # RUNNING: must not wait for the end
            assert history.truncated and [r["step"] for r in history.records] == [8, 9, 10, 11, 12]
            code, out, err = run(
                capsys, trainctl(port, "plot", "j-alice", "-o", str(tmp_path / "cut.png"))
            )
        assert code == 0, err
        assert "oldest were dropped" in out and "Adamax" in out and "Nadam" not in out
    finally:
        manager.store.close()
