"""``python -m zerotrain.service.runtime``: run one job on the current Ray cluster (or a local one).

    python -m zerotrain.service.runtime --spec job.yaml [--job-id ID] [--storage PATH_OR_URI] [--verbose]
    python -m zerotrain.service.runtime --spec-json '{"name": ..., "task": ...}' [--allow-custom-tasks]

A person sees what ``trainctl submit --watch`` shows: a progress bar, then a
summary (loss, accuracy, throughput, where the checkpoint is). Everything Ray
prints goes to ``ray.log`` in the run directory (``<storage>/<job_id>/``);
``--verbose`` also shows it. ``--machine`` is for the service, which runs
this as a Ray job and reads its output: Ray's output as it comes, the
``ZEROTRAIN_METRICS`` lines of rank 0 and a last ``ZEROTRAIN_RESULT`` line.

Exits 0 on success; otherwise non-zero with one line ``zerotrain: error: <reason>``
on stderr (2: invalid spec or arguments, 1: training failed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

from zerotrain.service.errors import SpecError
from zerotrain.service.spec import JobSpec, load_spec

__all__ = ["main"]

RESULT_PREFIX = "ZEROTRAIN_RESULT "
"""Prefix of the final summary line on stdout (the rest is one JSON object)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zerotrain.service.runtime", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="job spec file (YAML or JSON)")
    source.add_argument("--spec-json", help="job spec as a JSON string")
    parser.add_argument("--job-id", help="run id: names the run directory (default: generated)")
    parser.add_argument(
        "--storage",
        help="where runs go: a path or a URI Ray's storage accepts; the run directory is "
        "STORAGE/JOB_ID (default: ./runs)",
    )
    parser.add_argument(
        "--allow-custom-tasks", action="store_true", help="allow package.module:function tasks"
    )
    parser.add_argument("--metrics-file", help="also append metrics records to this JSONL file")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--verbose", "-v", action="store_true", help="also show Ray's output (always in ray.log)"
    )
    output.add_argument(
        "--machine",
        action="store_true",
        help="output for programs (the service): Ray's output, ZEROTRAIN_METRICS lines and a "
        "final ZEROTRAIN_RESULT line, no progress bar",
    )
    return parser


def _fail(message: str, code: int) -> int:
    print(f"zerotrain: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


def _load(args: argparse.Namespace) -> JobSpec:
    if args.spec is not None:
        return load_spec(args.spec)
    try:
        data = json.loads(args.spec_json)
    except json.JSONDecodeError as exc:
        raise SpecError([f"--spec-json: malformed JSON: {exc.msg} (line {exc.lineno})"]) from exc
    return JobSpec.from_dict(data)


def _connect_ray() -> None:
    # Ray folds log lines that look alike from several processes into one; our
    # machine-readable lines must all arrive (read when Ray is imported).
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", "ZEROTRAIN_")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError):
        # No cluster running (or a stale ray_current_cluster file): start a local one.
        ray.init(include_dashboard=False, log_to_driver=True)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the job, return the process exit code."""
    args = _parser().parse_args(argv)
    try:
        spec = _load(args)
    except SpecError as exc:
        return _fail(str(exc), 2)
    job_id = args.job_id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    from zerotrain.service.runtime.trainer import check_job

    try:
        check_job(spec, job_id=job_id, allow_custom_tasks=args.allow_custom_tasks)
    except (SpecError, ValueError) as exc:
        return _fail(str(exc), 2)
    if args.machine:
        return _run_for_programs(spec, job_id, args)
    return _run_for_a_person(spec, job_id, args)


def _run(spec: JobSpec, job_id: str, args: argparse.Namespace) -> Any:
    """Connect to Ray and run the job; returns the ``ray.train.Result``."""
    from zerotrain.service.runtime.trainer import run_job

    _connect_ray()
    return run_job(
        spec,
        job_id=job_id,
        storage=args.storage,
        allow_custom_tasks=args.allow_custom_tasks,
        metrics_file=args.metrics_file,
    )


def _error(job_id: str, result: Any, failure: Exception | None) -> tuple[str, int] | None:
    """``(message, exit code)`` of a failed run, ``None`` for a successful one."""
    if isinstance(failure, SpecError | ValueError):
        return str(failure), 2
    if failure is None:
        failure = getattr(result, "error", None)
    if failure is None:
        return None
    return f"job {job_id} failed: {_root_cause(failure)}", 1


def _run_for_programs(spec: JobSpec, job_id: str, args: argparse.Namespace) -> int:
    from zerotrain.service.runtime.trainer import run_directory

    result: Any = None
    failure: Exception | None = None
    try:
        result = _run(spec, job_id, args)
    except Exception as exc:
        failure = exc
    error = _error(job_id, result, failure)
    if error is not None:
        return _fail(*error)
    summary = {
        "job_id": job_id,
        "storage": run_directory(args.storage, job_id),
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "metrics": dict(result.metrics or {}),
    }
    print(RESULT_PREFIX + json.dumps(summary, default=str), flush=True)
    return 0


def _run_for_a_person(spec: JobSpec, job_id: str, args: argparse.Namespace) -> int:
    from rich.console import Console

    from zerotrain.service.runtime.capture import OutputCapture, terminal
    from zerotrain.service.runtime.console import RunOutcome, RunView
    from zerotrain.service.runtime.trainer import local_run_directory, run_directory

    log_path = local_run_directory(args.storage, job_id) / "ray.log"
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"--storage: cannot create {log_path.parent}: {exc.strerror}", 2)
    console = Console(file=terminal(), highlight=False, soft_wrap=True)
    view = RunView(console, spec, job_id, log_path, verbose=args.verbose)
    view.header(run_directory(args.storage, job_id))
    started = time.monotonic()
    result: Any = None
    failure: Exception | None = None
    try:
        with view, OutputCapture(log_path, view.on_line):
            try:
                result = _run(spec, job_id, args)
            except Exception as exc:
                failure = exc
            finally:
                _disconnect_ray()  # inside the capture: Ray says goodbye on stderr too
    except KeyboardInterrupt:
        console.print(f"interrupted; Ray's log: {log_path}")
        return 130
    seconds = time.monotonic() - started
    error = _error(job_id, result, failure)
    if error is not None:
        view.finish(RunOutcome("FAILED", seconds))  # the reason follows on stderr
        return _fail(*error)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    view.finish(RunOutcome("SUCCEEDED", seconds, checkpoint, result_metrics=result.metrics))
    return 0


def _disconnect_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _root_cause(exc: BaseException) -> str:
    """The innermost useful message of a (Ray-wrapped) exception, on one line."""
    seen = set()
    while True:
        inner = exc.__cause__ or getattr(exc, "cause", None)
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        seen.add(id(exc))
        exc = inner
    text = str(exc).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {last.strip()}" if type(exc).__name__ not in last else last


if __name__ == "__main__":
    sys.exit(main())
