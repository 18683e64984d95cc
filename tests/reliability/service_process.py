"""``python -m zerotrain.service serve`` as a real subprocess that tests can SIGKILL and restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil

from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb
from zerotrain.service.api.zerotrain.v1 import job_service_pb2_grpc as pb_grpc

__all__ = ["RawWatcher", "ServiceProcess", "free_port", "job_processes", "scrape", "wait_for"]

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


class ServiceProcess:
    """The service on fixed ports (so a restart is reachable where clients expect it)."""

    def __init__(
        self, data_dir: Path, ray_address: str, tokens_file: Path, *extra_args: str
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = data_dir / "service.log"
        self.args = [
            sys.executable, "-m", "zerotrain.service", "serve",
            "--address", f"127.0.0.1:{self.port}",
            "--metrics-port", str(self.metrics_port),
            "--health-port", "0",
            "--data-dir", str(data_dir),
            "--ray-address", ray_address,
            "--tokens-file", str(tokens_file),
            *extra_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> float:
        """Start it and wait until it serves; returns the seconds that took."""
        began = time.monotonic()
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
            )

        def serving() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()[-3000:]
            return self.log().count("zerotrain: serving on") >= self.starts

        wait_for(serving, timeout_s, "the service to serve", poll_s=0.1)
        return time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RawWatcher(threading.Thread):
    """WatchJob over a raw stub, reconnecting with the last sequence it saw.

    Keeps every event exactly as received, so gaps *and* repeats are visible
    (``JobClient.watch`` would hide repeats).
    """

    def __init__(self, address: str, token: str, job_id: str) -> None:
        super().__init__(daemon=True, name=f"watch-{job_id}")
        self.address, self.token, self.job_id = address, token, job_id
        self.events: list[pb.JobEvent] = []
        self.reconnects = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        metadata = (("authorization", f"Bearer {self.token}"),)
        deadline = time.monotonic() + 600
        while not self._halt.is_set() and time.monotonic() < deadline:
            last = self.events[-1].sequence if self.events else 0
            with grpc.insecure_channel(self.address) as channel:
                stream = pb_grpc.JobServiceStub(channel).WatchJob(
                    pb.WatchJobRequest(job_id=self.job_id, from_sequence=last), metadata=metadata
                )
                try:
                    for event in stream:
                        self.events.append(event)
                        if event.HasField("state_change") and event.state_change.state in TERMINAL:
                            return
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        self.error = exc
                        return
            self.reconnects += 1
            time.sleep(0.2)

    def stop(self) -> None:
        self._halt.set()


CLUSTER_SINGLETONS = ("ray::_AutoscalingCoordinatorActor",)
"""Detached, cluster-wide Ray Train actors: created once by the first Train run on a
cluster (so they inherit that job's runtime env) and shared by every later run. They
hold no resources and are not the job's; they live as long as the cluster."""


def job_processes(job_id: str) -> list[psutil.Process]:
    """Every live process that belongs to the job: its Ray job driver and every Ray
    worker process running for it (all carry ``ZEROTRAIN_JOB_ID`` in their environment:
    the service sets it in the Ray job's runtime env, which its tasks and actors inherit),
    except the :data:`CLUSTER_SINGLETONS`."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if (
                proc.environ().get("ZEROTRAIN_JOB_ID") == job_id
                and proc.status() != psutil.STATUS_ZOMBIE
                and proc.name() not in CLUSTER_SINGLETONS
                and not any(a in CLUSTER_SINGLETONS for a in proc.cmdline()[:1])
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def scrape(metrics_port: int) -> str:
    """The service's Prometheus page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()
