"""``JobClient``: the Python client of ``zerotrain.v1.JobService``.

    from zerotrain.service.client import JobClient

    with JobClient("127.0.0.1:50051", token="...") as client:
        job = client.submit("examples/digits_nadam.yaml")
        for event in client.watch(job.job_id):       # reconnects, resumes by sequence
            ...
        print(client.get(job.job_id).latest_metrics["loss"])

Address, token and TLS files come from the arguments, else the environment
(``ZEROTRAIN_ADDRESS``, ``ZEROTRAIN_TOKEN``, ``ZEROTRAIN_CA``, ...), else
``~/.config/zerotrain/config.yaml`` (see :mod:`zerotrain.service.config`). Replies are
the domain types of :mod:`zerotrain.service.model` (:class:`JobRecord`,
:class:`JobEvent`, :class:`JobState`), converted by :mod:`zerotrain.service.convert`:
the protobuf messages stay inside this module. Failures raise :class:`ApiError`
with the status code, the server's message and, for invalid input, each bad field.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub
from grpc_status import rpc_status

from zerotrain.service import convert
from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc
from zerotrain.service.config import ClientConfig, load_client_config
from zerotrain.service.model import TERMINAL_STATES, JobEvent, JobRecord, JobState
from zerotrain.service.spec import JobSpec, load_spec

__all__ = ["TERMINAL_STATES", "ApiError", "JobClient"]

# Watch reconnects on these (the server restarting, a network blip).
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class ApiError(Exception):
    """A failed rpc: ``code`` (``grpc.StatusCode``), ``details`` and ``field_violations``."""

    def __init__(
        self, code: grpc.StatusCode, details: str, field_violations: list[tuple[str, str]]
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field_violations = field_violations

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ApiError:
        """Wrap a ``grpc.RpcError``, unpacking ``google.rpc.BadRequest`` details."""
        violations: list[tuple[str, str]] = []
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        for detail in status.details if status is not None else ():
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                violations.extend((v.field, v.description) for v in bad.field_violations)
        code = error.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
        return cls(code, error.details() or "", violations)  # type: ignore[attr-defined]


class JobClient:
    """Submit, inspect, list, watch and cancel jobs on a zerotrain server.

    Args:
        address: ``host:port`` of the server.
        token: bearer token (sent as ``authorization`` metadata).
        ca: PEM file of the CA that signed the server's certificate (TLS on).
        client_cert, client_key: PEM files for mutual TLS.
        config_file: client config file (default ``~/.config/zerotrain/config.yaml``).
        timeout_s: deadline of each unary call.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        ca: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        config_file: str | Path | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.config: ClientConfig = load_client_config(
            address=address,
            token=token,
            ca=ca,
            client_cert=client_cert,
            client_key=client_key,
            config_file=config_file,
        )
        self.timeout_s = timeout_s
        self._metadata = (
            (("authorization", f"Bearer {self.config.token}"),) if self.config.token else ()
        )
        self._channel = _open_channel(self.config)
        self._stub = pb_grpc.JobServiceStub(self._channel)

    # ------------------------------------------------------------------- unary
    def submit(
        self,
        spec: JobSpec | Mapping[str, Any] | str | Path,
        *,
        idempotency_key: str | None = None,
    ) -> JobRecord:
        """Submit a job: a :class:`JobSpec`, a spec dict or a YAML/JSON path.

        A dict or file is validated locally first (``SpecError`` lists every
        bad field before anything is sent).
        """
        if isinstance(spec, str | Path):
            spec = load_spec(spec)
        elif isinstance(spec, Mapping):
            spec = JobSpec.from_dict(spec)
        request = pb.SubmitJobRequest(
            spec=convert.spec_to_proto(spec), idempotency_key=idempotency_key or ""
        )
        return convert.job_from_proto(self._unary(self._stub.SubmitJob, request))

    def get(self, job_id: str) -> JobRecord:
        """One job."""
        reply = self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))
        return convert.job_from_proto(reply)

    def list(
        self,
        *,
        state: JobState | str | None = None,
        labels: Mapping[str, str] | None = None,
        owner: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """One page of jobs, newest first, and the token of the next page ("" at the end).

        ``state`` (a :class:`JobState` or its name, ``"RUNNING"``) keeps the jobs in it.
        """
        request = pb.ListJobsRequest(
            state=convert.state_to_proto(JobState(state)) if state else pb.JOB_STATE_UNSPECIFIED,
            labels=dict(labels or {}),
            owner=owner,
            page_size=page_size,
            page_token=page_token,
        )
        reply = self._unary(self._stub.ListJobs, request)
        return [convert.job_from_proto(job) for job in reply.jobs], reply.next_page_token

    def list_all(self, **filters: Any) -> Iterator[JobRecord]:
        """Every job matching the filters of :meth:`list`, following page tokens."""
        token = ""
        while True:
            jobs, token = self.list(page_token=token, **filters)
            yield from jobs
            if not token:
                return

    def cancel(self, job_id: str) -> JobRecord:
        """Ask a job to stop; returns it (CANCELLING or already CANCELLED)."""
        reply = self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id))
        return convert.job_from_proto(reply)

    # ----------------------------------------------------------------- streams
    def watch(
        self,
        job_id: str,
        from_sequence: int = 0,
        *,
        reconnect_timeout_s: float = 120.0,
    ) -> Iterator[JobEvent]:
        """Every event of the job after ``from_sequence``, until its terminal state.

        When the stream breaks (server restart, network), reconnects with the
        last sequence seen, so no event is missed or repeated; gives up with
        :class:`ApiError` after ``reconnect_timeout_s`` without a connection.
        """
        last = from_sequence
        backoff = 0.2
        down_since: float | None = None
        while True:
            stream = self._stub.WatchJob(
                pb.WatchJobRequest(job_id=job_id, from_sequence=last), metadata=self._metadata
            )
            error: grpc.RpcError | None = None
            try:
                for message in stream:
                    down_since, backoff = None, 0.2
                    if message.sequence <= last:
                        continue  # never repeat an event
                    last = message.sequence
                    event = convert.event_from_proto(message)
                    yield event
                    if event.state in TERMINAL_STATES:
                        return
                # Resumed past the terminal event, the stream ends at once; any other
                # end without one is the server going away: resume as after an error.
                job = self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), raw=True)
                if convert.state_from_proto(job.state) in TERMINAL_STATES:
                    return
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:  # type: ignore[attr-defined]
                    raise ApiError.from_rpc_error(exc) from None
                error = exc
            finally:
                stream.cancel()
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > reconnect_timeout_s:
                if error is not None:
                    raise ApiError.from_rpc_error(error) from None
                raise ApiError(grpc.StatusCode.UNAVAILABLE, "watch stream keeps ending early", [])
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        """The job's log lines; with ``follow``, until the job finishes."""
        stream = self._stub.StreamLogs(
            pb.StreamLogsRequest(job_id=job_id, follow=follow), metadata=self._metadata
        )
        try:
            for line in stream:
                yield line.text
        except grpc.RpcError as exc:
            raise ApiError.from_rpc_error(exc) from None
        finally:
            stream.cancel()

    def wait(self, job_id: str, *, timeout_s: float | None = None) -> JobRecord:
        """Block until the job reaches a terminal state; return it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for event in self.watch(job_id):
            if deadline is not None and time.monotonic() > deadline:
                break
            if event.state in TERMINAL_STATES:
                break
        return self.get(job_id)

    # -------------------------------------------------------------- plumbing
    def server_reachable(self, timeout_s: float = 2.0) -> bool:
        """Whether a gRPC server answers at the address within ``timeout_s``.

        Asks the standard health service, which needs no token.
        """
        try:
            HealthStub(self._channel).Check(HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code() not in _RETRYABLE  # type: ignore[attr-defined]
        return True

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, *, raw: bool = False) -> Any:
        """Call with deadline and token; ``raw`` lets ``grpc.RpcError`` through."""
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            if raw:
                raise
            raise ApiError.from_rpc_error(exc) from None


def _open_channel(config: ClientConfig) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if config.ca is None:
        return grpc.insecure_channel(config.address, options=options)

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(config.ca),
        private_key=read(config.client_key),
        certificate_chain=read(config.client_cert),
    )
    return grpc.secure_channel(config.address, credentials, options=options)
