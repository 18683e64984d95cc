"""What the job manager hands Ray for a job, checked against a fake Ray adapter (no cluster)."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

from zerotrain.service.ingest_token import ENV_TOKEN_FILE
from zerotrain.service.jobs import JobManager
from zerotrain.service.model import JobState
from zerotrain.service.ray_jobs import ClusterResources
from zerotrain.service.spec import JobSpec, load_spec
from zerotrain.service.store import JobStore


class FakeRay:
    """Records submissions; a cluster of one 4-CPU node."""

    address = "http://fake-ray"

    def __init__(self) -> None:
        self.submitted: list[tuple[str, str, dict[str, str]]] = []

    def cluster_resources(self) -> ClusterResources:
        return ClusterResources(
            total_cpus=4, total_gpus=0, max_node_cpus=4, max_node_gpus=0, num_nodes=1
        )

    def submit(self, job_id: str, entrypoint: str, *, env: dict, metadata: dict) -> str:
        self.submitted.append((job_id, entrypoint, dict(env)))
        return f"ray-{job_id}"


def test_the_job_reaches_ray_as_its_id_and_the_path_of_its_spec_json(tmp_path: Path):
    ray = FakeRay()
    manager = JobManager(
        JobStore(tmp_path / "jobs.db"),
        ray,  # type: ignore[arg-type]
        data_dir=tmp_path,
        ingest_token=lambda job_id: f"token-of-{job_id}",
    )
    # A server bound to port 0 learns its ingest address only after the manager exists.
    manager.ingest_address = "127.0.0.1:5555"
    spec = JobSpec.from_dict({"name": "hostile $(id) 'x'", "task": "regression"})

    record = manager.submit(spec, owner="alice")

    (job_id, entrypoint, env), = ray.submitted  # fmt: skip
    assert job_id == record.job_id and record.ray_job_id == f"ray-{job_id}"
    assert record.state == JobState.PENDING
    spec_path = tmp_path / "runs" / job_id / "spec.json"
    assert load_spec(spec_path) == spec
    assert stat.S_IMODE(os.stat(spec_path).st_mode) == 0o600
    command = shlex.split(entrypoint)
    assert command[command.index("--spec") + 1] == str(spec_path)
    assert command[command.index("--job-id") + 1] == job_id
    assert "--spec-json" not in command and not any("hostile" in part for part in command)
    assert env["ZEROTRAIN_JOB_ID"] == job_id
    assert env["ZEROTRAIN_INGEST_ADDRESS"] == "127.0.0.1:5555"
    token_file = Path(env[ENV_TOKEN_FILE])
    assert token_file.parent == spec_path.parent
    assert token_file.read_text() == f"token-of-{job_id}"
