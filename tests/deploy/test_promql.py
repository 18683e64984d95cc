"""Every PromQL expression of the dashboard and the alert rules parses and names real metrics.

Two real parsers: Prometheus's own (``promtool check rules`` on a generated rules
file with one recording rule per expression) and promql-parser (a port of the
Prometheus grammar) to walk the syntax tree for the metric names, which are
compared with the names on a real scrape of ``ServiceMetrics``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml

from .conftest import DEPLOY, load_generate

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "zerotrain.json"
RULES = DEPLOY / "prometheus" / "rules" / "zerotrain.rules.yml"

# Series Prometheus itself writes for each target; the rules may use them.
PROMETHEUS_SERIES = {"up"}


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, variables included."""
    return load_generate().dashboard_queries(DASHBOARD)


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [
        (f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (every vector selector in its tree)."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:  # {__name__="..."} form
                for matcher in node.matchers.matchers:
                    if matcher.name == "__name__":
                        name = matcher.value
            assert name, f"selector without a metric name in {expr!r}"
            names.add(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_dashboard_has_queries():
    expressions = dashboard_expressions()
    assert len(expressions) >= 30
    training = [e for where, e in expressions if "zerotrain_training_" in e and "panel" in where]
    # Every training panel is filtered by the job selector variable.
    assert all('job_id=~".*"' in e for e in training), training


def test_every_expression_parses_with_prometheus(promtool, tmp_path: Path):
    expressions = dashboard_expressions() + rule_expressions()
    rules = {
        "groups": [
            {
                "name": "parse-check",
                "rules": [
                    {"record": f"zerotrain:parse_check_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(expressions)
                ],
            }
        ]
    }
    path = tmp_path / "all_expressions.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def test_promtool_rejects_a_broken_expression(promtool, tmp_path: Path):
    """The check above is real: promtool does refuse bad PromQL."""
    path = tmp_path / "bad.rules.yml"
    bad = {"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": "sum(rate(a[5m])"}]}]}
    path.write_text(yaml.safe_dump(bad))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode != 0


@pytest.mark.parametrize(
    ("where", "expr"), dashboard_expressions() + rule_expressions(), ids=lambda v: str(v)[:60]
)
def test_expression_names_only_exported_metrics(where, expr, exported_metric_names):
    names = metric_names(expr)
    assert names, f"{where}: no metric selected by {expr!r}"
    unknown = names - exported_metric_names - PROMETHEUS_SERIES
    assert not unknown, f"{where}: {sorted(unknown)} not exported by ServiceMetrics"


def test_every_exported_metric_is_on_the_dashboard_or_in_a_rule(exported_metric_names):
    used = set()
    for _, expr in dashboard_expressions() + rule_expressions():
        used |= metric_names(expr)
    families = {
        re.sub(r"_(bucket|count|sum)$", "", n)
        for n in exported_metric_names
        if not n.endswith("_created")
    }
    used_families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in used}
    assert families - used_families == set()
