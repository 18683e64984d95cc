"""Adapter over Ray's Jobs API, and an embedded local Ray head for the service.

:class:`RayJobs` is the only place that talks to ``JobSubmissionClient``: the
job manager asks it to submit, inspect, stop and read the logs of Ray jobs and
for the cluster's total resources, and gets plain Python values back.

:func:`start_local_ray` starts a private single-node Ray head (``ray start
--head --block``) with its dashboard on loopback, its own temp dir, its own
free ports and its own auth token, so several heads (other services, tests)
coexist on one machine. The head runs in its own session: it outlives a
crashed service, and a restarted service finds it again through the state
file in the temp dir and re-attaches to the jobs still running there.

The temp dir is private: 0700 and the service user's (a symlink, or a dir or
state file of another user, is refused rather than trusted), and Ray's own
files go one level down (``<temp dir>/ray``), because Ray makes its temp dir
world-writable and its logs world-readable. Our files in it are opened without
following symlinks.

Ray token auth: a head started here always runs with ``RAY_AUTH_MODE=token``
and a generated token. Clients pass it as ``Authorization: Bearer <token>``;
for an existing cluster, :class:`RayJobs` takes the token from its ``token``
argument, else from ``RAY_AUTH_TOKEN`` or the file named by
``RAY_AUTH_TOKEN_PATH`` (Ray's own conventions), else sends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

__all__ = [
    "ClusterResources",
    "LocalRay",
    "RayJobInfo",
    "RayJobs",
    "free_port",
    "runtime_entrypoint",
    "start_local_ray",
]

logger = logging.getLogger(__name__)

_STATE_FILE = "zerotrain_ray_head.json"


class _Stoppable(Protocol):
    def is_set(self) -> bool: ...


_TOKEN_FILE = "auth_token"
_RAY_SUBDIR = "ray"
_OWNER_ONLY_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW


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
    job_id: str, spec_json: str, storage: str | Path, *, allow_custom_tasks: bool = False
) -> str:
    """The shell command a Ray job runs for a zerotrain job (quoted for ``sh``).

    ``--machine``: the job's log keeps Ray's output and the metrics lines as
    they come, for ``trainctl logs`` and for the failure reason read from it.
    """
    parts = [
        sys.executable, "-m", "service.runtime", "--machine", "--spec-json", spec_json,
        "--job-id", job_id, "--storage", str(storage),
    ]  # fmt: skip
    if allow_custom_tasks:
        parts.append("--allow-custom-tasks")
    return " ".join(shlex.quote(part) for part in parts)


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


# -- embedded local head -----------------------------------------------------


@dataclass
class LocalRay:
    """A Ray head started by :func:`start_local_ray`."""

    address: str  # dashboard URL, e.g. http://127.0.0.1:40123
    token: str
    temp_dir: Path
    pid: int
    reused: bool = False

    @property
    def ray_dir(self) -> Path:
        """Ray's own temp dir (sessions, sockets, logs), inside the private ``temp_dir``."""
        return self.temp_dir / _RAY_SUBDIR

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop this head and every process it started (never other Ray clusters).

        ``ray start --block`` stops its node's processes on SIGTERM; whatever
        is left after ``timeout_s`` (idle workers, agents) gets SIGTERM, then
        SIGKILL. The process tree is taken before anything is signalled.
        """
        try:
            head = psutil.Process(self.pid)
            procs = [head, *head.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        if procs:
            _signal(procs[:1], signal.SIGTERM)
            psutil.wait_procs(procs[:1], timeout=timeout_s)
            _, alive = psutil.wait_procs(procs, timeout=1)
            _signal(alive, signal.SIGTERM)
            _, alive = psutil.wait_procs(alive, timeout=3)
            _signal(alive, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(FileNotFoundError):
            (self.temp_dir / _STATE_FILE).unlink()


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


_handed_out_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """A free loopback port that this process has not handed out before.

    Once a probe socket is closed the kernel may give the same port to the
    next ``bind(0)``, and Ray refuses to start when two of its components get
    the same port, so ports handed out here are never repeated.
    """
    with _port_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port


def _reachable(address: str, token: str) -> bool:
    try:
        RayJobs(address, token=token)
    except (ConnectionError, RuntimeError, OSError):
        return False
    return True


def _ready(address: str, token: str) -> bool:
    """The dashboard answers and already lists the head node with its CPUs."""
    try:
        return RayJobs(address, token=token).cluster_resources().num_nodes > 0
    except (ConnectionError, RuntimeError, OSError, ValueError):
        return False


def _private_dir(path: Path) -> Path:
    """``path`` as a directory only the service user can enter (created 0700 if missing).

    Raises:
        RuntimeError: it is a symlink, not a directory, or another user's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RuntimeError(f"Ray temp dir {path}: not a plain directory; refusing to use it")
    if info.st_uid != os.getuid():
        raise RuntimeError(
            f"Ray temp dir {path}: belongs to uid {info.st_uid}, not to the service user "
            f"(uid {os.getuid()}); refusing to use it (remove it, or pick another data dir)"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _read_state(path: Path) -> dict | None:
    """The head state file, if present and the service user's own (never through a symlink).

    Raises:
        RuntimeError: the file is a symlink, another user's, or writable by others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink
        raise RuntimeError(f"{path}: cannot be opened safely ({exc.strerror}); refusing it") from None
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise RuntimeError(
                f"{path}: owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}, "
                f"not the service user's (uid {os.getuid()}) alone; refusing to trust it "
                "(remove it if it is stale)"
            )
        try:
            state = json.load(f)
            return {"pid": int(state["pid"]), "address": str(state["address"]),
                    "token": str(state["token"])}  # fmt: skip
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: unreadable, starting a new head", path)
    path.unlink()
    return None


def start_local_ray(
    temp_dir: str | Path,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int = 512 * 1024**2,
    timeout_s: float = 90.0,
) -> LocalRay:
    """Start (or re-attach to) a private local Ray head with its dashboard.

    If ``temp_dir`` holds the state file of a head that is still alive (the
    service crashed or was restarted), that head is reused, so jobs running on
    it are not lost. Keep ``temp_dir`` short: Ray puts unix sockets under it
    (paths are limited to ~100 bytes).

    Returns:
        The head; call :meth:`LocalRay.shutdown` to stop it.
    """
    temp_dir = _private_dir(Path(temp_dir).absolute())
    state_path = temp_dir / _STATE_FILE
    state = _read_state(state_path)
    if state is not None:
        if psutil.pid_exists(state["pid"]) and _reachable(state["address"], state["token"]):
            logger.info("re-attaching to the local Ray head at %s", state["address"])
            return LocalRay(state["address"], state["token"], temp_dir, state["pid"], reused=True)
        state_path.unlink()

    token = secrets.token_hex(32)
    token_path = temp_dir / _TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        token_path.unlink()  # never write through a link someone left here
    with os.fdopen(os.open(token_path, _OWNER_ONLY_CREATE, 0o600), "w") as f:
        f.write(token)
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--temp-dir={temp_dir / _RAY_SUBDIR}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats", f"--object-store-memory={object_store_memory}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    # On SIGTERM a head drains for up to 30 s by default (for Ray Serve's replicas); this
    # head is stopped as a whole, its jobs with it, so draining only delays shutdown.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    log = os.fdopen(
        os.open(temp_dir / "head.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                0o600), "ab",
    )  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    head = LocalRay(address, token, temp_dir, proc.pid)
    deadline = time.monotonic() + timeout_s
    while not _ready(address, token):
        if proc.poll() is not None or time.monotonic() > deadline:
            head.shutdown(timeout_s=5)
            tail = (temp_dir / "head.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"the local Ray head did not start within {timeout_s:.0f}s "
                f"(exit code {proc.poll()}); its log ends with:\n{tail}"
            )
        time.sleep(0.5)
    # Written atomically, owner-only: it holds the token.
    tmp = state_path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with os.fdopen(os.open(tmp, _OWNER_ONLY_CREATE, 0o600), "w") as f:
        json.dump({"pid": proc.pid, "address": address, "token": token}, f)
    os.replace(tmp, state_path)
    logger.info("started a local Ray head at %s (temp dir %s)", address, temp_dir)
    return head
