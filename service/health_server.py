"""The health port: ``grpc.health.v1.Health/Check`` alone, outside the API's call budget.

Probes (Kubernetes readiness and liveness, Docker's ``HEALTHCHECK``) talk to
this port, not to the API port, so no amount of user traffic, and no header
flood, can make them fail: this server has its own threads, serves nothing
else, and answers each Check *as soon as its headers arrive*, without waiting
for the request message (grpc-python can bound neither that wait nor who
causes it; see docs/RELIABILITY.md). It therefore answers the status of the
server as a whole whatever ``service`` the request names (the service sets
``""`` and ``zerotrain.v1.JobService`` together anyway). Plaintext always:
the status is no secret, and Kubernetes' gRPC probes cannot speak TLS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

__all__ = ["create_health_server", "status_of"]

log = logging.getLogger(__name__)

_THREADS = 4
#: HTTP/2 streams one connection may have open on the health port.
_MAX_STREAMS_PER_CONNECTION = 16


def status_of(servicer: health.HealthServicer) -> Callable[[], int]:
    """The overall serving status the API port's health servicer reports, as a function."""
    request = health_pb2.HealthCheckRequest(service="")

    def status() -> int:
        return servicer.Check(request, None).status  # "" is always registered: no context used

    return status


def create_health_server(address: str, status: Callable[[], int]) -> tuple[grpc.Server, int]:
    """Build, bind and start the health-only server; return ``(server, bound_port)``."""

    def check(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        # Request-streaming on purpose: the answer never waits for the request message.
        return health_pb2.HealthCheckResponse(status=status())

    handler = grpc.method_handlers_generic_handler(
        health.SERVICE_NAME,
        {
            "Check": grpc.stream_unary_rpc_method_handler(
                check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="grpc-health"),
        handlers=[handler],
        options=[
            ("grpc.max_concurrent_streams", _MAX_STREAMS_PER_CONNECTION),
            ("grpc.max_receive_message_length", 4096),
            ("grpc.so_reuseport", 0),
        ],
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address!r} for health checks (in use?)")
    server.start()
    log.info("grpc.health.v1 (Check only, plaintext) listening on %s (port %d)", address, port)
    return server, port
