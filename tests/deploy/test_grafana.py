"""deploy/grafana: provisioning, the dashboard's structure, and generated files in sync."""

from __future__ import annotations

import json

import yaml

from .conftest import DEPLOY

GRAFANA = DEPLOY / "grafana"


def test_generated_files_are_in_sync(generate):
    for path, text in generate.render().items():
        assert path.read_text() == text, f"{path} is stale: run python deploy/generate.py"


def test_configmap_carries_the_dashboard_json():
    configmap = yaml.safe_load((DEPLOY / "k8s" / "grafana-dashboard-configmap.yaml").read_text())
    dashboard = (GRAFANA / "dashboards" / "zerotrain.json").read_text()
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"]["zerotrain.json"] == dashboard


def test_dashboard_structure():
    dashboard = json.loads((GRAFANA / "dashboards" / "zerotrain.json").read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["multi"] and variables["job"]["includeAll"]
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("jobs by state", "loss", "throughput", "phase", "grad norm", "update",
                  "adamax", "nadam", "state bytes", "skipped", "grpc", "latency"):  # fmt: skip
        assert topic in titles or topic in json.dumps(dashboard).lower(), topic


def test_provisioning_points_at_the_dashboards_and_prometheus():
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and source["isDefault"]
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "zerotrain.yml").read_text()
    )
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
