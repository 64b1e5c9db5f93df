"""The shipped Prometheus rules and Grafana dashboard: valid, unit-tested, and only using metrics
that a running sidecar really exports.

promtool comes with Prometheus (Debian/Ubuntu: `apt-get install prometheus`); the promtool checks
skip, naming the tool, where it is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.contract_cases import multipart
from tests.support import ROOT, http, running_sidecar

ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "config" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "glmtts-sidecar.json"
PROVISIONING = ROOT / "config" / "grafana" / "provisioning" / "dashboards.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

# A metric name of ours; recording rules (level:metric:operation) have colons and never match.
METRIC = re.compile(r"(?<![A-Za-z0-9_:])glmtts_sidecar_[a-z0-9_]+(?![A-Za-z0-9_:])")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

ALERT_NAMES = {
    "GlmttsSidecarNoReadyBackend",
    "GlmttsSidecarBackendCrashLoop",
    "GlmttsSidecarQueueWaitSLOBurn",
    "GlmttsSidecarHighRejectionRatio",
    "GlmttsSidecarDeadlineExpiries",
    "GlmttsSidecarSlowBackend",
    "GlmttsSidecarEventLoopLag",
}

# Every metric family the dashboard must show (DESIGN.md "Observability").
DASHBOARD_FAMILIES = {
    "glmtts_sidecar_requests_total",
    "glmtts_sidecar_admission_rejections_total",
    "glmtts_sidecar_queue_depth",
    "glmtts_sidecar_queue_oldest_wait_seconds",
    "glmtts_sidecar_queue_wait_seconds",
    "glmtts_sidecar_service_seconds",
    "glmtts_sidecar_request_duration_seconds",
    "glmtts_sidecar_service_ratio",
    "glmtts_sidecar_backend_state",
    "glmtts_sidecar_backend_in_flight",
    "glmtts_sidecar_backend_restarts_total",
    "glmtts_sidecar_backend_health_failures_total",
    "glmtts_sidecar_backend_model_reloads_total",
    "glmtts_sidecar_orphaned_backend_seconds_total",
    "glmtts_sidecar_deadline_expiries_total",
    "glmtts_sidecar_config_reloads_total",
    "glmtts_sidecar_draining",
}

# Labels the rules and the dashboard group or filter by, checked where the scrape has samples.
EXPECTED_LABELS = {
    "glmtts_sidecar_requests_total": {"class", "tenant", "outcome"},
    "glmtts_sidecar_admission_rejections_total": {"reason"},
    "glmtts_sidecar_queue_depth": {"band"},
    "glmtts_sidecar_queue_oldest_wait_seconds": {"band"},
    "glmtts_sidecar_queue_wait_seconds_bucket": {"class", "le"},
    "glmtts_sidecar_service_seconds_bucket": {"class", "le"},
    "glmtts_sidecar_request_duration_seconds_bucket": {"class", "le"},
    "glmtts_sidecar_service_ratio_bucket": {"class", "le"},
    "glmtts_sidecar_backend_state": {"backend", "state"},
    "glmtts_sidecar_backend_in_flight": {"backend"},
    "glmtts_sidecar_backend_restarts_total": {"backend"},
    "glmtts_sidecar_backend_health_failures_total": {"backend"},
    "glmtts_sidecar_backend_model_reloads_total": {"backend"},
    "glmtts_sidecar_backend_slow": {"backend"},
    "glmtts_sidecar_deadline_expiries_total": {"where"},
    "glmtts_sidecar_config_reloads_total": {"result"},
}


# --- loading ----------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recording_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    data = dashboard()
    exprs = [target["expr"] for panel in all_panels(data["panels"]) for target in panel.get("targets", [])]
    for variable in data["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in rules()]


def alert_test_series() -> list[str]:
    tests = load_yaml(ALERTS_TEST)["tests"]
    return [series["series"] for test in tests for series in test.get("input_series", [])]


def used_metric_names(texts: list[str]) -> set[str]:
    names = {name for text in texts for name in METRIC.findall(text)}
    return names - recording_names()


# --- promtool ---------------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu: apt-get install prometheus)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, parses as a PromQL rule expression."""
    substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
    checked = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
        checked.append({"record": f"dashboard:expr_{i}:check", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": checked}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- the rules' shape -------------------------------------------------------------------------------


def markdown_anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_alert_rules_are_complete_and_documented() -> None:
    groups = {group["name"]: group for group in load_yaml(ALERTS)["groups"]}
    assert "glmtts-sidecar" in groups
    assert {rule["alert"] for rule in groups["glmtts-sidecar"]["rules"] if "alert" in rule} == ALERT_NAMES
    anchors = markdown_anchors(OPERATIONS)
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert "$labels" in annotations["summary"] + annotations["description"], name
        doc, _, anchor = annotations["runbook"].partition("#")
        assert doc == "docs/operations.md", name
        assert anchor in anchors, f"{name}: no heading #{anchor} in {OPERATIONS}"
    for record in recording_names():
        assert record.startswith("glmtts_sidecar:") and record.count(":") == 2, record


def test_queue_wait_burn_rate_uses_the_10s_bucket_and_both_window_pairs() -> None:
    text = ALERTS.read_text()
    assert 'glmtts_sidecar_queue_wait_seconds_bucket{le=~"10|10\\\\.0"}' in text
    burn = [rule for rule in alert_rules() if rule["alert"] == "GlmttsSidecarQueueWaitSLOBurn"]
    windows = {rule["labels"]["burn"]: set(re.findall(r"ratio_rate(\w+)", rule["expr"])) for rule in burn}
    assert windows == {"fast": {"5m", "1h"}, "slow": {"30m", "6h"}}


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    spec = load_yaml(ALERTS_TEST)
    assert spec["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for test in spec["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert firing == ALERT_NAMES, ALERT_NAMES - firing
    assert silent == ALERT_NAMES, ALERT_NAMES - silent


# --- the dashboard ----------------------------------------------------------------------------------


def test_dashboard_is_provisioning_ready() -> None:
    text = DASHBOARD.read_text()
    data = dashboard()
    assert "id" not in data
    assert data["uid"] == "glmtts-sidecar"
    assert data["schemaVersion"] >= 39
    assert "DS_PROMETHEUS" not in text and "__inputs" not in data
    variables = {variable["name"]: variable for variable in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    reference = {"type": "prometheus", "uid": "${datasource}"}

    panels = list(all_panels(data["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == reference, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), panel["title"]
            assert target["datasource"] == reference, panel["title"]


def family_of(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboard_shows_every_metric_family() -> None:
    used = used_metric_names(dashboard_exprs())
    shown = used | {family_of(name) for name in used}
    assert shown >= DASHBOARD_FAMILIES, DASHBOARD_FAMILIES - shown
    assert any("histogram_quantile(0.99" in expr for expr in dashboard_exprs())


def test_provisioning_points_at_a_dashboards_directory() -> None:
    spec = load_yaml(PROVISIONING)
    assert spec["apiVersion"] == 1
    (provider,) = spec["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


# --- every metric used is one the sidecar exports -------------------------------------------------


def queryable_names(exposition: str) -> tuple[set[str], dict[str, list[dict[str, str]]]]:
    """The series names a Prometheus scraping ``exposition`` would store, and each one's label sets.

    Histograms have only _bucket/_sum/_count series (no bare name); counters only _total."""
    names: set[str] = set()
    labels: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "summary":
            names.update(family.name + suffix for suffix in ("", "_sum", "_count"))
        else:
            names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, []).append(dict(sample.labels))
    return names, labels


def test_every_metric_used_is_exported_by_a_live_sidecar(tmp_path: Path) -> None:
    used = {
        "alerts.yml": used_metric_names(rule_exprs()),
        "alerts_test.yml": used_metric_names(alert_test_series()),
        "glmtts-sidecar.json": used_metric_names(dashboard_exprs()),
    }
    assert all(used.values())
    with running_sidecar(tmp_path, backends=1) as sidecar:
        content_type, body = multipart(("input_text", "你好，世界。"), ("index", "exampleA"))
        status, _, answer = http("POST", sidecar.url + "/api/v1/tts", body=body,
                                 headers={"Content-Type": content_type}, timeout=60)
        assert status == 200, answer[:300]
        deadline = time.monotonic() + 5
        while True:  # the request's metrics may land just after its answer
            status, _, scraped = http("GET", sidecar.url + "/metrics")
            assert status == 200, scraped[:300]
            exposition = scraped.decode()
            if "glmtts_sidecar_requests_total{" in exposition or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    exported, labels = queryable_names(exposition)
    for source, names in used.items():
        missing = sorted(names - exported)
        exported_ours = sorted(name for name in exported if name.startswith("glmtts_sidecar_"))
        assert not missing, f"{source} uses metrics the sidecar does not export: {missing}; exported: {exported_ours}"

    for name, expected in EXPECTED_LABELS.items():
        for label_set in labels.get(name, []):
            assert expected <= set(label_set), f"{name}{label_set}: missing labels {expected - set(label_set)}"
    buckets = labels.get("glmtts_sidecar_queue_wait_seconds_bucket", [])
    assert buckets, "no queue-wait histogram samples after a served request"
    bounds = {float(label_set["le"]) for label_set in buckets}
    assert 10.0 in bounds, f"the queue-wait SLO alert needs a 10 s bucket; buckets: {sorted(bounds)}"
