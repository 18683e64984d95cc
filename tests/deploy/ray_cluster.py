"""A real multi-node Ray cluster on one machine, for tests: ``ray start --head`` plus
``ray start --address=...`` nodes, each with its own temp dir, CPU count and ports,
token auth on, and shut down by the pids this helper started (never ``ray stop``,
which would hit every Ray cluster of the user on the machine)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from zerotrain.service.local_ray import free_port

__all__ = ["MultiNodeCluster", "RayNode"]

_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)
_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")




@dataclass
class RayNode:
    """One ``ray start --block`` process (and everything it spawned)."""

    name: str
    temp_dir: Path
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the node (``ray start --block`` stops its processes), then kill leftovers."""
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            root.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


@dataclass
class MultiNodeCluster:
    """A head node plus worker nodes on this machine, with token authentication.

    ``env`` is what a client (driver, job submission, state API) needs: the auth
    mode and token path, and ``RAY_ADDRESS`` pointing at the head's GCS.
    """

    root: Path
    token_path: Path
    gcs_address: str = ""
    dashboard_url: str = ""
    nodes: list[RayNode] = field(default_factory=list)

    @classmethod
    def create(cls) -> MultiNodeCluster:
        # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
        root = Path(tempfile.mkdtemp(prefix="ztmn-", dir="/tmp"))
        token_path = root / "auth_token"
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        return cls(root=root, token_path=token_path)

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        env.pop("RAY_AUTH_TOKEN", None)
        if self.gcs_address:
            env["RAY_ADDRESS"] = self.gcs_address
        return env

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def _start(self, name: str, args: list[str]) -> RayNode:
        temp_dir = self.root / name
        temp_dir.mkdir()
        log_path = self.root / f"{name}.log"
        ports = [f"--{port}={free_port()}" for port in _NODE_PORTS]
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
            f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
            "--disable-usage-stats", f"--object-store-memory={256 * 1024**2}",
            *ports, *args,
        ]  # fmt: skip
        env = self.env
        env.pop("RAY_ADDRESS", None)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = RayNode(name, temp_dir, process, log_path)
        self.nodes.append(node)
        return node

    def start_head(self, *, num_cpus: int) -> RayNode:
        ports = {name: free_port() for name in _HEAD_PORTS}
        node = self._start(
            "head",
            [
                "--head",
                f"--num-cpus={num_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                *(f"--{name}={port}" for name, port in ports.items()),
            ],
        )
        self.gcs_address = f"127.0.0.1:{ports['port']}"
        self.dashboard_url = f"http://127.0.0.1:{ports['dashboard-port']}"
        return node

    def add_node(self, name: str, *, num_cpus: int) -> RayNode:
        assert self.gcs_address, "start the head first"
        return self._start(name, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"])

    def alive_nodes(self) -> list[dict]:
        """The ALIVE nodes as Ray's state API lists them (node_id, resources_total, ...)."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(
            self.dashboard_url,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        nodes = client.list(
            StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
        )
        return [n.__dict__ if not isinstance(n, dict) else n for n in nodes if n.state == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(
                        f"ray node {node.name} exited with {node.process.returncode}:\n"
                        f"{node.log_tail()}"
                    )
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= count:
                    return nodes
            except Exception as exc:  # dashboard still starting
                last_error = exc
            time.sleep(1.0)
        logs = "\n".join(f"--- {n.name}\n{n.log_tail(1500)}" for n in self.nodes)
        raise TimeoutError(f"{count} Ray nodes not alive in {timeout_s}s ({last_error}):\n{logs}")

    def shutdown(self) -> None:
        """Stop every node started here (only those processes), all at once."""
        with ThreadPoolExecutor(max_workers=max(len(self.nodes), 1)) as pool:
            list(pool.map(RayNode.stop, self.nodes))
