"""deploy/k8s: core kinds validated against the Kubernetes schemas (kubernetes-validate,
strict), the custom resources (KubeRay, Prometheus operator) checked structurally,
and the pieces checked against each other (names, ports, labels, the image's CLI)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from .conftest import DEPLOY

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30"
CUSTOM_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}


def load_all() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in load_all() if doc["kind"] == kind]


def test_kustomization_lists_every_manifest():
    (kustomization,) = by_kind("Kustomization")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


@pytest.mark.parametrize(
    "doc",
    [d for d in load_all() if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_core_kinds_validate_strictly(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert doc["metadata"].get("namespace", "zerotrain") == "zerotrain"


def test_validation_is_strict():
    """The check above is real: an unknown field is refused."""
    (deployment,) = by_kind("Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_kind_is_known():
    for doc in load_all():
        key = (doc["apiVersion"], doc["kind"])
        if key not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION)  # raises on unknown kinds


def _pod_specs(raycluster: dict) -> list[dict]:
    groups = [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_raycluster_structure():
    (cluster,) = by_kind("RayCluster")
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert isinstance(spec["rayVersion"], str)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    claims = {claim["metadata"]["name"] for claim in by_kind("PersistentVolumeClaim")}
    for pod in _pod_specs(cluster):
        # The pod templates are core PodSpecs: validate them as such.
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod},
            KUBERNETES_VERSION,
            strict=True,
        )
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "zerotrain-ray-auth"
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] in claims
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/dev/shm"}


def test_service_points_at_the_ray_head_and_exposes_metrics():
    (cluster,) = by_kind("RayCluster")
    (deployment,) = by_kind("Deployment")
    (service,) = by_kind("Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if "=" in a)
    # KubeRay names the head service <cluster>-head-svc; the dashboard serves the Jobs API.
    assert args["ray-address"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(args["metrics-port"]) == ports["metrics"]
    assert args["address"].endswith(f":{ports['grpc']}")
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert (
        deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    )
    # Probes go to the health port, never the API port whose budget users share.
    assert int(args["health-port"]) == ports["health"] != ports["grpc"]
    assert container["readinessProbe"]["grpc"]["port"] == ports["health"]
    assert container["livenessProbe"]["grpc"]["port"] == ports["health"]
    assert "health" not in {p["name"] for p in service["spec"]["ports"]}


def test_monitors_select_the_right_targets():
    (service,) = by_kind("Service")
    (monitor,) = by_kind("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    (pod_monitor,) = by_kind("PodMonitor")
    (cluster,) = by_kind("RayCluster")
    names = set(pod_monitor["spec"]["selector"]["matchExpressions"][0]["values"])
    for pod_template in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        labels = pod_template["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] in names
        ports = {
            p["name"] for c in pod_template["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_prometheus_rule_matches_the_rules_file():
    (rule,) = by_kind("PrometheusRule")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "zerotrain.rules.yml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]
