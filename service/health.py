"""Container health check: ask the server's ``grpc.health.v1.Health`` whether it is serving.

    python -m zerotrain.service.health [--address HOST:PORT] [--service NAME] [--tls-ca PEM]
                             [--tls-server-name NAME] [--timeout S]

Exits 0 when the server answers SERVING, 1 otherwise (with the reason on
stderr), which is what Docker's HEALTHCHECK and Kubernetes' exec probes expect.
The health service needs no token. Probe the service's health port
(``--health-port``, default 50052: plaintext, outside the API's call budget);
the API port answers health checks too, but user traffic shares its budget.
Defaults come from the environment:
``ZEROTRAIN_HEALTH_ADDRESS`` (else ``127.0.0.1:50052``), ``ZEROTRAIN_TLS_CA``
(a CA bundle: the check then uses TLS, as the server does) and
``ZEROTRAIN_HEALTH_SERVER_NAME`` (the name on the server's certificate, when the
probe dials 127.0.0.1 but the certificate names the service's DNS name).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["check", "main"]

DEFAULT_ADDRESS = "127.0.0.1:50052"  # the service's health port (--health-port)


def check(
    address: str,
    *,
    service: str = "",
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
    timeout: float = 5.0,
) -> str:
    """The serving status name (e.g. ``"SERVING"``) reported by the server at ``address``.

    Raises :class:`grpc.RpcError` when the server cannot be reached in ``timeout`` seconds.
    """
    if tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zerotrain.service.health", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("ZEROTRAIN_HEALTH_ADDRESS", DEFAULT_ADDRESS),
        help="server address host:port (env ZEROTRAIN_HEALTH_ADDRESS; default %(default)s)",
    )
    parser.add_argument("--service", default="", help="service name to check ('' = the server)")
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("ZEROTRAIN_TLS_CA") or None,
        help="CA bundle to verify the server with TLS (env ZEROTRAIN_TLS_CA)",
    )
    parser.add_argument(
        "--tls-server-name",
        default=os.environ.get("ZEROTRAIN_HEALTH_SERVER_NAME") or None,
        help="name to verify on the server certificate (env ZEROTRAIN_HEALTH_SERVER_NAME)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        status = check(
            args.address,
            service=args.service,
            tls_ca=args.tls_ca,
            tls_server_name=args.tls_server_name,
            timeout=args.timeout,
        )
    except grpc.RpcError as error:
        print(f"unhealthy: {args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"unhealthy: cannot read --tls-ca: {error}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"unhealthy: {args.address} reports {status}", file=sys.stderr)
        return 1
    print(f"healthy: {args.address} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
