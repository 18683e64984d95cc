"""Helpers of the API tests: principals, real servers on port 0, seeded jobs, certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from zerotrain.service.auth import Authenticator, Principal
from zerotrain.service.model import JobRecord, JobState
from zerotrain.service.server import TlsConfig, create_server, stop_server
from zerotrain.service.spec import JobSpec
from zerotrain.service.store import JobStore

TOKENS = {
    "alice": "alice-0123456789abcdef",
    "bob": "bob-0123456789abcdef00",
    "root": "root-0123456789abcdef0",
}


@pytest.fixture(autouse=True)
def hermetic_client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Clients see no ZEROTRAIN_* settings or config file of the machine running the tests."""
    for name in ("ZEROTRAIN_ADDRESS", "ZEROTRAIN_TOKEN", "ZEROTRAIN_CA",
                 "ZEROTRAIN_CLIENT_CERT", "ZEROTRAIN_CLIENT_KEY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZEROTRAIN_CONFIG", str(tmp_path / "no-client-config.yaml"))


def make_auth() -> Authenticator:
    """alice and bob are plain principals; root is an admin."""
    return Authenticator.from_tokens(
        {
            TOKENS["alice"]: Principal("alice"),
            TOKENS["bob"]: Principal("bob"),
            TOKENS["root"]: Principal("root", admin=True),
        }
    )


def bearer(who: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata for a principal (None: no token)."""
    return () if who is None else (("authorization", f"Bearer {TOKENS[who]}"),)


@contextmanager
def serving(manager: Any, auth: Authenticator, **kwargs: Any) -> Iterator[int]:
    """A real server on an ephemeral loopback port; yields the port."""
    server, port = create_server("127.0.0.1:0", manager, auth=auth, **kwargs)
    try:
        yield port
    finally:
        stop_server(server, grace=0.5)


def stub(port: int) -> pb_grpc.JobServiceStub:
    """A JobService stub over a plaintext channel."""
    return pb_grpc.JobServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def spec(name: str = "api-test", **sections: Any) -> JobSpec:
    """A small valid spec (digits, 1 worker, few steps)."""
    data: dict[str, Any] = {
        "name": name,
        "task": "digits",
        "labels": {"suite": "api"},
        "scaling": {"num_workers": 1},
        # Eager optimizer step: the fused one's torch.compile start-up (~5 s a
        # worker) is tested in tests/runtime.
        "sharding": {"compile": False},
        "training": {"max_steps": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.from_dict(data)


def seed_job(
    store: JobStore, job_id: str, owner: str, *, job_spec: JobSpec | None = None, **changes: Any
) -> JobRecord:
    """Put a job straight into the store (for tests that must not reach Ray)."""
    now = time.time()
    record = JobRecord(
        job_id=job_id, owner=owner, spec=job_spec or spec(job_id), state=JobState.PENDING,
        state_reason="accepted", created_at=now, updated_at=now, started_at=None,
        finished_at=None, attempt=0, latest_metrics=None, checkpoint=None,
        idempotency_key=None, ray_job_id=None,
    )  # fmt: skip
    created, _ = store.create_job(record)
    if changes:
        state = changes.pop("state", created.state)
        created, _ = store.update_job(job_id, now=now, state=state, **changes)
    return created


# ------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class Pki:
    """PEM material of a throwaway CA, a server certificate and a client certificate."""

    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes

    def write(self, directory: Path) -> dict[str, Path]:
        """Write every PEM to ``directory``; returns name -> path."""
        paths = {}
        for name in ("ca", "server_cert", "server_key", "client_cert", "client_key"):
            paths[name] = directory / f"{name}.pem"
            paths[name].write_bytes(getattr(self, name))
        return paths

    def server_tls(self, *, mutual: bool = False) -> TlsConfig:
        """The server's TLS config (requiring client certificates if ``mutual``)."""
        return TlsConfig(self.server_cert, self.server_key, self.ca if mutual else None)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(ca_name: str = "zerotrain-test-ca") -> Pki:
    """A fresh CA with a server certificate (localhost, 127.0.0.1) and a client certificate."""
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert(ca_name, ca_key, None, ca=True)
    server = _cert("localhost", server_key, (ca_name, ca_key), server=True)
    client = _cert("client-alice", client_key, (ca_name, ca_key))
    pem = serialization.Encoding.PEM
    return Pki(
        ca=ca.public_bytes(pem),
        server_cert=server.public_bytes(pem),
        server_key=_pem_key(server_key),
        client_cert=client.public_bytes(pem),
        client_key=_pem_key(client_key),
    )
