"""service.health (the container HEALTHCHECK) against a real gRPC health server."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.health import main

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
        [sys.executable, "-m", "service.health", "--address", address],
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
