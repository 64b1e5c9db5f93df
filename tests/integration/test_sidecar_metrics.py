"""GET /metrics on a real sidecar over emulator backends: values move, the output is valid."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.contract_cases import multipart
from tests.support import Service, free_port, get_json, http, running_sidecar, sidecar_config, start_sidecar

SHORT = "今天天气很好，我们去公园散步。"


def tts(service: Service, text: str | None = SHORT, headers: dict[str, str] | None = None) -> int:
    fields = [("index", "exampleA")] + ([("input_text", text)] if text is not None else [])
    content_type, body = multipart(*fields)
    status, _, _ = http("POST", service.url + "/api/v1/tts", body=body,
                        headers={"Content-Type": content_type, **(headers or {})}, timeout=60)
    return status


def scrape(url: str) -> str:
    status, headers, body = http("GET", url + "/metrics")
    assert status == 200, (status, body[:300])
    assert headers["Content-Type"].startswith("text/plain")
    return body.decode()


def sample(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    return None


def test_metrics_count_requests_and_mirror_the_pool(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, backends=2) as sidecar:
        before = scrape(sidecar.url)
        assert sample(before, "glmtts_sidecar_backends_ready") == 2
        ok = {"class": "short", "tenant": "default", "outcome": "ok"}
        assert sample(before, "glmtts_sidecar_requests_total", ok) == 0
        assert tts(sidecar) == 200
        assert tts(sidecar, text=None) == 422  # no input_text: refused at the edge
        assert tts(sidecar, headers={"X-Request-Timeout": "0.001"}) == 429  # deadline_unmeetable
        text = scrape(sidecar.url)
        assert sample(text, "glmtts_sidecar_requests_total", ok) == 1
        assert sample(text, "glmtts_sidecar_requests_total",
                      {"class": "unknown", "tenant": "default", "outcome": "invalid"}) == 1
        assert sample(text, "glmtts_sidecar_requests_total",
                      {"class": "short", "tenant": "default", "outcome": "rejected"}) == 1
        assert sample(text, "glmtts_sidecar_admission_rejections_total", {"reason": "deadline_unmeetable"}) == 1
        assert sample(text, "glmtts_sidecar_queue_wait_seconds_count", {"class": "short"}) == 1
        assert sample(text, "glmtts_sidecar_service_seconds_count", {"class": "short"}) == 1
        assert sample(text, "glmtts_sidecar_service_ratio_count", {"class": "short"}) == 1
        assert sample(text, "glmtts_sidecar_request_duration_seconds_count", {"class": "short"}) == 2
        assert sample(text, "glmtts_sidecar_queue_depth", {"band": "standard"}) == 0
        assert sample(text, "glmtts_sidecar_backend_state", {"backend": "gpu0-0", "state": "ready"}) == 1
        assert sample(text, "glmtts_sidecar_backend_in_flight", {"backend": "gpu1-0"}) == 0
        assert sample(text, "glmtts_sidecar_draining") == 0
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool not installed (Debian package prometheus): the output was not linted")
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=60, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def test_metrics_on_their_own_address_only(tmp_path: Path) -> None:
    port = free_port()
    text, listen_port = sidecar_config(backends=1, extra=f"metrics: {{listen: {{host: 127.0.0.1, port: {port}}}}}")
    sidecar = start_sidecar(text, listen_port, tmp_path)
    try:
        assert http("GET", sidecar.url + "/metrics")[0] == 404
        assert sample(scrape(f"http://127.0.0.1:{port}"), "glmtts_sidecar_backends_ready") == 1
        # The operator's port: health and queue with their details, without a token.
        assert [b["id"] for b in get_json(f"http://127.0.0.1:{port}/api/v1/health")["backends"]] == ["gpu0-0"]
        assert http("GET", f"http://127.0.0.1:{port}/api/v1/tts")[0] == 404
    finally:
        sidecar.stop()
