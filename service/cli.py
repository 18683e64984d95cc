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
``~/.config/zerotrain/config.yaml`` (see :mod:`zerotrain.service.config`); the address
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape

from zerotrain.service.cli_views import job_json, print_job, print_list, watch_job
from zerotrain.service.client import ApiError, JobClient
from zerotrain.service.config import DEFAULT_ADDRESS, ConfigError
from zerotrain.service.convert_json import job_to_json
from zerotrain.service.display import STATE_STYLE, strip_ansi
from zerotrain.service.errors import SpecError
from zerotrain.service.model import JobState
from zerotrain.service.spec import JobSpec, load_spec

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


# ------------------------------------------------------------------------ main
def _run(args: argparse.Namespace, client: JobClient, console: Console) -> int:
    """Run the command; API failures raise :class:`ApiError` (the client stays open)."""
    if args.command == "submit":
        spec = _spec_from_args(args)
        job = client.submit(spec, idempotency_key=args.idempotency_key)
        console.print(f"submitted {job.job_id} ({job.state.value})")
        if args.watch:
            job = watch_job(client, job.job_id, console)
            return EXIT_OK if job.state == JobState.SUCCEEDED else EXIT_JOB_FAILED
        return EXIT_OK
    if args.command == "list":
        state = JobState(args.state) if args.state else None
        filters = {"state": state, "labels": _pairs(args.label, "--label"), "owner": args.owner}
        if args.all:
            jobs = list(client.list_all(page_size=args.page_size, **filters))
            token = ""
        else:
            jobs, token = client.list(page_size=args.page_size, **filters)
        if args.json:
            print(json.dumps([job_to_json(j) for j in jobs], indent=2))
            return EXIT_OK
        print_list(console, jobs)
        if token:
            console.print(f"[dim]more: --all, or the next page token {token}[/]")
        return EXIT_OK
    if args.command in ("get", "cancel"):
        job = client.get(args.job_id) if args.command == "get" else client.cancel(args.job_id)
        if args.json:
            print(job_json(job))
        else:
            print_job(console, job)
        return EXIT_OK
    if args.command == "watch":
        job = watch_job(client, args.job_id, console, from_sequence=args.from_sequence)
        return EXIT_OK if job.state == JobState.SUCCEEDED else EXIT_JOB_FAILED
    if args.command == "logs":
        plain = not sys.stdout.isatty()  # colour codes only make sense on a terminal
        for line in client.logs(args.job_id, follow=args.follow):
            print(strip_ansi(line) if plain else line, flush=True)
        return EXIT_OK
    if args.command == "plot":
        return _plot(client, args.job_id, args.output, console)
    raise _UsageError(f"unknown command {args.command!r}")


def _plot(client: JobClient, job_id: str, output: Path | None, console: Console) -> int:
    from zerotrain.service.history import fetch_history
    from zerotrain.service.plot import plot_history

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
    from zerotrain.service.history import NoMetrics
    from zerotrain.service.plot import PlotUnavailable

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
