"""``python -m service.runtime``: run one job on the current Ray cluster (or a local one).

    python -m service.runtime --spec job.yaml [--job-id ID] [--storage PATH_OR_URI]
    python -m service.runtime --spec-json '{"name": ..., "task": ...}' [--allow-custom-tasks]

Exits 0 on success; otherwise non-zero with one line ``zerotrain: error: <reason>``
on stderr (2: invalid spec or arguments, 1: training failed). This is what the
service submits as a Ray job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

from service.spec import JobSpec, SpecError, load_spec

__all__ = ["main"]

RESULT_PREFIX = "ZEROTRAIN_RESULT "
"""Prefix of the final summary line on stdout (the rest is one JSON object)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.runtime", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="job spec file (YAML or JSON)")
    source.add_argument("--spec-json", help="job spec as a JSON string")
    parser.add_argument("--job-id", help="run id: names the run directory (default: generated)")
    parser.add_argument(
        "--storage",
        help="checkpoint storage path or URI (default: $ZEROTRAIN_DATA_DIR/runs or ~/zerotrain/runs)",
    )
    parser.add_argument(
        "--allow-custom-tasks", action="store_true", help="allow package.module:function tasks"
    )
    parser.add_argument("--metrics-file", help="also append metrics records to this JSONL file")
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

    from service.runtime.trainer import check_job, resolve_storage, run_job

    try:
        check_job(spec, job_id=job_id, allow_custom_tasks=args.allow_custom_tasks)
    except (SpecError, ValueError) as exc:
        return _fail(str(exc), 2)
    try:
        _connect_ray()
        result = run_job(
            spec,
            job_id=job_id,
            storage=args.storage,
            allow_custom_tasks=args.allow_custom_tasks,
            metrics_file=args.metrics_file,
        )
    except SpecError as exc:
        return _fail(str(exc), 2)
    except ValueError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:
        return _fail(f"job {job_id} failed: {_root_cause(exc)}", 1)
    error = getattr(result, "error", None)
    if error is not None:
        return _fail(f"job {job_id} failed: {_root_cause(error)}", 1)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    summary = {
        "job_id": job_id,
        "storage": str(Path(resolve_storage(args.storage)) / job_id)
        if "://" not in resolve_storage(args.storage)
        else f"{resolve_storage(args.storage).rstrip('/')}/{job_id}",
        "checkpoint": checkpoint,
        "metrics": dict(result.metrics or {}),
    }
    print(RESULT_PREFIX + json.dumps(summary, default=str), flush=True)
    return 0


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
