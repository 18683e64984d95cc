"""An embedded local Ray head for the service (and the tests).

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

A head started here always runs with ``RAY_AUTH_MODE=token`` and a generated
token (see :mod:`zerotrain.service.ray_jobs` for how clients pass it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from zerotrain.service.ray_jobs import RayJobs

__all__ = ["LocalRay", "free_port", "start_local_ray"]

logger = logging.getLogger(__name__)

_STATE_FILE = "zerotrain_ray_head.json"
_TOKEN_FILE = "auth_token"
_RAY_SUBDIR = "ray"
_OWNER_ONLY_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW


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
        raise RuntimeError(
            f"{path}: cannot be opened safely ({exc.strerror}); refusing it"
        ) from None
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
