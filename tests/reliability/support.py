"""Helpers of the reliability suite: principals, real servers on port 0, health, certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from zerotrain.service.auth import Authenticator, Principal
from zerotrain.service.health_server import create_health_server
from zerotrain.service.jobs import JobManager
from zerotrain.service.local_ray import LocalRay
from zerotrain.service.metrics import ServiceMetrics
from zerotrain.service.model import JobRecord, JobState
from zerotrain.service.ray_jobs import RayJobs
from zerotrain.service.server import create_server, health_status_source, stop_server
from zerotrain.service.store import JobStore

__all__ = [
    "TOKENS",
    "LogCapture",
    "Pki",
    "Served",
    "bearer",
    "health_status",
    "make_auth",
    "make_pki",
    "seed_job",
    "serve_manager",
    "store_ids",
]

TOKENS = {
    "alice": "alice-rel-0123456789abcdef",
    "bob": "bob-rel-0123456789abcdef00",
    "root": "root-rel-0123456789abcdef0",
}


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
    """Call metadata for a principal (None: no token; any other string: that raw token)."""
    if who is None:
        return ()
    return (("authorization", f"Bearer {TOKENS.get(who, who)}"),)


@dataclass
class Served:
    """A running server over a real job manager."""

    port: int
    manager: JobManager
    auth: Authenticator
    metrics: ServiceMetrics
    health_port: int

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.max_send_message_length", 8 << 20)]
        )

    def stub(self) -> pb_grpc.JobServiceStub:
        return pb_grpc.JobServiceStub(self.channel())


@contextmanager
def serve_manager(
    data_dir: Path,
    ray_head: LocalRay | None,
    *,
    entrypoint: str | None = "true",
    start: bool = True,
    manager_options: dict[str, Any] | None = None,
    **server_kwargs: Any,
) -> Iterator[Served]:
    """A real SQLite store, job manager and gRPC server on an ephemeral loopback port.

    ``ray_head`` None gives a manager with no Ray at all (only rpcs that never
    reach Ray may be used). ``entrypoint`` replaces the runtime's command for
    every job (``"true"``: a real Ray job that ends at once, no training);
    None runs the real runtime.
    """
    auth = make_auth()
    store = JobStore(data_dir / "jobs.db")
    ray = RayJobs(ray_head.address, token=ray_head.token) if ray_head is not None else None
    metrics = ServiceMetrics(CollectorRegistry())
    manager = JobManager(
        store,
        ray,  # type: ignore[arg-type]
        data_dir=data_dir,
        ingest_token=auth.ingest_token_for,
        metrics=metrics,
        reconcile_interval_s=0.5,
        final_metrics_grace_s=1.0,
        entrypoint_factory=(lambda *_: entrypoint) if entrypoint is not None else None,
        **(manager_options or {}),
    )
    server, port = create_server("127.0.0.1:0", manager, auth=auth, metrics=metrics, **server_kwargs)
    health_server, health_port = create_health_server(
        "127.0.0.1:0", health_status_source(server)
    )
    manager.ingest_address = f"127.0.0.1:{port}"
    if start and ray is not None:
        manager.start()
    try:
        yield Served(port, manager, auth, metrics, health_port)
    finally:
        stop_server(server, grace=0.5)
        health_server.stop(0).wait()
        manager.stop()
        store.close()


def health_status(port: int, *, credentials: grpc.ChannelCredentials | None = None) -> int:
    """The server's overall grpc.health.v1 status (SERVING is 1)."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return reply.status


def store_ids(store: JobStore) -> set[str]:
    """Every job id the store holds."""
    ids: set[str] = set()
    token = ""
    while True:
        page, token = store.list_jobs(page_size=1000, page_token=token)
        ids.update(j.job_id for j in page)
        if not token:
            return ids


def seed_job(store: JobStore, job_id: str, owner: str, spec: Any, state: JobState) -> JobRecord:
    """Put a job straight into the store in ``state`` (no Ray involved)."""
    now = time.time()
    record = JobRecord(
        job_id=job_id, owner=owner, spec=spec, state=JobState.PENDING, state_reason="seeded",
        created_at=now, updated_at=now, started_at=None, finished_at=None, attempt=0,
        latest_metrics=None, checkpoint=None, idempotency_key=None, ray_job_id=None,
    )  # fmt: skip
    created, _ = store.create_job(record)
    if state != JobState.PENDING:
        finished = now if state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED) else None
        created, _ = store.update_job(
            job_id, now=now, state=state, reason="seeded", finished_at=finished
        )
    return created


class LogCapture(logging.Handler):
    """Collects every formatted log record of the process (root logger, all levels)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.exc_info and record.exc_text is None:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)

    @contextmanager
    def installed(self) -> Iterator[LogCapture]:
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(self)
        root.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            root.removeHandler(self)
            root.setLevel(old_level)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def job_spec_message(**overrides: Any) -> pb.JobSpec:
    """A small valid ``JobSpec`` message (regression, 1 worker, 2 steps)."""
    msg = pb.JobSpec(name="rel", task="regression")
    msg.scaling.num_workers = 1
    msg.scaling.cpus_per_worker = 1
    msg.training.max_steps = 2
    msg.sharding.compile = False  # the fused step's torch.compile start-up is tested in tests/runtime
    for key, value in overrides.items():
        setattr(msg, key, value)
    return msg


# ------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class Pki:
    """PEM material of a throwaway CA with a server and a client certificate."""

    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    valid_days: float = 1.0,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    start = now - dt.timedelta(minutes=5) if valid_days > 0 else now - dt.timedelta(days=2)
    end = now + dt.timedelta(days=valid_days) if valid_days > 0 else now - dt.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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


def make_pki(ca_name: str = "zerotrain-rel-ca", *, client_valid_days: float = 1.0) -> Pki:
    """A fresh CA with a server certificate (localhost, 127.0.0.1) and a client certificate.

    ``client_valid_days <= 0`` gives an already expired client certificate.
    """
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert(ca_name, ca_key, None, ca=True)
    server = _cert("localhost", server_key, (ca_name, ca_key), server=True)
    client = _cert("client", client_key, (ca_name, ca_key), valid_days=client_valid_days)
    pem = serialization.Encoding.PEM
    return Pki(
        ca=ca.public_bytes(pem),
        server_cert=server.public_bytes(pem),
        server_key=_pem_key(server_key),
        client_cert=client.public_bytes(pem),
        client_key=_pem_key(client_key),
    )


def self_signed_pair(name: str = "intruder") -> tuple[bytes, bytes]:
    """(certificate, key) PEM of a self-signed certificate no CA of the suite signed."""
    key = _key()
    cert = _cert(name, key, None, server=True)
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)
