"""deploy/docker-compose.yml, checked structurally (Docker cannot run here): the
services exist, images are pinned, bind mounts point at files in the repo, and the
addresses/ports the pieces use to find each other agree."""

from __future__ import annotations

import re

import yaml

from .conftest import DEPLOY, ROOT

COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _flags(command: list[str]) -> dict[str, str]:
    return dict(
        a.removeprefix("--").split("=", 1) for a in command if a.startswith("--") and "=" in a
    )


def test_services_present():
    assert set(SERVICES) == {"ray-head", "ray-worker", "zerotrain", "prometheus", "grafana"}


def test_images_are_pinned_and_built_from_the_dockerfile():
    for name, service in SERVICES.items():
        image = service["image"]
        if image.startswith("zerotrain:"):
            continue  # built here
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    build = SERVICES["ray-head"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"


def test_bind_mounts_and_secrets_exist():
    named = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} not declared"
        for secret in service.get("secrets", []):
            assert secret in COMPOSE["secrets"], f"{name}: secret {secret} not declared"
    for secret in COMPOSE["secrets"].values():
        default = re.sub(r"\$\{\w+:-(.*)\}", r"\1", secret["file"])
        assert (DEPLOY / default).is_file(), default


def test_ray_workers_scale():
    worker = SERVICES["ray-worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "ports" not in worker and "container_name" not in worker, "would block --scale"
    head_flags = _flags(SERVICES["ray-head"]["command"])
    assert _flags(worker["command"])["address"] == f"ray-head:{head_flags['port']}"
    for name in ("ray-head", "ray-worker", "zerotrain"):
        env = SERVICES[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
        assert "/data" in [v.split(":")[1] for v in SERVICES[name]["volumes"]], name


def test_service_prometheus_and_grafana_find_each_other():
    head_flags = _flags(SERVICES["ray-head"]["command"])
    service_flags = _flags(SERVICES["zerotrain"]["command"])
    assert service_flags["ray-address"] == f"http://ray-head:{head_flags['dashboard-port']}"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for c in job.get("static_configs", []) for t in c["targets"]]
        for job in prometheus["scrape_configs"]
    }
    assert targets["zerotrain"] == [f"zerotrain:{service_flags['metrics-port']}"]
    assert (
        f"{service_flags['metrics-port']}:{service_flags['metrics-port']}"
        in SERVICES["zerotrain"]["ports"]
    )
    assert targets["ray"] == [f"ray-head:{head_flags['metrics-export-port']}"]
    worker_sd = prometheus["scrape_configs"][1]["dns_sd_configs"][0]
    assert worker_sd["names"] == ["ray-worker"]
    assert (
        str(worker_sd["port"]) == _flags(SERVICES["ray-worker"]["command"])["metrics-export-port"]
    )
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert (
        datasource["url"] == "http://prometheus:9090"
        and "9090:9090" in SERVICES["prometheus"]["ports"]
    )
    mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["grafana"]["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()


def _serve_flags_used() -> dict[str, list[str]]:
    """Flags given to `python -m zerotrain.service serve` by the Dockerfile, compose and k8s."""
    import json

    dockerfile = (ROOT / "Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*?\])$", dockerfile.replace("\\\n", ""), re.M | re.S)
    deployment = next(
        d for d in yaml.safe_load_all((DEPLOY / "k8s" / "service.yaml").read_text())
        if d["kind"] == "Deployment"
    )  # fmt: skip
    return {
        "Dockerfile CMD": json.loads(cmd),
        "compose zerotrain": SERVICES["zerotrain"]["command"],
        "k8s Deployment": deployment["spec"]["template"]["spec"]["containers"][0]["args"],
    }


def test_serve_flags_are_the_services_real_flags():
    """Each command line parses with the service's own parser and gives a valid ServerConfig."""
    from zerotrain.service.__main__ import build_parser, config_from_args

    for where, args in _serve_flags_used().items():
        assert args[0] == "serve", where
        parsed = build_parser().parse_args(args)  # argparse exits on an unknown flag
        config = config_from_args(parsed, env={})
        assert config.address == "0.0.0.0:50051", where
        assert config.health_port == 50052, where
        assert config.metrics_port == 9464, where
        assert str(config.data_dir) == "/data", where
        assert config.tokens_file is not None, where


def test_health_checks_fit_each_container():
    """The image's HEALTHCHECK probes the gRPC service: Ray containers must replace or disable it."""
    assert SERVICES["ray-head"]["healthcheck"]["test"][:2] == ["CMD", "ray"]
    assert SERVICES["ray-worker"]["healthcheck"] == {"disable": True}
    assert "healthcheck" not in SERVICES["zerotrain"]  # the image's own gRPC health probe
    # ... which asks the health port the service listens on, not the API port.
    dockerfile = (ROOT / "Dockerfile").read_text()
    (probe_address,) = re.findall(r"ZEROTRAIN_HEALTH_ADDRESS=(\S+)", dockerfile)
    assert probe_address == f"127.0.0.1:{_flags(SERVICES['zerotrain']['command'])['health-port']}"
    assert "50052" in dockerfile.split("EXPOSE", 1)[1].splitlines()[0]
    assert SERVICES["zerotrain"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
