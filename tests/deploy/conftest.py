"""Fixtures for the deployment tests: tool binaries, the deploy/ folder, exported metric names."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zerotrain.service.metrics import ServiceMetrics
from zerotrain.service.records import MetricsRecord

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def find_tool(name: str) -> str | None:
    """A binary from the project's ``.prometheus/`` (make prometheus) or ``.venv/bin``, else PATH."""
    for folder in (ROOT / ".prometheus" / "usr" / "bin", ROOT / ".venv" / "bin"):
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


@pytest.fixture(scope="session")
def promtool() -> str:
    path = find_tool("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make prometheus` (installs it into .prometheus/)")
    return path


def load_generate() -> ModuleType:
    """deploy/generate.py, imported by path (deploy/ is not a package)."""
    name = "zerotrain_deploy_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DEPLOY / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def generate() -> ModuleType:
    return load_generate()


def _record(job_id: str, algorithm: str, step: int) -> MetricsRecord:
    stats = {"step": float(step), "lr": 0.01, "grad_norm": 1.0, "param_norm": 5.0,
             "update_norm": 0.01, "update_param_ratio": 0.002, "state_bytes_per_rank": 800.0,
             "skipped_steps": 0.0}  # fmt: skip
    if algorithm == "adamax":
        stats |= {"adamax_u_max": 2.0, "adamax_u_mean": 0.3, "adamax_u_refreshed_fraction": 0.4}
    else:
        stats |= {"nadam_mu_t": 0.9, "nadam_mu_product": 0.8, "nadam_bias_correction1": 0.1,
                  "nadam_bias_correction2": 0.01, "nadam_sqrt_v_hat_mean": 0.05}  # fmt: skip
    fields = {"job_id": job_id, "attempt": 1, "step": step, "time": 0.0, "rank": 0,
              "world_size": 2, "loss": 1.0, "accuracy": 0.5, "samples_per_second": 100.0,
              "lr": 0.01, "phase_seconds": dict.fromkeys(("data", "forward", "backward",
              "communication", "optimizer"), 0.01), "optimizer": stats,
              "state_bytes_per_rank": [800, 800], "final": False}  # fmt: skip
    return MetricsRecord.from_dict(job_id, fields)


@pytest.fixture(scope="session")
def exported_metric_names() -> set[str]:
    """Sample names on a real scrape of a ServiceMetrics that saw every kind of update."""
    metrics = ServiceMetrics()
    metrics.record_training(_record("j-adamax", "adamax", 10))
    metrics.record_training(_record("j-nadam", "nadam", 10))
    metrics.set_job_states({"RUNNING": 2, "FAILED": 0})
    metrics.inc_submissions()
    metrics.inc_reconciliation_errors()
    metrics.observe_rpc("zerotrain.v1.JobService/GetJob", "OK", 0.001)
    port = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            page = response.read().decode()
    finally:
        metrics.close()
    return {
        sample.name
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name.startswith("zerotrain_")
    }
