"""End to end: a real Prometheus scrapes a real service while it runs real Adamax
and Nadam jobs on Ray; then every dashboard query returns data and the alert
rules load and evaluate cleanly in that Prometheus."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import load_generate

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "observability-test-token-0123456789"


def _spec(name: str, algorithm: str) -> dict:
    return {
        "name": name,
        "task": "digits",
        "optimizer": {"algorithm": algorithm, "lr": 0.002},
        # Eager optimizer step: the fused one's torch.compile start-up (~5 s a
        # worker) is tested in tests/runtime.
        "sharding": {"engine": "native", "stage": 2, "compile": False},
        # Half a CPU per worker: both jobs run at once on the session's 2-CPU head.
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "training": {"max_steps": 40, "batch_size": 32, "metrics_every": 2, "checkpoint_every": 40},
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Prometheus:
    """A real Prometheus server in a subprocess, scraping one target every second."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ROOT / "deploy" / "prometheus" / "rules" / "*.yml")],
            "scrape_configs": [
                {"job_name": "zerotrain", "static_configs": [{"targets": [target]}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (workdir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prometheus did not become ready:\n{log}")
            time.sleep(0.3)

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = _get_json(url)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _poll(client, jobs, done: threading.Event) -> None:
    """GetJob/ListJobs every half second and an unknown id now and then (NOT_FOUND)."""
    from zerotrain.service.client import ApiError

    calls = 0
    while not done.wait(0.5):
        for job in jobs:
            client.get(job.job_id)
        client.list()
        calls += 1
        if calls % 4 == 1:
            with contextlib.suppress(ApiError):
                client.get("j-does-not-exist")


def _finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


def test_every_dashboard_query_returns_data(
    prometheus_bin, promtool, ray_cluster: str, tmp_path: Path, monkeypatch
):
    from zerotrain.service.app import Service
    from zerotrain.service.client import JobClient
    from zerotrain.service.config import ServerConfig
    from zerotrain.service.model import JobState

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [{"token": TOKEN, "principal": "alice"}]}))
    service = Service(
        ServerConfig(
            address="127.0.0.1:0",
            metrics_port=0,
            health_port=0,  # any free port: never another service's
            data_dir=tmp_path / "data",
            ray_address=ray_cluster,  # the session's head (2 CPUs)
            tokens_file=tokens,
        )
    ).start()
    prometheus = None
    try:
        prometheus = Prometheus(prometheus_bin, tmp_path, f"127.0.0.1:{service.metrics_port}")
        with JobClient(service.address, token=TOKEN) as client:
            jobs = [
                client.submit(_spec("obs-nadam", "nadam")),
                client.submit(_spec("obs-adamax", "adamax")),
            ]
            # Client traffic while the jobs run, as dashboards and `trainctl` would make
            # it: rates are computed from counters that move between scrapes (a
            # counter first seen at its final value has a rate of 0).
            done = threading.Event()
            poller = threading.Thread(target=_poll, args=(client, jobs, done), daemon=True)
            poller.start()
            try:
                finals = [client.wait(job.job_id, timeout_s=400) for job in jobs]
            finally:
                done.set()
                poller.join(timeout=30)
            for final in finals:
                assert final.state == JobState.SUCCEEDED, final.state_reason

        # Prometheus scraped throughout; wait until it has seen the end state.
        job_ids = {job.job_id for job in jobs}
        deadline = time.monotonic() + 60
        while True:
            active = prometheus.query("zerotrain_training_active == 0")
            if {r["metric"]["job_id"] for r in active} >= job_ids:
                break
            assert time.monotonic() < deadline, f"finished jobs not scraped: {active}"
            time.sleep(1)

        generate = load_generate()
        legends = generate.dashboard_legend_labels()
        empty, unlabelled = [], []
        for where, expr in generate.dashboard_queries(rate_interval="5m"):
            result = prometheus.query(expr)
            if not _finite_values(result):
                empty.append(f"{where}: {expr} -> {result}")
            # Every label a panel's legend shows is on every series its query returns.
            for series in result:
                missing = legends.get(where, set()) - series["metric"].keys()
                if missing:
                    unlabelled.append(f"{where}: legend labels {sorted(missing)} not in {series}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        assert not unlabelled, "\n".join(unlabelled)

        # Both jobs are on the dashboard by job id, with every rank's state bytes.
        steps = {
            r["metric"]["job_id"]: float(r["value"][1])
            for r in prometheus.query("zerotrain_training_step")
        }
        assert steps == dict.fromkeys(job_ids, 40.0)
        ranks = prometheus.query("zerotrain_training_optimizer_state_bytes")
        assert {(r["metric"]["job_id"], r["metric"]["rank"]) for r in ranks} == {
            (j, rank) for j in job_ids for rank in ("0", "1")
        }

        # The real service's page passes promtool's lint with every series populated.
        with urllib.request.urlopen(
            f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10
        ) as response:
            page = response.read().decode()
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=60
        )
        assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), (
            lint.stdout + lint.stderr
        )

        # The alert rules loaded and evaluate without errors; none fires on a healthy run.
        groups = _get_json(f"{prometheus.url}/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 6 and all(rule["health"] == "ok" for rule in rules), rules
        firing = [r["name"] for r in rules if r["state"] == "firing"]
        assert firing == [], firing
    finally:
        if prometheus is not None:
            prometheus.stop()
        service.stop()
