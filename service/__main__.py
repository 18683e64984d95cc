"""``python -m zerotrain.service serve`` (console script ``zerotrain-serve``): run the service.

Every flag falls back to an environment variable (see :mod:`zerotrain.service.config`).
SIGHUP re-reads the tokens file (rotation without a restart; a bad file keeps
the current tokens). Runs until SIGTERM or SIGINT, then stops serving (open
streams get a few seconds of grace), stops the job manager and, unless
``--keep-ray``, the embedded Ray head, printing each step and a final
``zerotrain: stopped``. Jobs on an external cluster keep running; a restarted
service re-attaches to them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from zerotrain.service.config import (
    DEFAULT_ADDRESS,
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    ConfigError,
    ServerConfig,
    env_flag,
)

__all__ = ["CONSOLE_SCRIPT", "build_parser", "main"]

log = logging.getLogger("service")

CONSOLE_SCRIPT = "zerotrain-serve"
"""The console script's name (pyproject.toml); it runs ``serve``."""


def build_parser(prog: str = "python -m zerotrain.service") -> argparse.ArgumentParser:
    """The command-line parser (``serve`` is the only command, and the default).

    ``prog`` is the command the user typed: ``zerotrain-serve`` (the console
    script, which means ``serve``) or ``python -m zerotrain.service``.
    """
    description = "zerotrain job service (gRPC control plane)"
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser(
        "serve",
        help="run the gRPC job service",
        description=description,
        prog=prog if prog == CONSOLE_SCRIPT else f"{prog} serve",
    )
    add = serve.add_argument
    add("--address", "--listen", help=f"gRPC listen host:port (default {DEFAULT_ADDRESS}; "
        "env ZEROTRAIN_LISTEN_ADDRESS)")  # fmt: skip
    add("--metrics-port", type=int, help=f"Prometheus /metrics port (default "
        f"{DEFAULT_METRICS_PORT}; 0: any free port; -1: off; env ZEROTRAIN_METRICS_PORT)")  # fmt: skip
    add("--data-dir", type=Path, help="SQLite job store and checkpoints "
        "(default ~/.local/share/zerotrain; env ZEROTRAIN_DATA_DIR)")  # fmt: skip
    add("--ray-address", help="dashboard address of an existing Ray cluster, e.g. "
        "http://head:8265 (default: start an embedded local head; env ZEROTRAIN_RAY_ADDRESS)")  # fmt: skip
    add("--ray-num-cpus", type=int, help="CPUs of the embedded Ray head (default: all; "
        "env ZEROTRAIN_RAY_NUM_CPUS)")  # fmt: skip
    add("--keep-ray", action="store_true", default=None,
        help="leave the embedded Ray head and its jobs running on exit (env ZEROTRAIN_KEEP_RAY)")  # fmt: skip
    add("--tokens-file", type=Path, help="YAML/JSON file of bearer tokens -> principals "
        "(env ZEROTRAIN_TOKENS_FILE)")  # fmt: skip
    add("--tls-cert", type=Path, help="PEM server certificate chain (env ZEROTRAIN_TLS_CERT)")
    add("--tls-key", type=Path, help="PEM server private key (env ZEROTRAIN_TLS_KEY)")
    add("--tls-client-ca", type=Path, help="PEM CA for client certificates: mutual TLS "
        "(env ZEROTRAIN_TLS_CLIENT_CA)")  # fmt: skip
    add("--ingest-address", help="host:port the workers reach this service at "
        "(default: the bound address; env ZEROTRAIN_INGEST_ADVERTISE)")  # fmt: skip
    add("--ingest-ca", type=Path, help="PEM CA file the workers verify this server's TLS "
        "certificate with (default: --tls-cert; env ZEROTRAIN_INGEST_CA_FILE)")  # fmt: skip
    add("--ingest-port", type=int, help="with mutual TLS: port of the ReportMetrics-only "
        "server-TLS listener for workers (default 0: any free; env ZEROTRAIN_INGEST_PORT)")  # fmt: skip
    add("--health-port", type=int, help=f"plaintext grpc.health.v1-only port for probes, on the "
        f"host of --address and outside the API's call budget (default {DEFAULT_HEALTH_PORT}; "
        "0: any free port; -1: off; env ZEROTRAIN_HEALTH_PORT)")  # fmt: skip
    add("--max-streams-per-principal", type=int, help="open WatchJob/StreamLogs streams one "
        f"principal may hold (default {ServerConfig.max_streams_per_principal}; "
        "env ZEROTRAIN_MAX_STREAMS_PER_PRINCIPAL)")  # fmt: skip
    add("--max-calls-per-principal", type=int, help="unary calls one principal may have in "
        f"flight (default {ServerConfig.max_calls_per_principal}; "
        "env ZEROTRAIN_MAX_CALLS_PER_PRINCIPAL)")  # fmt: skip
    add("--max-streams", type=int, help="open streams of all principals together; the rest of "
        f"the server's threads is kept for unary calls and ingestion (default "
        f"{ServerConfig.max_streams}; env ZEROTRAIN_MAX_STREAMS)")  # fmt: skip
    add("--min-cpus-per-worker", type=float, help="smallest scaling.cpus_per_worker a job may "
        f"ask for (default {ServerConfig.min_cpus_per_worker:g}; "
        "env ZEROTRAIN_MIN_CPUS_PER_WORKER)")  # fmt: skip
    add("--max-workers-per-job", type=int, help="largest scaling.num_workers a job may ask for "
        f"(default {ServerConfig.max_workers_per_job}; env ZEROTRAIN_MAX_WORKERS_PER_JOB)")  # fmt: skip
    add("--metrics-grace-s", type=float, help="seconds after a job ends during which its "
        "ending attempt may still report its last records; its ingest token ends with it "
        f"(default {ServerConfig.metrics_grace_s:g}; env ZEROTRAIN_METRICS_GRACE_S)")  # fmt: skip
    add("--no-metrics-warning-s", type=float, help="a RUNNING job without any metrics record "
        f"after this many seconds gets a warning event (default "
        f"{ServerConfig.no_metrics_warning_s:g}; env ZEROTRAIN_NO_METRICS_WARNING_S)")  # fmt: skip
    add("--reinitialize-store", action="store_true", default=None,
        help="start with an empty job store when jobs.db is empty, missing or unreadable "
        "although the data dir shows earlier use (an unusable jobs.db is moved aside as "
        "jobs.db.unusable-<time>; the jobs it recorded are no longer listed)")  # fmt: skip
    add("--allow-custom-tasks", action="store_true", default=None,
        help="accept package.module:function tasks (arbitrary code; env ZEROTRAIN_ALLOW_CUSTOM_TASKS)")  # fmt: skip
    add("--insecure-no-auth", action="store_true", default=None,
        help="no authentication: binds to 127.0.0.1 only (env ZEROTRAIN_INSECURE_NO_AUTH)")  # fmt: skip
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> ServerConfig:
    """Flags over environment over defaults; ``ConfigError`` names the bad setting."""
    values: dict[str, Any] = ServerConfig.env_defaults(env)
    for key in ("address", "metrics_port", "data_dir", "ray_address", "ray_num_cpus",
                "tokens_file", "tls_cert", "tls_key", "tls_client_ca", "ingest_address", "ingest_ca", "ingest_port",
                "allow_custom_tasks", "insecure_no_auth", "health_port", "max_streams_per_principal",
                "max_calls_per_principal", "max_streams", "min_cpus_per_worker", "max_workers_per_job",
                "metrics_grace_s", "no_metrics_warning_s", "reinitialize_store"):  # fmt: skip
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if values.get("insecure_no_auth"):
        from zerotrain.service.server import is_loopback

        address = values.get("address", DEFAULT_ADDRESS)
        if not is_loopback(address):
            port = address.rsplit(":", 1)[-1]
            values["address"] = f"127.0.0.1:{port}"
            log.warning(
                "--insecure-no-auth: binding 127.0.0.1:%s instead of %s (no authentication "
                "is only allowed on loopback)",
                port,
                address,
            )
    return ServerConfig(**values)


def serve(config: ServerConfig, *, keep_ray: bool = False) -> int:
    """Run the service until SIGTERM/SIGINT; return the exit code."""
    from zerotrain.service.app import Service

    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            print(f"zerotrain: {signal.Signals(signum).name}: stopping", flush=True)
        stopping.set()

    service = Service(config, keep_ray=keep_ray)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: service.reload_tokens())
    serving = False
    try:
        service.start()  # stops what it started if it fails
        serving = True
        if config.insecure_no_auth:
            log.warning("authentication is DISABLED (--insecure-no-auth): anyone on this host "
                        "may submit and cancel jobs")  # fmt: skip
        log.info("serving on %s (data dir %s)", service.address, config.data_dir)
        print(f"zerotrain: serving on {service.address}", flush=True)
        stopping.wait()
    finally:
        if serving:
            service.stop(on_step=lambda what: print(f"zerotrain: {what} ...", flush=True))
            print("zerotrain: stopped", flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m zerotrain.service`` and ``zerotrain-serve``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "serve")  # `zerotrain-serve --flags` means `serve --flags`
    invoked = os.path.basename(sys.argv[0])
    parser = build_parser(CONSOLE_SCRIPT if invoked == CONSOLE_SCRIPT else "python -m zerotrain.service")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        keep_ray = bool(args.keep_ray) or env_flag(os.environ, "ZEROTRAIN_KEEP_RAY")
    except ConfigError as exc:
        print(f"zerotrain: error: {exc}", file=sys.stderr)
        return 2
    from zerotrain.service.datadir import StoreUnusable

    try:
        return serve(config, keep_ray=keep_ray)
    except StoreUnusable as exc:  # one line naming jobs.db and --reinitialize-store
        print(f"zerotrain: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as exc:
        # TokenFileError, TLS files, ports in use, Ray that will not start: say what, exit 1.
        print(f"zerotrain: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
