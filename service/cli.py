"""``trainctl``: the command line of the zerotrain job service.

    trainctl submit -f examples/digits_nadam.yaml --watch
    trainctl submit --name quick --task digits --workers 2 --max-steps 50 --algorithm adamax
    trainctl list [--state RUNNING] [--label team=ml]
    trainctl get JOB_ID [--json]
    trainctl watch JOB_ID [--from-sequence N]
    trainctl logs JOB_ID [-f]
    trainctl cancel JOB_ID

Connection flags (``--address``, ``--token``, ``--ca``, ``--client-cert``,
``--client-key``, ``--config``) fall back to ``ZEROTRAIN_*`` variables and
``~/.config/zerotrain/config.yaml`` (see :mod:`service.config`).

Exit codes: 0 success (``watch``: the job SUCCEEDED); 1 the job FAILED or was
CANCELLED, or an unexpected server error; 2 bad input (usage, unreadable or
malformed job file, invalid spec: every bad field is printed); 3 no such job;
4 not authenticated or not allowed; 5 the server cannot be reached;
6 the request conflicts with the job's state (e.g. cancelling a finished job)
or the cluster can never run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from service.api.zerotrain.v1 import job_service_pb2 as pb
from service.client import TERMINAL_STATES, ApiError, JobClient
from service.config import ConfigError
from service.convert import state_name
from service.spec import JobSpec, SpecError, load_spec

__all__ = ["EXIT_CODES", "build_parser", "main", "watch_job"]

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_CONFLICT = (
    range(7)
)
#: gRPC status -> exit code.
EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_CONFLICT,
}
_STATE_STYLE = {
    "PENDING": "yellow", "RUNNING": "cyan", "SUCCEEDED": "green", "FAILED": "red",
    "CANCELLING": "magenta", "CANCELLED": "magenta",
}  # fmt: skip


class _UsageError(Exception):
    """Bad command-line input (exit 2)."""


# ------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``trainctl`` argument parser."""
    parser = argparse.ArgumentParser(prog="trainctl", description="zerotrain job service client")
    conn = parser.add_argument_group("connection")
    conn.add_argument("--address", help="server host:port (env ZEROTRAIN_ADDRESS)")
    conn.add_argument("--token", help="bearer token (env ZEROTRAIN_TOKEN)")
    conn.add_argument("--ca", help="PEM CA of the server certificate: TLS (env ZEROTRAIN_CA)")
    conn.add_argument("--client-cert", help="PEM client certificate for mutual TLS")
    conn.add_argument("--client-key", help="PEM client key for mutual TLS")
    conn.add_argument(
        "--config", help="client config file (default ~/.config/zerotrain/config.yaml)"
    )
    conn.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", help="submit a job from a file and/or flags")
    submit.add_argument("-f", "--file", help="job spec, YAML or JSON")
    submit.add_argument("--name")
    submit.add_argument("--task")
    submit.add_argument("--algorithm", choices=["adamax", "nadam"])
    submit.add_argument("--lr", type=float)
    submit.add_argument("--engine", choices=["native", "deepspeed"])
    submit.add_argument("--stage", type=int, choices=[1, 2])
    submit.add_argument("--workers", type=int, help="scaling.num_workers")
    submit.add_argument("--max-steps", type=int)
    submit.add_argument("--batch-size", type=int)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="task argument (value parsed as YAML: 64, 0.1, true, text)")  # fmt: skip
    submit.add_argument(
        "--idempotency-key", help="resubmitting with the same key returns the same job"
    )
    submit.add_argument("--watch", action="store_true", help="then watch it to the end")

    lst = sub.add_parser("list", help="list jobs")
    lst.add_argument("--state", choices=list(_STATE_STYLE), help="only jobs in this state")
    lst.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    lst.add_argument("--owner", default="", help="admins: only this principal's jobs")
    lst.add_argument("--page-size", type=int, default=50)
    lst.add_argument("--all", action="store_true", help="follow page tokens to the end")
    lst.add_argument("--json", action="store_true")

    for name, text in (("get", "show a job"), ("cancel", "cancel a job")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job_id")
        cmd.add_argument("--json", action="store_true")

    watch = sub.add_parser("watch", help="live progress of a job until it ends")
    watch.add_argument("job_id")
    watch.add_argument("--from-sequence", type=int, default=0)

    logs = sub.add_parser("logs", help="a job's log")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming until it ends")
    return parser


# ----------------------------------------------------------------------- helpers
def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"{flag}: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _spec_from_args(args: argparse.Namespace) -> JobSpec:
    import yaml

    data: dict[str, Any] = load_spec(args.file).to_dict() if args.file else {}
    if not args.file and not (args.name and args.task):
        raise _UsageError("submit: give -f FILE, or at least --name and --task")

    def put(section: str | None, key: str, value: Any) -> None:
        if value is None:
            return
        target = data.setdefault(section, {}) if section else data
        target[key] = value

    put(None, "name", args.name)
    put(None, "task", args.task)
    put("optimizer", "algorithm", args.algorithm)
    put("optimizer", "lr", args.lr)
    put("sharding", "engine", args.engine)
    put("sharding", "stage", args.stage)
    put("scaling", "num_workers", args.workers)
    put("training", "max_steps", args.max_steps)
    put("training", "batch_size", args.batch_size)
    put("training", "seed", args.seed)
    if args.label:
        data.setdefault("labels", {}).update(_pairs(args.label, "--label"))
    for key, raw in _pairs(args.arg, "--arg").items():
        try:
            data.setdefault("task_args", {})[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            data.setdefault("task_args", {})[key] = raw
    return JobSpec.from_dict(data)


def _fmt_time(ts: Any) -> str:
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts.seconds))


def _metric(record: pb.MetricsRecord, name: str, fmt: str = "{:.4f}") -> str:
    return fmt.format(getattr(record, name)) if record.HasField(name) else "-"


def _print_job(console: Console, job: pb.Job) -> None:
    state = state_name(job.state)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    spec = job.spec
    rows = [
        ("job", job.job_id), ("name", spec.name), ("owner", job.owner),
        ("state", f"[{_STATE_STYLE.get(state, '')}]{state}[/]"
                  + (f"  ({job.state_reason})" if job.state_reason else "")),
        ("task", spec.task),
        ("optimizer", f"{pb.Algorithm.Name(spec.optimizer.algorithm).removeprefix('ALGORITHM_').lower()}"
                      f" lr={spec.optimizer.lr:g}"),
        ("sharding", f"{pb.Engine.Name(spec.sharding.engine).removeprefix('ENGINE_').lower()}"
                     f" stage {spec.sharding.stage}"),
        ("workers", str(spec.scaling.num_workers)),
        ("attempt", str(job.attempt)),
        ("created", _fmt_time(job.created_at)), ("started", _fmt_time(job.started_at)),
        ("finished", _fmt_time(job.finished_at)),
    ]  # fmt: skip
    if job.HasField("latest_metrics"):
        m = job.latest_metrics
        rows.append(("step", f"{m.step} / {spec.training.max_steps}"))
        rows.append(("loss", _metric(m, "loss")))
        if m.HasField("accuracy"):
            rows.append(("accuracy", _metric(m, "accuracy")))
        rows.append(("throughput", _metric(m, "samples_per_second", "{:.0f} samples/s")))
    if job.HasField("checkpoint"):
        rows.append(("checkpoint", f"step {job.checkpoint.step}: {job.checkpoint.path}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _job_json(job: Any) -> str:
    return json_format.MessageToJson(job, preserving_proto_field_name=True, indent=2)


# ----------------------------------------------------------------------- watch
def watch_job(
    client: JobClient, job_id: str, console: Console, *, from_sequence: int = 0
) -> pb.Job:
    """Show a live progress bar (step, loss, throughput) until the job ends.

    State changes are printed above the bar; returns the finished job after
    printing a summary.
    """
    job = client.get(job_id)
    total = job.spec.training.max_steps or None
    progress = Progress(
        TextColumn("[bold]{task.fields[name]}"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        bar = progress.add_task(
            "train", total=total, name=job.spec.name or job_id, loss="-", rate=""
        )
        for event in client.watch(job_id, from_sequence):
            if event.HasField("metrics"):
                m = event.metrics
                progress.update(
                    bar,
                    completed=m.step,
                    loss=_metric(m, "loss"),
                    rate=_metric(m, "samples_per_second", "{:.0f} samples/s"),
                )
            else:
                change = event.state_change
                state = state_name(change.state)
                reason = f": {change.reason}" if change.reason else ""
                progress.console.print(
                    f"[dim]#{event.sequence}[/] [{_STATE_STYLE.get(state, '')}]{state}[/]{reason}"
                )
                if change.state in TERMINAL_STATES:
                    break
    job = client.get(job_id)
    _print_summary(console, job)
    return job


def _print_summary(console: Console, job: pb.Job) -> None:
    state = state_name(job.state)
    parts = [f"[{_STATE_STYLE.get(state, '')}]{state}[/]"]
    if job.HasField("latest_metrics"):
        m = job.latest_metrics
        parts.append(f"step {m.step}")
        parts.append(f"loss {_metric(m, 'loss')}")
        if m.HasField("accuracy"):
            parts.append(f"accuracy {_metric(m, 'accuracy')}")
        parts.append(_metric(m, "samples_per_second", "{:.0f} samples/s"))
    if job.HasField("started_at") and job.HasField("finished_at"):
        seconds = job.finished_at.ToNanoseconds() / 1e9 - job.started_at.ToNanoseconds() / 1e9
        parts.append(f"{seconds:.1f} s")
    if job.attempt > 1:
        parts.append(f"{job.attempt} attempts")
    console.print(f"job {job.job_id}: " + ", ".join(parts))
    if job.state_reason and job.state != pb.JOB_STATE_SUCCEEDED:
        console.print(f"reason: {job.state_reason}")


# ------------------------------------------------------------------------ main
def _run(args: argparse.Namespace, console: Console) -> int:
    client = JobClient(
        args.address,
        token=args.token,
        ca=args.ca,
        client_cert=args.client_cert,
        client_key=args.client_key,
        config_file=args.config,
        timeout_s=args.timeout,
    )
    with client:
        if args.command == "submit":
            spec = _spec_from_args(args)
            job = client.submit(spec, idempotency_key=args.idempotency_key)
            console.print(f"submitted {job.job_id} ({state_name(job.state)})")
            if args.watch:
                job = watch_job(client, job.job_id, console)
                return EXIT_OK if job.state == pb.JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED
            return EXIT_OK
        if args.command == "list":
            state = getattr(pb, f"JOB_STATE_{args.state}") if args.state else 0
            filters = {"state": state, "labels": _pairs(args.label, "--label"), "owner": args.owner}
            if args.all:
                jobs = list(client.list_all(page_size=args.page_size, **filters))
                token = ""
            else:
                jobs, token = client.list(page_size=args.page_size, **filters)
            if args.json:
                print(json.dumps([json.loads(_job_json(j)) for j in jobs], indent=2))
                return EXIT_OK
            table = Table(
                Column("JOB", no_wrap=True),
                Column("NAME", overflow="fold"),
                "OWNER",
                "STATE",
                "STEP",
                "LOSS",
                Column("CREATED", no_wrap=True),
            )
            for job in jobs:
                state = state_name(job.state)
                m = job.latest_metrics
                table.add_row(
                    job.job_id, job.spec.name, job.owner,
                    f"[{_STATE_STYLE.get(state, '')}]{state}[/]",
                    f"{m.step}/{job.spec.training.max_steps}" if job.HasField("latest_metrics") else "-",
                    _metric(m, "loss"), _fmt_time(job.created_at),
                )  # fmt: skip
            console.print(table)
            if token:
                console.print(f"[dim]more: --all, or the next page token {token}[/]")
            return EXIT_OK
        if args.command in ("get", "cancel"):
            job = client.get(args.job_id) if args.command == "get" else client.cancel(args.job_id)
            if args.json:
                print(_job_json(job))
            else:
                _print_job(console, job)
            return EXIT_OK
        if args.command == "watch":
            job = watch_job(client, args.job_id, console, from_sequence=args.from_sequence)
            return EXIT_OK if job.state == pb.JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED
        if args.command == "logs":
            for line in client.logs(args.job_id, follow=args.follow):
                print(line, flush=True)
            return EXIT_OK
    raise _UsageError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trainctl``; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    console = Console(stderr=False, highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        return _run(args, console)
    except SpecError as exc:
        err.print("[red]error:[/] invalid job spec:", markup=True)
        for line in exc.errors:
            err.print(f"  {line}", markup=False)
        return EXIT_USAGE
    except (_UsageError, ConfigError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True)
        return EXIT_USAGE
    except ApiError as exc:
        err.print(f"[red]error:[/] {exc.code.name}: ", markup=True, end="")
        err.print(exc.details, markup=False)
        return EXIT_CODES.get(exc.code, EXIT_JOB_FAILED)
    except OSError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
