"""``trainctl``: the command line of the zerotrain job service.

    trainctl submit -f examples/digits_nadam.yaml --watch
    trainctl submit --name quick --task digits --workers 2 --max-steps 50 --algorithm adamax
    trainctl list [--state RUNNING] [--label team=ml]
    trainctl get JOB_ID [--json]
    trainctl watch JOB_ID [--from-sequence N]
    trainctl logs JOB_ID [-f]
    trainctl cancel JOB_ID
    trainctl plot JOB_ID [-o run.png]

Connection flags (``--address``, ``--token``, ``--ca``, ``--client-cert``,
``--client-key``, ``--config``) fall back to ``ZEROTRAIN_*`` variables and
``~/.config/zerotrain/config.yaml`` (see :mod:`service.config`); the address
defaults to ``127.0.0.1:50051``.

Exit codes: 0 success (``watch``: the job SUCCEEDED); 1 the job FAILED or was
CANCELLED, or an unexpected server error; 2 bad input (usage, unreadable or
malformed job file, invalid spec: every bad field is printed); 3 no such job;
4 not authenticated or not allowed; 5 the server cannot be reached;
6 the request conflicts with the job's state (e.g. cancelling a finished job,
plotting a job with no metrics yet) or the cluster can never run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.api.zerotrain.v1 import job_service_pb2 as pb
from service.client import TERMINAL_STATES, ApiError, JobClient
from service.config import DEFAULT_ADDRESS, ConfigError
from service.convert import message_to_json, metrics_from_proto, state_name
from service.display import (
    STATE_STYLE,
    job_progress,
    progress_fields,
    state_markup,
    strip_ansi,
    summary_line,
)
from service.errors import SpecError
from service.spec import JobSpec, load_spec

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
_JSON_HELP = (
    "print the job as JSON: the API's field names as keys (stable across versions; "
    "fields at their default value are left out), numbers as you wrote them "
    '(128, not 128.0 or "128")'
)


class _UsageError(Exception):
    """Bad command-line input (exit 2)."""


# ------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``trainctl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="trainctl",
        description=f"zerotrain job service client (server: {DEFAULT_ADDRESS} unless --address, "
        "ZEROTRAIN_ADDRESS or the config file say otherwise)",
    )
    conn = parser.add_argument_group("connection")
    conn.add_argument(
        "--address", help=f"server host:port (default {DEFAULT_ADDRESS}; env ZEROTRAIN_ADDRESS)"
    )
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
    lst.add_argument("--state", choices=list(STATE_STYLE), help="only jobs in this state")
    lst.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    lst.add_argument("--owner", default="", help="admins: only this principal's jobs")
    lst.add_argument("--page-size", type=int, default=50)
    lst.add_argument("--all", action="store_true", help="follow page tokens to the end")
    lst.add_argument("--json", action="store_true", help=_JSON_HELP.replace("the job", "the jobs"))

    for name, text in (("get", "show a job"), ("cancel", "cancel a job")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("job_id")
        cmd.add_argument("--json", action="store_true", help=_JSON_HELP)

    watch = sub.add_parser("watch", help="live progress of a job until it ends")
    watch.add_argument("job_id")
    watch.add_argument("--from-sequence", type=int, default=0)

    logs = sub.add_parser("logs", help="a job's log")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming until it ends")

    plot = sub.add_parser(
        "plot",
        help="draw a job's metrics history into a PNG",
        description="Draw loss, gradient norm, update/param ratio, the optimizer's internals, "
        "throughput and state bytes per rank from the job's stored metrics records.",
    )
    plot.add_argument("job_id")
    plot.add_argument("-o", "--output", type=Path, help="PNG file to write (default JOB_ID.png)")
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
        ("state", state_markup(state)
                  + (f"  ({escape(job.state_reason)})" if job.state_reason else "")),
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


def _job_json(job: pb.Job) -> str:
    return json.dumps(message_to_json(job), indent=2)


# ----------------------------------------------------------------------- watch
def watch_job(
    client: JobClient, job_id: str, console: Console, *, from_sequence: int = 0
) -> pb.Job:
    """Show a live progress bar (step, loss, throughput) until the job ends.

    State changes are printed above the bar with their time; returns the
    finished job after printing a summary.
    """
    job = client.get(job_id)
    total = job.spec.training.max_steps or None
    with job_progress(console) as progress:
        bar = progress.add_task(
            "train", total=total, name=escape(job.spec.name or job_id), loss="-", rate=""
        )
        for event in client.watch(job_id, from_sequence):
            if event.HasField("metrics"):
                progress.update(bar, **progress_fields(metrics_from_proto(event.metrics)))
                continue
            change = event.state_change
            when = time.strftime("%H:%M:%S", time.localtime(event.time.seconds))
            reason = f": {escape(change.reason)}" if change.reason else ""
            progress.console.print(
                f"[dim]{when}[/] {state_markup(state_name(change.state))}{reason}"
            )
            if change.state in TERMINAL_STATES:
                break
    job = client.get(job_id)
    _print_summary(console, job)
    return job


def _print_summary(console: Console, job: pb.Job) -> None:
    seconds = None
    if job.HasField("started_at") and job.HasField("finished_at"):
        seconds = job.finished_at.ToNanoseconds() / 1e9 - job.started_at.ToNanoseconds() / 1e9
    metrics = metrics_from_proto(job.latest_metrics) if job.HasField("latest_metrics") else None
    console.print(
        summary_line(
            job.job_id, state_name(job.state), metrics, seconds=seconds, attempts=job.attempt
        )
    )
    if job.state_reason and job.state != pb.JOB_STATE_SUCCEEDED:
        console.print(f"reason: {escape(job.state_reason)}")


# ------------------------------------------------------------------------- list
# Columns of `trainctl list`, most important first: when the terminal is too
# narrow, the columns from the first one that does not fit on are dropped.
# NAME is cut (with "…") to the width left over, never below _NAME_MIN.
_LIST_COLUMNS = ("JOB", "STATE", "NAME", "STEP", "LOSS", "CREATED", "OWNER")
_RIGHT_ALIGNED = frozenset({"STEP", "LOSS"})
_NAME_MIN = 20
_GAP = 2


def _list_rows(jobs: Sequence[pb.Job]) -> list[dict[str, str]]:
    rows = []
    for job in jobs:
        m = job.latest_metrics if job.HasField("latest_metrics") else None
        rows.append({
            "JOB": job.job_id, "STATE": state_name(job.state), "NAME": job.spec.name,
            "STEP": f"{m.step}/{job.spec.training.max_steps}" if m is not None else "-",
            "LOSS": f"{m.loss:.4g}" if m is not None and m.HasField("loss") else "-",
            "CREATED": _short_time(job.created_at.seconds), "OWNER": job.owner,
        })  # fmt: skip
    return rows


def _short_time(seconds: int) -> str:
    if seconds == 0:
        return "-"
    same_year = time.localtime(seconds).tm_year == time.localtime().tm_year
    return time.strftime("%m-%d %H:%M" if same_year else "%Y-%m-%d", time.localtime(seconds))


def fit_columns(widths: dict[str, int], order: Sequence[str], total: int) -> dict[str, int]:
    """The leading columns of ``order`` that fit in ``total`` characters, with their widths.

    ``widths`` holds each column's natural width (its widest cell or header).
    Columns are taken in ``order`` until one does not fit with NAME at least
    ``_NAME_MIN`` wide (or its natural width if smaller); NAME then gets the
    width left over, up to its natural width. The first column is always kept.
    """

    def need(columns: list[str]) -> int:
        fixed = sum(widths[c] for c in columns if c != "NAME")
        name = min(widths["NAME"], _NAME_MIN) if "NAME" in columns else 0
        return fixed + name + _GAP * (len(columns) - 1)

    chosen = [order[0]]
    for column in order[1:]:
        if need([*chosen, column]) > total:
            break
        chosen.append(column)
    fitted = {c: widths[c] for c in chosen}
    if "NAME" in fitted:
        spare = total - need([c for c in chosen if c != "NAME"]) - _GAP
        fitted["NAME"] = max(min(widths["NAME"], spare), min(widths["NAME"], _NAME_MIN))
    return fitted


def _print_list(console: Console, jobs: Sequence[pb.Job]) -> None:
    if not jobs:
        console.print("no jobs", style="dim")
        return
    rows = _list_rows(jobs)
    order = list(_LIST_COLUMNS)
    if len({row["OWNER"] for row in rows}) > 1:  # an admin's list: who owns what matters
        order.remove("OWNER")
        order.insert(order.index("NAME") + 1, "OWNER")
    natural = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in order}
    widths = fit_columns(natural, order, console.width)
    columns = [c for c in order if c in widths]

    def cell(column: str, text: str, header: bool = False) -> str:
        width = widths[column]
        if len(text) > width:
            text = text[: width - 1] + "…"
        padded = text.rjust(width) if column in _RIGHT_ALIGNED and not header else text.ljust(width)
        if column == "STATE" and not header:
            return f"[{STATE_STYLE.get(text, '')}]{padded}[/]"
        return escape(padded)

    gap = " " * _GAP
    console.print("[bold]" + gap.join(cell(c, c, True) for c in columns).rstrip() + "[/]",
                  soft_wrap=True)  # fmt: skip
    for row in rows:
        console.print(gap.join(cell(c, row[c]) for c in columns).rstrip(), soft_wrap=True)


# ------------------------------------------------------------------------ main
def _run(args: argparse.Namespace, client: JobClient, console: Console) -> int:
    """Run the command; API failures raise :class:`ApiError` (the client stays open)."""
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
            print(json.dumps([message_to_json(j) for j in jobs], indent=2))
            return EXIT_OK
        _print_list(console, jobs)
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
        plain = not sys.stdout.isatty()  # colour codes only make sense on a terminal
        for line in client.logs(args.job_id, follow=args.follow):
            print(strip_ansi(line) if plain else line, flush=True)
        return EXIT_OK
    if args.command == "plot":
        return _plot(client, args.job_id, args.output, console)
    raise _UsageError(f"unknown command {args.command!r}")


def _plot(client: JobClient, job_id: str, output: Path | None, console: Console) -> int:
    from service.history import fetch_history
    from service.plot import plot_history

    history = fetch_history(client, job_id)
    path = output or Path(f"{job_id}.png")
    panels = plot_history(history, path)
    cut = " (the oldest were dropped by the server's cap)" if history.truncated else ""
    console.print(
        f"wrote {escape(str(path))}: {len(history.records)} metrics records{cut}; "
        f"{', '.join(panels)}"
    )
    return EXIT_OK


def _api_error(err: Console, exc: ApiError, client: JobClient) -> int:
    """Say what failed and what to do about it; return the exit code."""
    address = client.config.address
    code = exc.code
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # The server's message speaks of gRPC metadata; a trainctl user has flags.
        if client.config.token:
            hint = ("the server rejected the token: check --token / ZEROTRAIN_TOKEN "
                    "(or the config file's token) against the server's tokens file")  # fmt: skip
        else:
            hint = ("no token given: pass --token TOKEN or set ZEROTRAIN_TOKEN "
                    "(a token from the server's tokens file)")  # fmt: skip
        err.print(f"[red]error:[/] UNAUTHENTICATED: {hint}")
    elif code == grpc.StatusCode.UNAVAILABLE and not client.server_reachable():
        tls = "" if client.config.tls else "; if it uses TLS, pass --ca"
        err.print(f"[red]error:[/] UNAVAILABLE: cannot connect: is zerotrain-serve running at "
                  f"{escape(address)}? (--address or ZEROTRAIN_ADDRESS to use another{tls})")  # fmt: skip
        err.print(f"  {exc.details}", markup=False, style="dim")
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        err.print(f"[red]error:[/] DEADLINE_EXCEEDED: the server at {escape(address)} did not "
                  "answer in time (--timeout to wait longer)")  # fmt: skip
    else:
        err.print(f"[red]error:[/] {code.name}: ", end="")
        err.print(exc.details, markup=False)
        if code == grpc.StatusCode.NOT_FOUND:
            err.print("  (trainctl list shows your jobs)", style="dim")
    return EXIT_CODES.get(code, EXIT_JOB_FAILED)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trainctl``; returns the exit code (see the module docstring)."""
    from service.history import NoMetrics
    from service.plot import PlotUnavailable

    args = build_parser().parse_args(argv)
    # soft_wrap: a long line stays one line in a pipe or file (the terminal wraps it).
    console = Console(stderr=False, highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
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
            try:
                return _run(args, client, console)
            except ApiError as exc:
                return _api_error(err, exc, client)  # may ask the server: before close
    except SpecError as exc:
        err.print("[red]error:[/] invalid job spec:", markup=True)
        for line in exc.errors:
            err.print(f"  {line}", markup=False)
        return EXIT_USAGE
    except (_UsageError, ConfigError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True)
        return EXIT_USAGE
    except NoMetrics as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True)
        return EXIT_CONFLICT
    except PlotUnavailable as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True)
        return EXIT_JOB_FAILED
    except OSError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
