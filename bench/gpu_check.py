"""GPU check: zerotrain's CUDA and NCCL paths, checked in one run on a machine with GPUs.

Four sections, each independent (a failure is recorded with its exception and
the next check runs):

* ``parity``: ``optim.Adamax`` / ``optim.Nadam`` (for-loop, foreach, capturable)
  against ``torch.optim.Adamax`` / ``NAdam`` with the same options, fp32, 30 steps
  on the same gradients of a small MLP (expected bitwise); ``ZeroOptimizer``
  (one process) against torch.optim, with fp32 parameters and with bf16
  parameters over an fp32 master (against an fp32 torch reference); the fused
  ``compile=True`` step against the eager one.
* ``timing``: one optimizer step on a GPT-like parameter list (148 tensors,
  10.6M parameters): torch.optim foreach, ``fused=True`` where torch has it,
  ``torch.compile``d torch.optim, our drop-in foreach, our flat eager and
  fused steps, and the copy floor (28 B/param); CUDA events, median of 50.
* ``nccl``: ``ZeroOptimizer`` on an NCCL group (one rank, or one per GPU with
  ``--world all``), both ``grad_sync`` modes: parity with torch.optim on the
  rank-averaged gradient, reduce-scattered buckets freed during backward, and
  device-to-host synchronisations per step (``torch.cuda.set_sync_debug_mode``).
* ``service``: the gRPC service with an embedded local Ray runs a small digits
  job with ``use_gpu: true`` to SUCCEEDED, and a metrics record arrives.

About 5 minutes on one GPU, most of it building fused kernels and starting Ray
(budget: 8 minutes); ``--quick`` shrinks every section. ``--device cpu`` is a
smoke mode for machines without a GPU: gloo instead of NCCL, no capturable
step, no sync counting, no GPU in the job.

    make gpu-check
    .venv/bin/python bench/gpu_check.py [--only parity,timing,nccl,service] [--world all] [--quick]
    .venv/bin/python bench/gpu_check.py --device cpu --quick --only parity,timing,nccl

Prints a table and writes bench/results/gpu_check.json (after every section).
Exit status: 0 every check passed, 1 some check failed, 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_check_group import Row, guard, run_group  # bench/ is this script's directory
from gpu_check_optim import check_parity, check_timing

from zerotrain.optim import functional

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = ("parity", "timing", "nccl", "service")
RESULTS = ROOT / "bench" / "results" / "gpu_check.json"


# ------------------------------------------------------------------ service


def check_service(device: torch.device, max_steps: int, timeout_s: float) -> list[Row]:
    """A digits job with ``use_gpu`` (on CUDA) through the service with an embedded Ray."""
    import yaml

    from zerotrain.service.app import Service, ray_temp_dir
    from zerotrain.service.config import ServerConfig

    use_gpu = device.type == "cuda"
    spec = yaml.safe_load((ROOT / "examples" / "digits_nadam.yaml").read_text())
    spec.update(name="gpu-check-digits", labels={"suite": "gpu-check"},
                scaling={"num_workers": 1, "cpus_per_worker": 1, "use_gpu": use_gpu})  # fmt: skip
    spec["training"].update(max_steps=max_steps, metrics_every=10, checkpoint_every=0)
    data_dir = Path(tempfile.mkdtemp(prefix="zerotrain-gpu-check-"))
    token = secrets.token_urlsafe(24)
    tokens = data_dir / "tokens.yaml"
    tokens.write_text(f"tokens:\n  - {{token: {token}, principal: gpu-check, admin: true}}\n")
    tokens.chmod(0o600)
    # Every port free (the health port's default 50052 is fixed): no clash with a running server.
    config = ServerConfig(address="127.0.0.1:0", metrics_port=-1, health_port=0,
                          data_dir=data_dir, tokens_file=tokens)  # fmt: skip
    rows: list[Row] = []
    service = Service(config)
    try:
        failed = guard("service and job", _run_job, rows, service, token, spec, timeout_s)
    finally:
        service.stop()
    if failed is None and all(row["ok"] is not False for row in rows):
        shutil.rmtree(ray_temp_dir(data_dir.resolve()), ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        rows += [failed] if failed else []
        rows.append({"check": "data dir kept for inspection", "ok": None, "detail": str(data_dir)})
    return rows


def _run_job(rows: list[Row], service: Any, token: str, spec: dict[str, Any], timeout_s: float) -> None:
    """Start ``service``, submit ``spec``, wait for the end; rows appended as they are known."""
    from zerotrain.service.client import TERMINAL_STATES, JobClient
    from zerotrain.service.model import JobState

    use_gpu = spec["scaling"]["use_gpu"]
    started = time.monotonic()
    service.start()
    gpus = service.manager.ray.cluster_resources().total_gpus
    rows.append({"check": "service + embedded Ray started", "ok": gpus >= 1 if use_gpu else None,
                 "start_s": time.monotonic() - started, "ray_gpus": gpus,
                 "detail": f"{time.monotonic() - started:.0f} s; Ray sees {gpus:g} GPU(s)"})  # fmt: skip
    with JobClient(service.address, token=token) as client:
        job = client.submit(spec)
        deadline = time.monotonic() + timeout_s
        while (job := client.get(job.job_id)).state not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                client.cancel(job.job_id)
                raise TimeoutError(f"job {job.job_id} still JOB_STATE_{job.state.value} "
                                   f"after {timeout_s:.0f} s (cancelled)")  # fmt: skip
            time.sleep(0.5)
        events = list(client.watch(job.job_id))  # a finished job's events, replayed
        log_tail = [] if job.state == JobState.SUCCEEDED else list(client.logs(job.job_id))[-30:]
    created = job.created_at
    seconds = job.finished_at - created
    state = job.state.value
    reason = f": {job.state_reason}" if job.state_reason else ""
    rows.append({"check": f"digits job, use_gpu={use_gpu}, {spec['training']['max_steps']} steps",
                 "ok": state == "SUCCEEDED", "state": state, "job_s": seconds, "log_tail": log_tail,
                 "detail": f"{state} in {seconds:.1f} s after submission{reason}"})  # fmt: skip
    records = [e for e in events if e.kind == "metrics"]
    first = records[0].time - created if records else None
    m = job.latest_metrics or {}
    detail = (f"{len(records)} record(s), the first {first:.1f} s after submission; last: step "
              f"{m.get('step', 0)}, loss {m.get('loss', 0.0):.4f}, world {m.get('world_size', 0)}"
              if records
              else "no metrics record arrived")  # fmt: skip
    rows.append({"check": "metrics records arrived", "ok": bool(records), "records": len(records),
                 "first_record_s": first, "detail": detail})  # fmt: skip


# ------------------------------------------------------------------ running


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections to run (default: %(default)s)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the smoke mode (gloo, no capturable, no sync counting)")
    parser.add_argument("--world", default="1",
                        help="ranks of the nccl section: a number, or 'all' (every visible GPU; "
                             "2 with --device cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, a smaller timing model")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON report (default: %(default)s)")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.world != "all" and not (args.world.isdigit() and int(args.world) >= 1):
        parser.error(f"--world: a number >= 1 or 'all', got {args.world!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections; 0 all passed, 1 a check failed, 2 no CUDA device."""
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); run it on a GPU machine with a CUDA build of torch "
              "(README: GPU builds), or pass --device cpu for the CPU smoke mode", file=sys.stderr)  # fmt: skip
        return 2
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    world = (torch.cuda.device_count() if cuda else 2) if args.world == "all" else int(args.world)
    if cuda and world > torch.cuda.device_count():
        print(f"gpu-check: --world {world} needs {world} GPUs, {torch.cuda.device_count()} visible",
              file=sys.stderr)  # fmt: skip
        return 2
    quick = args.quick
    sections: dict[str, Callable[[], list[Row]]] = {
        "parity": lambda: check_parity(device, steps=10 if quick else 30),
        "timing": lambda: check_timing(device, quick, repeats=10 if quick else 50,
                                       warmup=3 if quick else 5),
        "nccl": lambda: run_group(args.device, world, steps=6 if quick else 12, timeout_s=240),
        "service": lambda: check_service(device, max_steps=20 if quick else 40, timeout_s=300),
    }
    report: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "device": str(device), "world": world, "quick": quick,
                              "machine": _machine(), "sections": {}}  # fmt: skip
    _print_header(report)
    for name in args.only:
        print(f"\n== {name}", flush=True)
        started = time.monotonic()
        rows = guard(name, sections[name])
        rows = rows if isinstance(rows, list) else [rows]
        seconds = time.monotonic() - started
        report["sections"][name] = {"seconds": seconds, "rows": rows}
        for row in rows:
            mark = {True: "PASS", False: "FAIL", None: "  --"}[row["ok"]]
            print(f"  {mark}  {row['check']:<64} {row['detail']}", flush=True)
        print(f"  ({seconds:.0f} s)")
        _write_json(args.out, report)  # after every section: a later crash keeps these
    failed = [f"{s}: {r['check']}" for s, sec in report["sections"].items() for r in sec["rows"]
              if r["ok"] is False]  # fmt: skip
    total = sum(sec["seconds"] for sec in report["sections"].values())
    print(f"\n{len(failed)} check(s) failed in {total:.0f} s; report in {args.out}")
    for line in failed:
        print(f"  FAIL {line}")
    return 1 if failed else 0


def _machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and torch.distributed.is_nccl_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpus": os.cpu_count(),
        "compile_available": functional.compile_available(),
    }


def _print_header(report: dict[str, Any]) -> None:
    m = report["machine"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    print(f"gpu-check on {report['device']} (world {report['world']}{', quick' if report['quick'] else ''}): "
          f"{gpus}; torch {m['torch']}, CUDA {m['cuda']}, NCCL {m['nccl']}, "
          f"torch.compile {'works' if m['compile_available'] else 'UNAVAILABLE'}")  # fmt: skip


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=2, default=str)
        tmp = Path(f.name)
    tmp.chmod(0o644)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


if __name__ == "__main__":
    raise SystemExit(main())
