"""Build the gRPC server: JobService, health, reflection, auth, metrics, TLS.

``create_server(address, manager, auth=...)`` returns a started server and the
port it bound, so tests pass ``127.0.0.1:0`` and read the port back. Health
(``grpc.health.v1.Health``) and reflection need no token, so ``grpc_health_probe``
and ``grpcurl`` work against it; probes use the separate health port
(:mod:`service.health_server`), which no API traffic can starve.

Every call is authenticated and admitted within its budget when its headers
arrive (:mod:`service.gate`, :mod:`service.admission`), and one connection may
open at most :data:`MAX_STREAMS_PER_CONNECTION` HTTP/2 streams at a time.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import tempfile
import weakref
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.admission import Admission, CallLimits
from service.api.zerotrain.v1 import job_service_pb2 as pb
from service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from service.auth import Authenticator, TokenFileError
from service.config import ServerConfig
from service.gate import GateInterceptor
from service.health_server import create_health_server, status_of
from service.servicer import JobServicer

__all__ = [
    "DEFAULT_MAX_RECEIVE_BYTES",
    "MAX_STREAMS_PER_CONNECTION",
    "SERVICE_NAME",
    "Service",
    "TlsConfig",
    "create_ingest_server",
    "create_server",
    "health_status_source",
    "is_loopback",
    "ray_temp_dir",
    "stop_server",
]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name
#: Largest request the server accepts; specs and metrics records are a few KiB.
DEFAULT_MAX_RECEIVE_BYTES = 1 << 20
#: Largest reply (a ListJobs page of 1000 jobs with their latest metrics fits).
DEFAULT_MAX_SEND_BYTES = 64 << 20
#: HTTP/2 streams (concurrent rpcs) one client connection may have open; more are
#: refused by the HTTP/2 layer itself, before any thread or budget is involved.
MAX_STREAMS_PER_CONNECTION = 32


@dataclass(frozen=True)
class _ServerParts:
    servicer: JobServicer
    health: health.HealthServicer | None


# What stop_server needs to know about each server create_*_server built.
_PARTS: weakref.WeakKeyDictionary[grpc.Server, _ServerParts] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS material (PEM bytes). With ``client_ca``, clients must present
    a certificate signed by it (mutual TLS)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(
        cls, cert: str | Path, key: str | Path, client_ca: str | Path | None = None
    ) -> TlsConfig:
        """Read the PEM files; ``ValueError`` naming the file that cannot be read."""

        def read(path: str | Path, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"{what} {path}: cannot read ({exc.strerror})") from None

        return cls(
            cert_chain=read(cert, "TLS certificate"),
            private_key=read(key, "TLS private key"),
            client_ca=read(client_ca, "client CA") if client_ca else None,
        )

    def credentials(self) -> grpc.ServerCredentials:
        """The server credentials (requiring client certificates with a client CA)."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names a loopback host (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_server(
    address: str,
    manager: Any,
    *,
    auth: Authenticator,
    tls: TlsConfig | None = None,
    metrics: Any | None = None,
    limits: CallLimits | None = None,
    max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
    max_send_message_bytes: int = DEFAULT_MAX_SEND_BYTES,
) -> tuple[grpc.Server, int]:
    """Build, bind and start the server; return ``(server, bound_port)``.

    ``manager`` is a :class:`service.jobs.JobManager`; ``metrics`` an optional
    :class:`service.metrics.ServiceMetrics` (every rpc counted and timed).
    Every rpc holds a server thread while in flight (a stream for as long as it
    is open); ``limits`` shares the threads out per kind of call and per
    principal (:mod:`service.admission`). With authentication disabled the
    address must be loopback. Stop it with :func:`stop_server`.
    """
    if not auth.enabled and not is_loopback(address):
        raise ValueError(
            f"address {address!r}: authentication is disabled, so the server may only "
            "listen on a loopback address (127.0.0.1, ::1, localhost)"
        )
    interceptors: list[grpc.ServerInterceptor] = []
    if metrics is not None:
        from service.metrics import MetricsInterceptor  # prometheus only when metrics are on

        interceptors.append(MetricsInterceptor(metrics))
    admission = Admission(limits)
    interceptors.append(GateInterceptor(auth, admission))
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=admission.limits.threads, thread_name_prefix="grpc"
        ),
        interceptors=interceptors,
        # No gRPC-wide cap: the gate admits calls at their headers and refuses the rest
        # at once, per kind and principal; a cap here would refuse calls after the gate
        # admitted them, and their budget would never be released.
        maximum_concurrent_rpcs=None,
        options=_options(max_receive_message_bytes, max_send_message_bytes),
    )
    servicer = JobServicer(manager, auth)
    pb_grpc.add_JobServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if tls is not None:
        port = server.add_secure_port(address, tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address!r} (in use or not a local address)")
    server.start()
    _PARTS[server] = _ServerParts(servicer, health_servicer)
    log.info(
        "zerotrain.v1.JobService listening on %s (port %d, %s, auth %s)",
        address,
        port,
        "mutual TLS" if tls and tls.client_ca else "TLS" if tls else "plaintext",
        "on" if auth.enabled else "OFF",
    )
    return server, port


def create_ingest_server(
    address: str,
    manager: Any,
    *,
    auth: Authenticator,
    tls: TlsConfig | None = None,
    metrics: Any | None = None,
    limits: CallLimits | None = None,
) -> tuple[grpc.Server, int]:
    """A second, started server that exposes only ``JobService/ReportMetrics``.

    For mutual TLS: workers have no client certificate, so they push metrics
    here instead, over server-only TLS (``tls.client_ca`` is ignored) and with
    their per-job ingest token. Every other rpc is UNIMPLEMENTED on this port.
    """
    servicer = JobServicer(manager, auth)
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "ReportMetrics": grpc.unary_unary_rpc_method_handler(
                servicer.ReportMetrics,
                request_deserializer=pb.ReportMetricsRequest.FromString,
                response_serializer=pb.ReportMetricsResponse.SerializeToString,
            )
        },
    )
    interceptors: list[grpc.ServerInterceptor] = []
    if metrics is not None:
        from service.metrics import MetricsInterceptor

        interceptors.append(MetricsInterceptor(metrics))
    admission = Admission(limits)
    interceptors.append(GateInterceptor(auth, admission))
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=admission.limits.threads, thread_name_prefix="grpc-ingest"
        ),
        interceptors=interceptors,
        maximum_concurrent_rpcs=None,  # the gate's budgets instead (see create_server)
        options=_options(DEFAULT_MAX_RECEIVE_BYTES, DEFAULT_MAX_SEND_BYTES),
    )
    server.add_generic_rpc_handlers((handler,))
    _PARTS[server] = _ServerParts(servicer, None)
    if tls is not None:
        server_only = TlsConfig(tls.cert_chain, tls.private_key, None)
        port = server.add_secure_port(address, server_only.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address!r} (in use or not a local address)")
    server.start()
    log.info("metrics ingestion (ReportMetrics only) listening on %s (port %d)", address, port)
    return server, port


def _options(max_receive: int, max_send: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", max_send),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.so_reuseport", 0),  # port 0 must mean a port nobody else holds
    ]


def health_status_source(server: grpc.Server) -> Any:
    """A function giving ``server``'s overall health status (for the health port)."""
    parts = _PARTS[server]
    assert parts.health is not None, "an ingest-only server has no health service"
    return status_of(parts.health)


def stop_server(server: grpc.Server, grace: float = 5.0) -> None:
    """Report NOT_SERVING, cancel open rpcs after ``grace`` seconds, and wait for them.

    Returns once no handler is still inside the job manager, so the caller
    may stop the manager and close its store without pulling it from under
    a thread (gRPC does not join handler threads on stop).
    """
    parts = _PARTS.pop(server, None)
    if parts is not None and parts.health is not None:
        parts.health.enter_graceful_shutdown()
    server.stop(grace).wait()
    if parts is not None and not parts.servicer.wait_idle(timeout=grace + 10.0):
        log.warning("rpc handlers still busy %.0f s after the server stopped", grace + 10.0)


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
        from service.datadir import (
            load_or_create_secret,
            open_store,
            prepare_data_dir,
            warn_if_exposed,
        )
        from service.jobs import JobManager
        from service.metrics import ServiceMetrics
        from service.ray_jobs import RayJobs, start_local_ray

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
        from service.datadir import warn_if_exposed

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
