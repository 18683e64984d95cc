"""``GrpcSink``: pushes a job's metrics records to the service's ReportMetrics rpc.

The runtime's reporter (``zerotrain.service.runtime.reporter``) builds one from the
environment the service gives each job::

    ZEROTRAIN_INGEST_ADDRESS   host:port of the service (required)
    ZEROTRAIN_JOB_ID           the job the records belong to (required)
    ZEROTRAIN_INGEST_TOKEN_FILE  a file holding the job's ingest token (what the
                               service gives its jobs: see zerotrain.service.ingest_token)
    ZEROTRAIN_INGEST_TOKEN     the token itself (manual runs; never set by the
                               service, since Ray logs a job's environment)
    ZEROTRAIN_INGEST_CA        PEM file of the CA that signed the service's
                               certificate (turns TLS on)

``send`` raises on any failure (unreachable service, refused record); the
reporter buffers and retries what may succeed later (:attr:`IngestError.retryable`)
and stops for good once the service says the job takes no more records
(:attr:`IngestError.final`), so training never waits on the service.
Each call carries the job id as ``zerotrain-job-id`` metadata too, so the
service checks the token when the call's headers arrive.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from zerotrain.service.auth import JOB_ID_METADATA
from zerotrain.service.convert import metrics_to_proto
from zerotrain.service.ingest_token import ENV_TOKEN_FILE, read_token_file

__all__ = ["ENV_ADDRESS", "ENV_CA", "ENV_JOB_ID", "ENV_TOKEN", "GrpcSink", "IngestError"]

ENV_ADDRESS = "ZEROTRAIN_INGEST_ADDRESS"
ENV_JOB_ID = "ZEROTRAIN_JOB_ID"
ENV_TOKEN = "ZEROTRAIN_INGEST_TOKEN"
ENV_CA = "ZEROTRAIN_INGEST_CA"

# After the service restarts, reconnect within ~1 s: gRPC's default reconnect
# backoff grows to minutes, so records buffered while it was down would wait
# past the end of a short job and be dropped when the reporter closes.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class IngestError(RuntimeError):
    """A record could not be delivered (the message says why; never the token)."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.code))

    @property
    def retryable(self) -> bool:
        """Whether sending the same record again may succeed."""
        return self.code in {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}

    @property
    def final(self) -> bool:
        """The service takes no more records for this job (it ended): stop sending."""
        return self.code == "FAILED_PRECONDITION"


class GrpcSink:
    """Sends metrics records of one job to the service.

    ``ca`` is the path of a PEM file with the CA that signed the service's
    certificate (TLS); without it the channel is plaintext. Thread-safe (one
    gRPC channel). Each ``send`` is one unary call bounded by ``timeout_s``.
    """

    def __init__(
        self,
        address: str,
        job_id: str,
        *,
        token: str | None = None,
        ca: str | Path | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        if not address:
            raise ValueError(f"{ENV_ADDRESS}: must be host:port, got {address!r}")
        if not job_id:
            raise ValueError(f"{ENV_JOB_ID}: must be a job id, got {job_id!r}")
        self.address, self.job_id, self.timeout_s = address, job_id, timeout_s
        self._metadata: tuple[tuple[str, str], ...] = ((JOB_ID_METADATA, job_id),)
        if token:
            self._metadata += (("authorization", f"Bearer {token}"),)
        if ca:
            try:
                root_ca = Path(ca).read_bytes()
            except OSError as exc:
                raise ValueError(f"{ENV_CA}: cannot read {ca} ({exc.strerror})") from None
            self._channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_ca), options=_CHANNEL_OPTIONS
            )
        else:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.JobServiceStub(self._channel)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> GrpcSink | None:
        """A sink configured from the environment, or None when no address is set."""
        env = os.environ if environ is None else environ
        address = env.get(ENV_ADDRESS, "")
        if not address:
            return None
        token = env.get(ENV_TOKEN) or None
        if env.get(ENV_TOKEN_FILE):
            token = read_token_file(env[ENV_TOKEN_FILE])
        return cls(
            address,
            env.get(ENV_JOB_ID, ""),
            token=token,
            ca=env.get(ENV_CA) or None,
            **kwargs,
        )

    def send(self, record: Mapping[str, Any]) -> None:
        """Deliver one metrics record; raises :class:`IngestError` on failure."""
        try:
            message = metrics_to_proto({**record, "job_id": self.job_id})
        except ValueError as exc:
            raise IngestError(str(exc), "INVALID_ARGUMENT") from None
        request = pb.ReportMetricsRequest(job_id=self.job_id, record=message)
        try:
            # wait_for_ready: a call made while the channel is reconnecting waits for the
            # connection (up to the timeout) instead of failing at once.
            self._stub.ReportMetrics(
                request, timeout=self.timeout_s, metadata=self._metadata, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "UNKNOWN"
            raise IngestError(
                f"ReportMetrics to {self.address} failed: {code}: {exc.details()}", code
            ) from None

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> GrpcSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
