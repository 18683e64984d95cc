"""zerotrain.service.health (the container HEALTHCHECK) against a real gRPC health server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from zerotrain.service.health import main

from .conftest import ROOT


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_serving_server_is_healthy(health_server):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = subprocess.run(
        [sys.executable, "-m", "zerotrain.service.health", "--address", address],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_not_serving_is_unhealthy(health_server, capsys):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["--address", address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_unreachable_server_is_unhealthy(capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["--address", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def _tls_files(directory) -> tuple[bytes, bytes, str]:
    """A CA and a server certificate for the DNS name ``zerotrain.internal`` (not 127.0.0.1)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, signer, *, ca: bool, san: str | None = None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_cert = cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    server_cert = cert(
        "zerotrain.internal", server_key, "test-ca", ca_key, ca=False, san="zerotrain.internal"
    )
    pem = serialization.Encoding.PEM
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    key_pem = server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, server_cert.public_bytes(pem), str(ca_path)


def test_tls_server_checked_with_its_certificate_name(tmp_path, capsys):
    key, chain, ca_path = _tls_files(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        # The certificate names zerotrain.internal, not 127.0.0.1: verification fails...
        assert main(["--address", address, "--tls-ca", ca_path, "--timeout", "3"]) == 1
        # ...unless the probe is told the name to expect.
        args = [
            "--address",
            address,
            "--tls-ca",
            ca_path,
            "--tls-server-name",
            "zerotrain.internal",
        ]
        assert main(args) == 0, capsys.readouterr().err
        # And a plaintext probe cannot talk to a TLS server.
        assert main(["--address", address, "--timeout", "3"]) == 1
    finally:
        server.stop(None)


# ------------------------------------------------------- the service's health port
def test_probe_against_the_services_health_port(capsys):
    """The image's HEALTHCHECK default (ZEROTRAIN_HEALTH_ADDRESS) talks to this server."""
    from zerotrain.service.health_server import create_health_server

    status = {"value": health_pb2.HealthCheckResponse.SERVING}
    server, port = create_health_server("127.0.0.1:0", lambda: status["value"])
    try:
        assert main(["--address", f"127.0.0.1:{port}"]) == 0
        status["value"] = health_pb2.HealthCheckResponse.NOT_SERVING  # draining on shutdown
        assert main(["--address", f"127.0.0.1:{port}"]) == 1
        assert "NOT_SERVING" in capsys.readouterr().err
    finally:
        server.stop(None)


def test_health_port_answers_without_waiting_for_the_request():
    """A probe's answer never waits for a request body, so bodiless calls hold nothing:
    100 of them on open connections, then a real probe still gets SERVING at once."""
    import h2.config
    import h2.connection
    import h2.events

    from zerotrain.service.health_server import create_health_server

    server, port = create_health_server(
        "127.0.0.1:0", lambda: health_pb2.HealthCheckResponse.SERVING
    )
    sockets = []
    try:
        answered = 0
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sockets.append(sock)
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
            )
            conn.initiate_connection()
            headers = [(":method", "POST"), (":scheme", "http"),
                       (":path", "/grpc.health.v1.Health/Check"), (":authority", "x"),
                       ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
            for _ in range(10):
                conn.send_headers(conn.get_next_available_stream_id(), headers)
            sock.sendall(conn.data_to_send())
            deadline = time.monotonic() + 5
            done: set[int] = set()
            while len(done) < 10 and time.monotonic() < deadline:
                for event in conn.receive_data(sock.recv(65536)):
                    if isinstance(event, h2.events.TrailersReceived):
                        assert dict(event.headers)["grpc-status"] == "0"
                        done.add(event.stream_id)
                sock.sendall(conn.data_to_send())
            answered += len(done)
        assert answered == 100
        assert main(["--address", f"127.0.0.1:{port}", "--timeout", "2"]) == 0
    finally:
        for sock in sockets:
            sock.close()
        server.stop(None)
