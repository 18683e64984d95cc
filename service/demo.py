"""``make demo``: the whole system on one machine, start to finish.

Starts the service with an embedded local Ray head (dashboard included) on
free ports, with a fresh data dir and a generated token; submits
``examples/digits_nadam.yaml`` (digits, Nadam, 2 workers, ZeRO stage 2) over
gRPC; shows live progress; prints the final loss and accuracy, a sample of
the Prometheus metrics and where everything is stored; draws the run
(``trainctl plot``) into the data dir; then shuts it all down.
``--keep-running`` leaves the service up (Ctrl-C to stop) so you can
point ``trainctl``, Prometheus or a browser at it.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from rich.console import Console

from zerotrain.service.app import Service, ray_temp_dir
from zerotrain.service.cli_views import watch_job
from zerotrain.service.client import JobClient
from zerotrain.service.config import ServerConfig
from zerotrain.service.history import NoMetrics, fetch_history
from zerotrain.service.model import JobState
from zerotrain.service.plot import PlotUnavailable, plot_history

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = REPO_ROOT / "examples" / "digits_nadam.yaml"
# Series worth showing from the scrape (prefixes of metric names).
_SHOWN = (
    "zerotrain_training_loss",
    "zerotrain_training_accuracy_ratio",
    "zerotrain_training_samples_per_second",
    "zerotrain_training_grad_norm",
    "zerotrain_training_update_param_ratio",
    "zerotrain_nadam_mu_t",
    "zerotrain_training_optimizer_state_bytes",
    "zerotrain_jobs{",
)


def _scrape(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [line for line in text.splitlines() if line.startswith(_SHOWN)]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when the job succeeded."""
    parser = argparse.ArgumentParser(
        prog="python -m zerotrain.service.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--spec", type=Path, default=DEFAULT_SPEC, help="job file (default: %(default)s)"
    )
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the service up until Ctrl-C"
    )
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data_dir = Path(tempfile.mkdtemp(prefix="zerotrain-demo-"))
    token = secrets.token_urlsafe(24)
    tokens_file = data_dir / "tokens.yaml"
    tokens_file.write_text(f"tokens:\n  - {{token: {token}, principal: demo, admin: true}}\n")
    tokens_file.chmod(0o600)
    config = ServerConfig(
        address="127.0.0.1:0", metrics_port=0, health_port=0, data_dir=data_dir,
        tokens_file=tokens_file,
    )

    started = time.monotonic()
    succeeded = False
    console.print("[bold]zerotrain demo[/]: starting the service and an embedded Ray head ...")
    service = Service(config)
    try:
        service.start()
        console.print(f"  gRPC      {service.address}  (token in {tokens_file})")
        console.print(f"  metrics   http://127.0.0.1:{service.metrics_port}/metrics")
        console.print(f"  Ray       {service.ray_address}  (dashboard)")
        console.print(f"  data dir  {data_dir}  ({time.monotonic() - started:.0f} s to start)")

        with JobClient(service.address, token=token) as client:
            job = client.submit(args.spec)
            console.print(f"\nsubmitted [bold]{job.job_id}[/] from {args.spec}")
            job = watch_job(client, job.job_id, console)

            console.print()
            if (m := job.latest_metrics) is not None:
                accuracy = f", accuracy {m['accuracy']:.3f}" if "accuracy" in m else ""
                loss = m.get("loss", 0.0)
                console.print(f"[bold]final[/]: step {m.get('step', 0)}, loss {loss:.4f}{accuracy}")
            console.print("[bold]Prometheus sample[/] (what Grafana's dashboard plots):")
            for line in _scrape(service.metrics_port or 0)[:14]:
                console.print(f"  {line}", markup=False)
            console.print("\n[bold]where things are[/]:")
            console.print(f"  job records and every metrics event: {data_dir / 'jobs.db'} (SQLite)")
            console.print(f"  checkpoints: {data_dir / 'runs' / job.job_id}")
            if job.checkpoint is not None:
                console.print(
                    f"  last checkpoint: step {job.checkpoint.step} at {job.checkpoint.path}"
                )
            console.print("  dashboards: deploy/grafana (scrape the metrics endpoint above)")
            picture = data_dir / f"{job.job_id}.png"
            try:
                plot_history(fetch_history(client, job.job_id), picture)
                console.print(f"  a picture of the run: {picture} (trainctl plot)")
            except (PlotUnavailable, NoMetrics) as exc:
                console.print(f"  no picture of the run: {exc}")

            if args.keep_running:
                console.print(
                    f"\nservice left running: trainctl --address {service.address} "
                    f"--token {token} list    (Ctrl-C to stop)"
                )
                stop = threading.Event()
                signal.signal(signal.SIGINT, lambda *_: stop.set())
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                stop.wait()
        succeeded = job.state == JobState.SUCCEEDED
    finally:
        console.print("\nshutting down ...")
        service.stop()
    if succeeded:  # the embedded head's logs are only worth keeping after a failure
        shutil.rmtree(ray_temp_dir(data_dir.resolve()), ignore_errors=True)
    console.print(
        f"done in {time.monotonic() - started:.0f} s; data kept in {data_dir} "
        "(remove it when you are done)"
    )
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
