"""deploy/prometheus: the scrape config is valid and the alert rules pass their unit tests."""

from __future__ import annotations

import subprocess

from .conftest import DEPLOY

PROMETHEUS_DIR = DEPLOY / "prometheus"


def test_prometheus_config_is_valid(promtool):
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_alert_rules_unit_tests(promtool):
    result = subprocess.run(
        [promtool, "test", "rules", "tests/zerotrain.rules.test.yml"],
        cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test():
    import yaml

    rules = yaml.safe_load((PROMETHEUS_DIR / "rules" / "zerotrain.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS_DIR / "tests" / "zerotrain.rules.test.yml").read_text())
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == firing
