"""Adapter over Ray's Jobs API: the only module of the service that talks to Ray Jobs.

:class:`RayJobs` is the only place that talks to ``JobSubmissionClient``: the
job manager asks it to submit, inspect, stop and read the logs of Ray jobs and
for the cluster's total resources, and gets plain Python values back.

Ray token auth: clients pass the token as ``Authorization: Bearer <token>``;
for an existing cluster, :class:`RayJobs` takes the token from its ``token``
argument, else from ``RAY_AUTH_TOKEN`` or the file named by
``RAY_AUTH_TOKEN_PATH`` (Ray's own conventions), else sends none. A head
started by :func:`zerotrain.service.local_ray.start_local_ray` always runs with a token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shlex
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["ClusterResources", "RayJobInfo", "RayJobs", "runtime_entrypoint"]

logger = logging.getLogger(__name__)

class _Stoppable(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class RayJobInfo:
    """What Ray knows about one submitted job."""

    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str
    start_time: float | None  # seconds since the epoch (Ray reports ms)
    end_time: float | None
    driver_exit_code: int | None


@dataclass(frozen=True)
class ClusterResources:
    """Totals over the cluster's alive nodes (what could ever be scheduled)."""

    total_cpus: float
    total_gpus: float
    max_node_cpus: float
    max_node_gpus: float
    num_nodes: int


def runtime_entrypoint(
    job_id: str, spec_path: str | Path, storage: str | Path, *, allow_custom_tasks: bool = False
) -> str:
    """The shell command a Ray job runs for a zerotrain job (quoted for ``sh``).

    The job's description travels as the path of its ``spec.json`` (written by
    the service into the run directory), never as JSON on the command line,
    where ``ps`` and Ray's logs would show it. ``--machine``: the job's log keeps
    Ray's output and the metrics lines as they come, for ``trainctl logs`` and
    for the failure reason read from it.

    The job runs in its run directory (the spec's), with ``python -P``: Ray puts
    a driver's working directory on its workers' ``sys.path``, and a checkout's
    root there would make ``optim`` importable beside ``zerotrain.optim``, two
    copies of every class.
    """
    spec_path = Path(spec_path).resolve()
    if "://" not in str(storage):
        storage = Path(storage).resolve()
    parts = [
        sys.executable, "-P", "-m", "zerotrain.service.runtime", "--machine",
        "--spec", str(spec_path), "--job-id", job_id, "--storage", str(storage),
    ]  # fmt: skip
    if allow_custom_tasks:
        parts.append("--allow-custom-tasks")
    command = " ".join(shlex.quote(part) for part in parts)
    return f"cd {shlex.quote(str(spec_path.parent))} && exec {command}"


def _resolve_token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).is_file():
        return Path(path).read_text().strip()
    return None


class RayJobs:
    """Submit, inspect, stop and read logs of Ray jobs on one cluster.

    Args:
        address: the cluster's dashboard address, e.g. ``http://127.0.0.1:8265``.
        token: Ray auth token (see the module docstring for the fallbacks).

    Raises:
        ConnectionError: the dashboard cannot be reached.
    """

    def __init__(self, address: str, *, token: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address if "://" in address else f"http://{address}"
        token = _resolve_token(token)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._client = JobSubmissionClient(self.address, headers=dict(self._headers))
        except (ConnectionError, RuntimeError) as exc:
            raise ConnectionError(
                f"cannot reach the Ray dashboard at {self.address}: {exc}"
            ) from exc

    def submit(
        self,
        job_id: str,
        entrypoint: str,
        *,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Submit ``entrypoint`` as Ray job ``job_id`` (the submission id); returns it.

        Submitting the same ``job_id`` again does not start a second job: Ray
        refuses the duplicate and this returns the id of the existing one.
        """
        runtime_env = {"env_vars": dict(env)} if env else None
        try:
            return self._client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata=dict(metadata or {}),
            )
        except RuntimeError as exc:
            if "already exists" in str(exc) and self.info(job_id) is not None:
                return job_id
            raise

    def info(self, ray_job_id: str) -> RayJobInfo | None:
        """The job's status in Ray, or ``None`` if Ray does not know it."""
        try:
            details = self._client.get_job_info(ray_job_id)
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return None
            raise
        return RayJobInfo(
            status=str(details.status.value if hasattr(details.status, "value") else details.status),
            message=details.message or "",
            start_time=details.start_time / 1000 if details.start_time else None,
            end_time=details.end_time / 1000 if details.end_time else None,
            driver_exit_code=details.driver_exit_code,
        )

    def stop(self, ray_job_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL); False if it had already ended."""
        try:
            return bool(self._client.stop_job(ray_job_id))
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return False
            raise

    def logs(self, ray_job_id: str) -> str:
        """The job's whole driver log so far ("" if Ray does not know the job)."""
        try:
            return self._client.get_job_logs(ray_job_id)
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return ""
            raise

    def tail_logs(
        self, ray_job_id: str, *, stop: _Stoppable | None = None, poll_s: float = 0.5
    ) -> Iterator[str]:
        """Yield log chunks as the job writes them; ends when the job ends or ``stop`` is set.

        ``stop`` is a :class:`threading.Event` (anything with ``is_set()``).

        Ray's tail API is an async websocket stream; it is pumped on a private
        event loop thread into a queue so callers can stay synchronous and stop
        at any time.
        """
        chunks: queue.Queue[str | BaseException | None] = queue.Queue()
        loop = asyncio.new_event_loop()

        async def pump() -> None:
            try:
                async for chunk in self._client.tail_job_logs(ray_job_id):
                    chunks.put(chunk)
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                chunks.put(exc)
            chunks.put(None)

        task = loop.create_task(pump())
        thread = threading.Thread(
            target=loop.run_until_complete, args=(task,), name=f"tail-{ray_job_id}", daemon=True
        )
        thread.start()
        try:
            while True:
                if stop is not None and stop.is_set():
                    return
                try:
                    item = chunks.get(timeout=poll_s)
                except queue.Empty:
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            loop.call_soon_threadsafe(task.cancel)
            thread.join(timeout=5)
            if not thread.is_alive():
                loop.close()

    def cluster_resources(self) -> ClusterResources:
        """CPU/GPU totals of the alive nodes, from the dashboard's state API."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, NodeState, StateResource

        client = StateApiClient(
            self.address, headers={"Content-Type": "application/json", **self._headers}
        )
        nodes = client.list(
            StateResource.NODES,
            options=ListApiOptions(detail=False),
            raise_on_missing_output=False,
        )
        alive = [n for n in nodes if isinstance(n, NodeState) and n.state == "ALIVE"]
        cpus = [float(n.resources_total.get("CPU", 0.0)) for n in alive]
        gpus = [float(n.resources_total.get("GPU", 0.0)) for n in alive]
        return ClusterResources(
            total_cpus=sum(cpus),
            total_gpus=sum(gpus),
            max_node_cpus=max(cpus, default=0.0),
            max_node_gpus=max(gpus, default=0.0),
            num_nodes=len(alive),
        )
