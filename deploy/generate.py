"""Generate the Grafana dashboard, its Kubernetes ConfigMap and the PrometheusRule.

    python deploy/generate.py           # rewrite both files
    python deploy/generate.py --check   # exit 1 when either file is out of date

The dashboard is declared below as rows of panels (title, unit, PromQL queries);
``deploy/grafana/dashboards/zerotrain.json`` and
``deploy/k8s/grafana-dashboard-configmap.yaml`` are its generated outputs, and
``deploy/k8s/prometheusrule.yaml`` wraps ``deploy/prometheus/rules/`` for the
Prometheus operator; all are kept in git so that compose and kubectl need no
build step. tests/deploy checks they are in sync and that every query parses and
names only exported metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import yaml

__all__ = [
    "CONFIGMAP_PATH",
    "DASHBOARD_PATH",
    "PROMETHEUS_RULE_PATH",
    "build_configmap",
    "build_dashboard",
    "build_prometheus_rule",
    "dashboard_legend_labels",
    "dashboard_queries",
    "render",
]

DEPLOY = Path(__file__).resolve().parent
DASHBOARD_PATH = DEPLOY / "grafana" / "dashboards" / "zerotrain.json"
CONFIGMAP_PATH = DEPLOY / "k8s" / "grafana-dashboard-configmap.yaml"
RULES_PATH = DEPLOY / "prometheus" / "rules" / "zerotrain.rules.yml"
PROMETHEUS_RULE_PATH = DEPLOY / "k8s" / "prometheusrule.yaml"

DASHBOARD_UID = "zerotrain-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
J = '{job_id=~"$job"}'  # the job selector variable, applied to every training query

# (title, kind, unit, [(expr, legend)], width). kind: "timeseries" | "stat" | "stacked".
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]], int]]]] = [
    (
        "Service",
        [
            (
                "Jobs by state",
                "stat",
                "none",
                [("sum by (state) (zerotrain_jobs)", "{{state}}")],
                8,
            ),
            (
                "Submissions and reconciliation errors",
                "timeseries",
                "reqps",
                [
                    ("sum(rate(zerotrain_job_submissions_total[$__rate_interval]))", "submissions"),
                    (
                        "sum(rate(zerotrain_reconciliation_errors_total[$__rate_interval]))",
                        "reconciliation errors",
                    ),
                ],
                8,
            ),
            (
                "gRPC requests by method and code",
                "timeseries",
                "reqps",
                [
                    (
                        "sum by (method, code) (rate(zerotrain_rpc_requests_total[$__rate_interval]))",
                        "{{method}} {{code}}",
                    )
                ],
                8,
            ),
            (
                "gRPC latency (p50 / p99)",
                "timeseries",
                "s",
                [
                    (
                        "histogram_quantile(0.5, sum by (method, le) "
                        "(rate(zerotrain_rpc_duration_seconds_bucket[$__rate_interval])))",
                        "p50 {{method}}",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (method, le) "
                        "(rate(zerotrain_rpc_duration_seconds_bucket[$__rate_interval])))",
                        "p99 {{method}}",
                    ),
                ],
                12,
            ),
            (
                "gRPC errors (non-OK share)",
                "timeseries",
                "percentunit",
                [
                    (
                        'sum by (method) (rate(zerotrain_rpc_requests_total{code!="OK"}[$__rate_interval]))'
                        " / sum by (method) (rate(zerotrain_rpc_requests_total[$__rate_interval]))",
                        "{{method}}",
                    )
                ],
                12,
            ),
        ],
    ),
    (
        "Jobs",
        [
            ("Step", "stat", "none", [(f"zerotrain_training_step{J}", "{{job_id}}")], 6),
            (
                "Attempt and restarts",
                "stat",
                "none",
                [
                    (f"zerotrain_training_attempt{J}", "{{job_id}} attempt"),
                    (f"zerotrain_training_restarts_total{J}", "{{job_id}} restarts"),
                ],
                6,
            ),
            ("Workers", "stat", "none", [(f"zerotrain_training_world_size{J}", "{{job_id}}")], 6),
            (
                "Active (1) / finished (0)",
                "stat",
                "none",
                [(f"zerotrain_training_active{J}", "{{job_id}}")],
                6,
            ),
            ("Loss", "timeseries", "none", [(f"zerotrain_training_loss{J}", "{{job_id}}")], 12),
            (
                "Accuracy",
                "timeseries",
                "percentunit",
                [(f"zerotrain_training_accuracy_ratio{J}", "{{job_id}}")],
                12,
            ),
            (
                "Throughput",
                "timeseries",
                "none",
                [
                    (f"zerotrain_training_samples_per_second{J}", "{{job_id}} samples/s"),
                    (
                        f"rate(zerotrain_training_steps_total{J}[$__rate_interval])",
                        "{{job_id}} steps/s",
                    ),
                ],
                12,
            ),
            (
                "Step time",
                "timeseries",
                "s",
                [(f"zerotrain_training_step_seconds{J}", "{{job_id}}")],
                8,
            ),
            (
                "Seconds since the step last advanced",
                "stat",
                "s",
                [(f"time() - zerotrain_training_last_progress_timestamp_seconds{J}", "{{job_id}}")],
                4,
            ),
            (
                "Step time by phase",
                "stacked",
                "s",
                [(f"zerotrain_training_phase_seconds{J}", "{{job_id}} {{phase}}")],
                24,
            ),
        ],
    ),
    (
        "Optimizer",
        [
            (
                "Global grad norm",
                "timeseries",
                "none",
                [(f"zerotrain_training_grad_norm{J}", "{{job_id}}")],
                8,
            ),
            (
                "Update / parameter norm ratio",
                "timeseries",
                "none",
                [(f"zerotrain_training_update_param_ratio{J}", "{{job_id}}")],
                8,
            ),
            (
                "Learning rate",
                "timeseries",
                "none",
                [(f"zerotrain_training_learning_rate{J}", "{{job_id}}")],
                8,
            ),
            (
                "Parameter and update norms",
                "timeseries",
                "none",
                [
                    (f"zerotrain_training_param_norm{J}", "{{job_id}} params"),
                    (f"zerotrain_training_update_norm{J}", "{{job_id}} update"),
                ],
                8,
            ),
            (
                "Optimizer-state bytes per rank",
                "timeseries",
                "bytes",
                [(f"zerotrain_training_optimizer_state_bytes{J}", "{{job_id}} rank {{rank}}")],
                8,
            ),
            (
                "Skipped non-finite steps",
                "timeseries",
                "none",
                [(f"zerotrain_training_skipped_steps_total{J}", "{{job_id}}")],
                8,
            ),
        ],
    ),
    (
        "Adamax internals",
        [
            (
                "u (exp_inf): max and mean",
                "timeseries",
                "none",
                [
                    (f"zerotrain_adamax_u_max{J}", "{{job_id}} max"),
                    (f"zerotrain_adamax_u_mean{J}", "{{job_id}} mean"),
                ],
                12,
            ),
            (
                "Fraction of u refreshed by |g|",
                "timeseries",
                "percentunit",
                [(f"zerotrain_adamax_u_refreshed_ratio{J}", "{{job_id}}")],
                12,
            ),
        ],
    ),
    (
        "Nadam internals",
        [
            (
                "mu_t and mu_product",
                "timeseries",
                "none",
                [
                    (f"zerotrain_nadam_mu_t{J}", "{{job_id}} mu_t"),
                    (f"zerotrain_nadam_mu_product{J}", "{{job_id}} mu_product"),
                ],
                8,
            ),
            (
                "Bias corrections",
                "timeseries",
                "none",
                [
                    (f"zerotrain_nadam_bias_correction1{J}", "{{job_id}} bias_correction1"),
                    (f"zerotrain_nadam_bias_correction2{J}", "{{job_id}} bias_correction2"),
                ],
                8,
            ),
            (
                "mean sqrt(v_hat)",
                "timeseries",
                "none",
                [(f"zerotrain_nadam_sqrt_v_hat_mean{J}", "{{job_id}}")],
                8,
            ),
        ],
    ),
]


def _panel(panel_id: int, title: str, kind: str, unit: str, queries, x: int, y: int, w: int):
    height = 5 if kind == "stat" else 8
    panel: dict = {
        "id": panel_id,
        "type": "stat" if kind == "stat" else "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"h": height, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries)
        ],
    }
    if kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
    else:
        stacked = kind == "stacked"
        panel["fieldConfig"]["defaults"]["custom"] = {
            "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
            "fillOpacity": 40 if stacked else 10,
        }
        panel["options"] = {"tooltip": {"mode": "multi"}, "legend": {"displayMode": "list"}}
    return panel, height


def build_dashboard() -> dict:
    """The dashboard as a Grafana JSON model."""
    panels: list[dict] = []
    y = 0
    panel_id = 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        line_height = 0
        for title, kind, unit, queries, width in row_panels:
            if x + width > 24:
                x, y, line_height = 0, y + line_height, 0
            panel, height = _panel(panel_id, title, kind, unit, queries, x, y, width)
            panels.append(panel)
            panel_id += 1
            x += width
            line_height = max(line_height, height)
        y += line_height
    return {
        "uid": DASHBOARD_UID,
        "title": "zerotrain",
        "description": "Jobs, training progress and ZeRO Adamax/Nadam optimizer internals.",
        "tags": ["zerotrain", "training"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "prometheus"},
                },
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": DS,
                    "query": {
                        "query": "label_values(zerotrain_training_step, job_id)",
                        "refId": "jobs",
                    },
                    "definition": "label_values(zerotrain_training_step, job_id)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "sort": 1,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def build_configmap(dashboard_json: str) -> dict:
    """A ConfigMap carrying the dashboard, labelled for Grafana's dashboard sidecar."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "zerotrain-grafana-dashboard",
            "namespace": "zerotrain",
            "labels": {"app.kubernetes.io/part-of": "zerotrain", "grafana_dashboard": "1"},
        },
        "data": {"zerotrain.json": dashboard_json},
    }


def build_prometheus_rule(rules: dict) -> dict:
    """A Prometheus-operator PrometheusRule carrying the alert rule groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "zerotrain",
            "namespace": "zerotrain",
            "labels": {"app.kubernetes.io/part-of": "zerotrain"},
        },
        "spec": {"groups": rules["groups"]},
    }


def render() -> dict[Path, str]:
    """The generated files' contents, keyed by path."""
    dashboard_json = json.dumps(build_dashboard(), indent=2) + "\n"
    header = "# Generated by deploy/generate.py from the dashboard definition: do not edit.\n"
    configmap = header + yaml.dump(
        build_configmap(dashboard_json), Dumper=_BlockDumper, sort_keys=False, width=120
    )
    rules = yaml.safe_load(RULES_PATH.read_text())
    rule_header = header.replace("the dashboard definition", "deploy/prometheus/rules/")
    prometheus_rule = rule_header + yaml.dump(
        build_prometheus_rule(rules), Dumper=_BlockDumper, sort_keys=False, width=120
    )
    return {
        DASHBOARD_PATH: dashboard_json,
        CONFIGMAP_PATH: configmap,
        PROMETHEUS_RULE_PATH: prometheus_rule,
    }


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as literal blocks (the dashboard JSON stays readable)."""


def _block_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _block_str)


def dashboard_queries(
    path: Path = DASHBOARD_PATH, *, rate_interval: str = "1m", job: str = ".*"
) -> list[tuple[str, str]]:
    """(where, PromQL) for every query of a dashboard file, as Grafana would send it.

    Grafana's variables are substituted (``$__rate_interval``, ``$__interval``,
    ``$__range``, ``$job``), and a ``label_values(X, label)`` variable query
    becomes its selector ``X``. An unknown variable raises :class:`ValueError`.
    """
    variables = {"$__rate_interval": rate_interval, "$__interval": "15s", "$__range": "1h",
                 "$job": job}  # fmt: skip

    def to_promql(where: str, expr: str) -> str:
        match = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr.strip())
        if match:
            expr = match.group(1)
        for name, value in variables.items():
            expr = expr.replace(name, value)
        if "$" in expr:
            raise ValueError(f"{where}: unknown Grafana variable in {expr!r}")
        return expr

    dashboard = json.loads(path.read_text())
    out = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            where = f"variable {variable['name']}"
            out.append((where, to_promql(where, variable["definition"])))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} {target['refId']}"
            out.append((where, to_promql(where, target["expr"])))
    return out


def dashboard_legend_labels(path: Path = DASHBOARD_PATH) -> dict[str, set[str]]:
    """Labels each panel query's legend shows (``{{job_id}}`` ...), keyed like :func:`dashboard_queries`."""
    dashboard = json.loads(path.read_text())
    return {
        f"panel {panel['title']!r} {target['refId']}": set(
            re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", ""))
        )
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            _write_atomic(path, text)
            print(f"wrote {path.relative_to(DEPLOY.parent)}")
    if stale:
        names = ", ".join(str(p.relative_to(DEPLOY.parent)) for p in stale)
        print(f"out of date: {names}; run: python deploy/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
