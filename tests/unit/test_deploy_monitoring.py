"""deploy/: the Prometheus alert rules and the Grafana dashboard name only metrics and labels that
Bastion exports (read from bastion.metrics.Metrics itself), and the rules pass `promtool check rules`
(Debian's prometheus package) when promtool is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client.metrics import MetricWrapperBase

from bastion.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "bastion-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "bastion-dashboard.json"
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}
_NAME = re.compile(r"\bbastion_[a-z0-9_]+\b")
_SELECTOR = re.compile(r"\b(bastion_[a-z0-9_]+)\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Every series name Bastion's /metrics can carry -> its label names."""
    metrics = Metrics()
    names: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            # prometheus_client keeps a metric's type and label names on these attributes.
            kind, labels = metric._type, set(metric._labelnames)
            for suffix in _SUFFIXES[str(kind)]:
                names[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def check_expression(expr: str, known: dict[str, set[str]]) -> list[str]:
    """What is wrong with one PromQL expression: unknown metric names, unknown labels in selectors
    and in by (...) groupings."""
    problems = []
    used = set(_NAME.findall(expr))
    if not used:
        problems.append(f"{expr!r}: names no Bastion metric")
    problems += [f"{expr!r}: unknown metric {n}" for n in sorted(used - known.keys())]
    for name, matchers in _SELECTOR.findall(expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            if name in known and label not in known[name]:
                problems.append(f"{expr!r}: {name} has no label {label}")
    labels = set().union(*(known.get(n, set()) for n in used)) if used else set()
    for group in _GROUPING.findall(expr):
        for label in (g.strip() for g in group.split(",") if g.strip()):
            if label not in labels:
                problems.append(f"{expr!r}: grouping by {label}, which none of its metrics has")
    return problems


def rule_expressions() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_exported_names_are_read_from_bastion() -> None:
    known = exported()
    for name in ("bastion_requests_total", "bastion_incidents_total", "bastion_audit_failures_total",
                 "bastion_llm_guard_hits_total", "bastion_incidents_by_state",
                 "bastion_request_duration_seconds_bucket"):
        assert name in known
    assert known["bastion_requests_total"] == {"route", "model", "status", "decision"}


def test_every_alert_rule_names_exported_metrics_and_labels() -> None:
    known = exported()
    exprs = rule_expressions()
    assert len(exprs) >= 8
    assert [p for e in exprs for p in check_expression(e, known)] == []
    covered = {n for e in exprs for n in _NAME.findall(e)}
    for name in ("bastion_incidents_total", "bastion_audit_failures_total", "bastion_llm_guard_hits_total",
                 "bastion_incidents_by_state", "bastion_requests_total"):
        assert name in covered


def test_every_dashboard_query_names_exported_metrics_and_labels() -> None:
    known = exported()
    exprs = dashboard_expressions()
    assert len(exprs) >= 14
    assert [p for e in exprs for p in check_expression(e, known)] == []
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))  # Grafana keys panels by id


def test_the_checker_catches_a_wrong_name_and_label() -> None:
    known = exported()
    assert check_expression("rate(bastion_request_total[5m])", known)  # the _total is missing a letter
    assert check_expression('bastion_requests_total{principal="x"}', known)  # no such label, ever
    assert check_expression("sum by (detector) (bastion_requests_total)", known)
    assert check_expression("up", known)
    assert check_expression('sum by (state) (bastion_incidents_by_state{state="open"})', known) == []


@pytest.mark.slow
def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    # Not a skip: `make test` installs it (scripts/ensure-promtool), and the rules must pass it.
    assert promtool is not None, "promtool is not installed: run scripts/ensure-promtool"
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in done.stdout
