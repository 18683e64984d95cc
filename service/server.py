"""Build the gRPC server: JobService, health, reflection, auth, metrics, TLS.

The process that runs one with everything behind it is :class:`zerotrain.service.app.Service`.

``create_server(address, manager, auth=...)`` returns a started server and the
port it bound, so tests pass ``127.0.0.1:0`` and read the port back. Health
(``grpc.health.v1.Health``) and reflection need no token, so ``grpc_health_probe``
and ``grpcurl`` work against it; probes use the separate health port
(:mod:`zerotrain.service.health_server`), which no API traffic can starve.

Every call is authenticated and admitted within its budget when its headers
arrive (:mod:`zerotrain.service.gate`, :mod:`zerotrain.service.admission`), and one connection may
open at most :data:`MAX_STREAMS_PER_CONNECTION` HTTP/2 streams at a time.
"""

from __future__ import annotations

import ipaddress
import logging
import weakref
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zerotrain.service.admission import Admission, CallLimits
from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from zerotrain.service.auth import Authenticator
from zerotrain.service.gate import GateInterceptor
from zerotrain.service.health_server import status_of
from zerotrain.service.servicer import JobServicer

__all__ = [
    "DEFAULT_MAX_RECEIVE_BYTES",
    "MAX_STREAMS_PER_CONNECTION",
    "SERVICE_NAME",
    "TlsConfig",
    "create_ingest_server",
    "create_server",
    "health_status_source",
    "is_loopback",
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

    ``manager`` is a :class:`zerotrain.service.jobs.JobManager`; ``metrics`` an optional
    :class:`zerotrain.service.metrics.ServiceMetrics` (every rpc counted and timed).
    Every rpc holds a server thread while in flight (a stream for as long as it
    is open); ``limits`` shares the threads out per kind of call and per
    principal (:mod:`zerotrain.service.admission`). With authentication disabled the
    address must be loopback. Stop it with :func:`stop_server`.
    """
    if not auth.enabled and not is_loopback(address):
        raise ValueError(
            f"address {address!r}: authentication is disabled, so the server may only "
            "listen on a loopback address (127.0.0.1, ::1, localhost)"
        )
    interceptors: list[grpc.ServerInterceptor] = []
    if metrics is not None:
        from zerotrain.service.metrics import (
            MetricsInterceptor,  # prometheus only when metrics are on
        )

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
        from zerotrain.service.metrics import MetricsInterceptor

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
