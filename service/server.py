"""Build the gRPC server: JobService, health, reflection, auth, metrics, TLS.

``create_server(address, manager, auth=...)`` returns a started server and the
port it bound, so tests pass ``127.0.0.1:0`` and read the port back. Health
(``grpc.health.v1.Health``) and reflection need no token, so ``grpc_health_probe``
and ``grpcurl`` work against it.
"""

from __future__ import annotations

import ipaddress
import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.zerotrain.v1 import job_service_pb2 as pb
from service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from service.auth import Authenticator, AuthInterceptor
from service.servicer import JobServicer

__all__ = [
    "DEFAULT_MAX_RECEIVE_BYTES",
    "SERVICE_NAME",
    "TlsConfig",
    "create_server",
    "is_loopback",
    "stop_server",
]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name
#: Largest request the server accepts; specs and metrics records are a few KiB.
DEFAULT_MAX_RECEIVE_BYTES = 1 << 20
#: Largest reply (a ListJobs page of 1000 jobs with their latest metrics fits).
DEFAULT_MAX_SEND_BYTES = 64 << 20


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
    max_workers: int = 128,
    max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
    max_send_message_bytes: int = DEFAULT_MAX_SEND_BYTES,
) -> tuple[grpc.Server, int]:
    """Build, bind and start the server; return ``(server, bound_port)``.

    ``manager`` is a :class:`service.jobs.JobManager`; ``metrics`` an optional
    :class:`service.metrics.ServiceMetrics` (every rpc counted and timed).
    Streaming rpcs hold a worker thread each, so ``max_workers`` bounds the
    concurrent watchers plus unary calls. With authentication disabled the
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
    interceptors.append(AuthInterceptor(auth))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_receive_message_bytes),
            ("grpc.max_send_message_length", max_send_message_bytes),
            ("grpc.so_reuseport", 0),  # port 0 must mean a port nobody else holds
        ],
    )
    pb_grpc.add_JobServiceServicer_to_server(JobServicer(manager, auth), server)
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
    server.health_servicer = health_servicer  # type: ignore[attr-defined]  # for stop_server
    log.info(
        "zerotrain.v1.JobService listening on %s (port %d, %s, auth %s)",
        address,
        port,
        "mutual TLS" if tls and tls.client_ca else "TLS" if tls else "plaintext",
        "on" if auth.enabled else "OFF",
    )
    return server, port


def stop_server(server: grpc.Server, grace: float = 5.0) -> None:
    """Report NOT_SERVING, cancel open streams after ``grace`` seconds, and wait."""
    health_servicer = getattr(server, "health_servicer", None)
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    server.stop(grace).wait()
