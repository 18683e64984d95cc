"""The whole service process: job store, Ray, job manager, metrics and gRPC servers.

:class:`Service` assembles the pieces in the order they depend on each other
and stops them in reverse; ``zerotrain-serve`` (:mod:`zerotrain.service.__main__`) and
the demo run one. Building a gRPC server is :mod:`zerotrain.service.server`'s job.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from zerotrain.service.admission import CallLimits
from zerotrain.service.auth import Authenticator, TokenFileError
from zerotrain.service.config import ServerConfig
from zerotrain.service.datadir import (
    load_or_create_secret,
    open_store,
    prepare_data_dir,
    warn_if_exposed,
)
from zerotrain.service.health_server import create_health_server
from zerotrain.service.jobs import JobManager
from zerotrain.service.local_ray import start_local_ray
from zerotrain.service.metrics import ServiceMetrics
from zerotrain.service.ray_jobs import RayJobs
from zerotrain.service.server import (
    TlsConfig,
    create_ingest_server,
    create_server,
    health_status_source,
    stop_server,
)

__all__ = ["Service", "ray_temp_dir"]

log = logging.getLogger(__name__)


class Service:
    """The whole service: job store, Ray, job manager, metrics endpoint, gRPC server.

    ``Service(config).start()`` opens the SQLite store under ``data_dir``,
    connects to ``ray_address`` or starts (or re-attaches to) an embedded local
    Ray head, re-attaches unfinished jobs, serves ``/metrics`` and the gRPC
    API. ``stop()`` undoes it in reverse order; the embedded Ray head is
    stopped too unless ``keep_ray`` (then a restarted service re-attaches to
    it and to the jobs still running there).
    """

    def __init__(self, config: ServerConfig, *, keep_ray: bool = False) -> None:
        self.config = config
        self.keep_ray = keep_ray
        self.server: grpc.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.ray_address: str | None = None
        self._auth: Authenticator | None = None
        self._closers: list[tuple[str, Callable[[], Any]]] = []
        """(what it stops, how), undone last to first by :meth:`stop`."""

    @property
    def address(self) -> str:
        """``host:port`` clients use (the bound port, not the configured 0)."""
        host = self.config.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> Service:
        """Bring everything up; on failure, tear down what was started and re-raise."""
        try:
            self._start()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def _start(self) -> None:
        config = self.config
        data_dir = prepare_data_dir(Path(config.data_dir).resolve())
        # First, before anything else starts: a store that lost its jobs stops us here.
        store = open_store(data_dir, reinitialize=config.reinitialize_store)
        self._closers.append(("closing the job store", store.close))
        if config.insecure_no_auth:
            auth = Authenticator(None)
        else:
            assert config.tokens_file is not None  # ServerConfig guarantees it
            # The ingest secret outlives restarts: running jobs keep valid tokens.
            secret = load_or_create_secret(data_dir / "ingest.secret")
            auth = Authenticator.from_file(config.tokens_file, ingest_secret=secret)
            warn_if_exposed(config.tokens_file)
        self._auth = auth
        tls = None
        if config.tls_cert is not None and config.tls_key is not None:
            tls = TlsConfig.from_files(config.tls_cert, config.tls_key, config.tls_client_ca)
        ingest_ca = (config.ingest_ca or config.tls_cert) if tls is not None else None
        if ingest_ca is not None and not ingest_ca.is_file():
            raise ValueError(f"ingest CA {ingest_ca}: no such file (workers verify TLS with it)")

        if config.ray_address:
            ray = RayJobs(config.ray_address)
        else:
            head = start_local_ray(ray_temp_dir(data_dir), num_cpus=config.ray_num_cpus)
            if not self.keep_ray:
                self._closers.append(
                    (f"stopping the embedded Ray head (pid {head.pid}) and its jobs", head.shutdown)
                )
            ray = RayJobs(head.address, token=head.token)
        self.ray_address = ray.address
        log.info("Ray dashboard: %s", self.ray_address)

        metrics = ServiceMetrics()
        self._closers.append(("closing the metrics endpoint", metrics.close))
        metrics_host = config.address.rsplit(":", 1)[0].strip("[]")
        if config.metrics_port >= 0:
            self.metrics_port = metrics.serve(config.metrics_port, addr=metrics_host)
            log.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, self.metrics_port)

        manager = JobManager(
            store,
            ray,
            data_dir=data_dir,
            allow_custom_tasks=config.allow_custom_tasks,
            ingest_address=config.ingest_address or None,
            # Workers authenticate their ingestion calls with their job's own token.
            ingest_token=auth.ingest_token_for if auth.enabled else None,
            ingest_ca=str(ingest_ca) if ingest_ca is not None else None,
            metrics=metrics,
            min_cpus_per_worker=config.min_cpus_per_worker,
            max_workers_per_job=config.max_workers_per_job,
            metrics_grace_s=config.metrics_grace_s,
            no_metrics_warning_s=config.no_metrics_warning_s,
        )
        self.manager = manager
        # After the server below has stopped.
        self._closers.append(("stopping the job manager", manager.stop))
        limits = CallLimits(
            max_streams_per_principal=config.max_streams_per_principal,
            max_streams=config.max_streams,
            max_calls_per_principal=config.max_calls_per_principal,
            max_calls=max(48, config.max_calls_per_principal),
        )
        self.server, self.port = create_server(
            config.address, manager, auth=auth, tls=tls, metrics=metrics, limits=limits
        )
        if config.health_port >= 0:
            host = config.address.rsplit(":", 1)[0]
            health_server, self.health_port = create_health_server(
                f"{host}:{config.health_port}", health_status_source(self.server)
            )
            # Stopped after the API server: probes see NOT_SERVING while it drains.
            self._closers.append(
                ("stopping the health server", lambda: health_server.stop(0.5).wait())
            )
        # Stopped first: open watch streams end with UNAVAILABLE, so clients resume elsewhere.
        self._closers.append(
            (
                "stopping the gRPC server (open streams get 2 s)",
                lambda: stop_server(self.server, 2.0),  # type: ignore[arg-type]
            )
        )
        ingest_port = self.port
        if tls is not None and tls.client_ca is not None:
            # Workers have no client certificate: they report on an ingest-only port.
            host = config.address.rsplit(":", 1)[0]
            ingest_server, ingest_port = create_ingest_server(
                f"{host}:{config.ingest_port}", manager, auth=auth, tls=tls, metrics=metrics
            )
            self._closers.append(
                ("stopping the ingestion server", lambda: stop_server(ingest_server, 2.0))
            )
        if not config.ingest_address:  # known only now when the port was 0
            manager.ingest_address = _advertised(config.address, ingest_port)
        manager.start()

    def reload_tokens(self) -> None:
        """Re-read the tokens file (SIGHUP); on error keep the current tokens and log why."""
        if self.config.tokens_file is None or self._auth is None:
            return
        try:
            count = self._auth.reload(self.config.tokens_file)
        except (TokenFileError, OSError) as exc:
            log.error("tokens file not reloaded, keeping the current tokens: %s", exc)
            return
        log.info("reloaded %d token(s) from %s", count, self.config.tokens_file)
        warn_if_exposed(self.config.tokens_file)

    def stop(self, grace: float = 5.0, *, on_step: Callable[[str], None] | None = None) -> None:
        """Stop serving and release everything (idempotent).

        ``on_step`` is told what is being stopped before each step (the embedded
        Ray head takes a few seconds), e.g. to show it to the person waiting.
        """
        while self._closers:
            what, closer = self._closers.pop()
            if on_step is not None:
                on_step(what)
            try:
                closer()
            except Exception:
                log.exception("error while %s", what)


def ray_temp_dir(data_dir: Path) -> Path:
    """A short, stable temp dir per data dir (Ray's unix sockets need short paths).

    Stable, so a restarted service finds the embedded head it left running.
    """
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"zt-ray-{digest}"


def _advertised(listen: str, port: int) -> str:
    """The address workers reach the service at, for a listen address and bound port."""
    host = listen.rsplit(":", 1)[0]
    if host.strip("[]") in {"0.0.0.0", "::", ""}:
        host = socket.gethostname()  # a wildcard bind: the machine's name
    return f"{host}:{port}"
