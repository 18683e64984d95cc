"""Beyond one machine: a real two-node Ray cluster (two ``ray start`` nodes on this
machine, each with its own temp dir, CPUs and ports, token auth on), the service
pointed at it, and a 2-worker SPREAD job whose workers must land on different nodes.

Where the workers ran comes from Ray's state API (the Train worker actors' node
ids), not from the job's own word.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from .ray_cluster import MultiNodeCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "multinode-test-token-0123456789"
SPEC = {
    "name": "multinode-spread",
    "task": "regression",
    "optimizer": {"algorithm": "adamax", "lr": 0.01},
    # Eager optimizer step: the fused one's torch.compile start-up (~5 s a
    # worker) is tested in tests/runtime.
    "sharding": {"engine": "native", "stage": 2, "compile": False},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1, "placement": "SPREAD"},
    "training": {"max_steps": 6, "batch_size": 16, "metrics_every": 3, "checkpoint_every": 6},
}


@pytest.fixture(scope="module")
def two_node_cluster():
    cluster = MultiNodeCluster.create()
    try:
        # 2 CPUs per node: both workers would fit on one node, so only SPREAD separates them.
        cluster.start_head(num_cpus=2)
        cluster.add_node("node2", num_cpus=2)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(cluster.root, ignore_errors=True)


def _train_worker_nodes(cluster: MultiNodeCluster) -> list[str]:
    """Node ids of the Ray Train worker actors (alive or finished) on the cluster."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(
        cluster.dashboard_url,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {cluster.token}"},
    )
    actors = client.list(
        StateResource.ACTORS,
        options=ListApiOptions(detail=True, filters=[("class_name", "=", "RayTrainWorker")]),
        raise_on_missing_output=False,
    )
    return [a.node_id for a in actors]


def test_two_node_cluster_has_two_nodes(two_node_cluster):
    nodes = two_node_cluster.alive_nodes()
    assert len({n["node_id"] for n in nodes}) == 2
    assert sum(bool(n["is_head_node"]) for n in nodes) == 1
    assert all(n["resources_total"]["CPU"] == 2 for n in nodes)


def test_spread_job_through_the_service_runs_one_worker_per_node(
    two_node_cluster, tmp_path: Path, monkeypatch
):
    from zerotrain.service.app import Service
    from zerotrain.service.client import JobClient
    from zerotrain.service.config import ServerConfig
    from zerotrain.service.model import JobState

    # The service reaches the token-protected cluster the way a deployment does:
    # RAY_AUTH_MODE=token and the cluster's token (here by path).
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(two_node_cluster.token_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [{"token": TOKEN, "principal": "alice"}]}))

    service = Service(
        ServerConfig(
            address="127.0.0.1:0",
            metrics_port=-1,
            health_port=0,  # any free port: never another service's
            data_dir=tmp_path / "data",
            ray_address=two_node_cluster.dashboard_url,
            tokens_file=tokens,
        )
    ).start()
    try:
        with JobClient(service.address, token=TOKEN) as client:
            job = client.submit(SPEC)
            started = time.monotonic()
            final = client.wait(job.job_id, timeout_s=400)
        assert final.state == JobState.SUCCEEDED, (
            f"{final.state.value}: {final.state_reason} "
            f"after {time.monotonic() - started:.0f}s"
        )
    finally:
        service.stop()

    worker_nodes = _train_worker_nodes(two_node_cluster)
    alive = {n["node_id"] for n in two_node_cluster.alive_nodes()}
    assert len(worker_nodes) == 2, worker_nodes
    assert set(worker_nodes) == alive, "SPREAD must put one worker on each node"
