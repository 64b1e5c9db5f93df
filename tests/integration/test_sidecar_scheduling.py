"""The scheduling policies end to end: real sidecar, real emulator backends, loopback HTTP."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.contract_cases import multipart
from tests.support import Service, backend_details, details, get_json, http, running_sidecar, wait_until

SHORT = "今天天气很好，我们去公园散步。"
LONG = ("从前有一座山，山上有一座庙，庙里有一个老和尚在给小和尚讲故事。" * 16)[:500]
KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-0123456789"
TENANTS = f"""
tenants:
  list:
    - {{name: alpha, keys: ["{KEY_A}"], weight: 1.0}}
    - {{name: beta, keys: ["{KEY_B}"], weight: 1.0}}
"""


def tts(service: Service, text: str = SHORT, *, headers: dict[str, str] | None = None, timeout: float = 60.0,
        **fields: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"), *fields.items())
    status, resp_headers, raw = http("POST", service.url + "/api/v1/tts", body=body,
                                     headers={"Content-Type": content_type, **(headers or {})}, timeout=timeout)
    return status, resp_headers, json.loads(raw)


def queue(service: Service) -> dict[str, Any]:
    result: dict[str, Any] = details(service, "/api/v1/queue")
    return result


def test_a_full_queue_answers_429_with_a_predicted_retry_after(tmp_path: Path) -> None:
    # At this scale the first request holds the only slot ~2 s (load, cold start): the other five
    # arrive meanwhile.
    with running_sidecar(tmp_path, backends=1, time_scale=0.02, extra="queue: {max_size: 2}\n"
                 "deadlines: {reject_unmeetable: false}") as service, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(tts, service, LONG[:180] + str(i)) for i in range(6)]
        results = [f.result() for f in futures]
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) == 3 and statuses.count(429) == 3, statuses  # 1 in service + 2 queued
    for status, headers, body in results:
        if status == 429:
            assert body["reason"] == "queue_full" and body["detail"].startswith("The queue is full")
            assert int(headers["Retry-After"]) >= 1


def test_an_unmeetable_deadline_is_refused_at_once(tmp_path: Path) -> None:
    extra = "deadlines: {tiers: [{max_chars: null, timeout_s: 2.0}]}"
    with running_sidecar(tmp_path, backends=1, time_scale=0.05, extra=extra) as service, ThreadPoolExecutor(2) as pool:
        assert tts(service, "预热")[0] == 200  # load the model first
        running = pool.submit(tts, service, LONG[:150])  # ~1.2 s at this scale
        wait_until(lambda: queue(service)["in_service"] == 1, what="the first request to start")
        started = time.monotonic()
        status, headers, body = tts(service, LONG[:150] + "二")  # 1.2 s wait + 1.2 s service > 2 s
        assert status == 429 and time.monotonic() - started < 0.5
        assert body["reason"] == "deadline_unmeetable" and int(headers["Retry-After"]) >= 1
        assert running.result()[0] == 200


def test_408_on_time_while_queued_even_when_no_backend_frees_up(tmp_path: Path) -> None:
    extra = "deadlines: {reject_unmeetable: false, tiers: [{max_chars: null, timeout_s: 0.5}]}"
    with running_sidecar(tmp_path, backends=1, time_scale=0.05, extra=extra) as service, ThreadPoolExecutor(2) as pool:
        # Holds the only slot for ~4.5 s (load, cold start; it times out itself while running); the
        # sidecar's drain on exit waits for it, so it is no longer than it needs to be.
        pool.submit(tts, service, LONG[:150])
        wait_until(lambda: queue(service)["in_service"] == 1, what="the long request to start")
        started = time.monotonic()
        status, _, body = tts(service, SHORT)
        waited = time.monotonic() - started
        assert status == 408, body
        assert body["detail"] == f"Request timeout after 0.5 seconds. Text length: {len(SHORT)} characters."
        assert body["reason"] == "deadline"
        assert 0.3 < waited < 1.5, waited
        # The running one was answered 408 too, but its backend slot stays busy until it finishes.
        wait_until(lambda: queue(service)["in_service"] == 0, timeout=20, what="the orphan to finish")
        status_q = queue(service)
        assert status_q["expired_queued"] == 1 and status_q["expired_running"] == 1
        assert status_q["orphaned_backend_seconds"] > 2.0


def test_x_request_timeout_shortens_the_deadline(tmp_path: Path) -> None:
    extra = "deadlines: {reject_unmeetable: false}"
    # The long text takes ~2.6 s at this scale (load and cold start): far past 0.3 s, and the sidecar's
    # drain on exit waits for it, so a slower scale only makes the test longer.
    with running_sidecar(tmp_path, backends=1, time_scale=0.01, extra=extra) as service:
        status, _, body = tts(service, LONG, headers={"X-Request-Timeout": "0.3"})
        assert status == 408 and body["detail"].startswith("Request timeout after 0.3 seconds.")
        status, _, body = tts(service, headers={"X-Request-Timeout": "soon"})
        assert status == 400 and body["reason"] == "bad_timeout" and "X-Request-Timeout" in body["detail"]


def test_a_flooding_tenant_does_not_starve_another(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, backends=1, time_scale=0.02, extra=TENANTS) as service, \
            ThreadPoolExecutor(30) as pool:
        flood = [pool.submit(tts, service, SHORT * 3 + str(i), headers={"Authorization": f"Bearer {KEY_A}"})
                 for i in range(20)]
        wait_until(lambda: queue(service)["depth"] >= 15, what="alpha's flood to queue up")
        started = time.monotonic()
        late = [pool.submit(tts, service, SHORT * 3 + str(i), headers={"Authorization": f"Bearer {KEY_B}"})
                for i in range(3)]
        beta_done = [f.result() for f in late]
        beta_s = time.monotonic() - started
        alpha = [f.result() for f in flood]
        alpha_s = time.monotonic() - started
    assert all(status == 200 for status, _, _ in beta_done + alpha)
    # Fair queueing serves beta's 3 interleaved with alpha's backlog (about 6 services), not after all 15+.
    assert beta_s < alpha_s * 0.6, (beta_s, alpha_s)


def test_keys_required_and_priorities(tmp_path: Path) -> None:
    extra = TENANTS.replace("tenants:\n", "tenants:\n  require_key: true\n")
    with running_sidecar(tmp_path, backends=1, extra=extra) as service:
        status, _, body = tts(service)
        assert status == 401 and body["reason"] == "unauthorized"
        status, _, body = tts(service, headers={"Authorization": "Bearer not-a-key-at-all"})
        assert status == 401 and body == {"detail": "Unknown API key", "reason": "unauthorized"}
        assert tts(service, headers={"Authorization": f"Bearer {KEY_A}", "X-Priority": "interactive"})[0] == 200
        status, _, body = tts(service, headers={"Authorization": f"Bearer {KEY_A}", "X-Priority": "urgent"})
        assert status == 400 and body["reason"] == "unknown_priority"


def test_affinity_means_fewer_model_reloads_with_mixed_sample_rates(tmp_path: Path) -> None:
    rates = ["24000", "32000"] * 8
    emulator = ("--load-seconds", "10")  # 0.2 s per load at this time scale
    with running_sidecar(tmp_path, backends=2, time_scale=0.02, emulator_args=emulator) as service, \
            ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: tts(service, SHORT, sample_rate=r)[0], rates))
        backends = backend_details(service)
        loads = sum(get_json(b["url"] + "/emulator/stats")["model_loads"] for b in backends)
        # The same mix sent straight to the backends by a key-blind round robin.
        blind = ["24000", "24000", "32000", "32000"] * 4
        direct = [http("POST", backends[i % 2]["url"] + "/api/v1/tts",
                       body=multipart(("input_text", SHORT), ("index", "exampleA"), ("sample_rate", rate))[1],
                       headers={"Content-Type": multipart()[0]})[0] for i, rate in enumerate(blind)]
        loads_direct = sum(get_json(b["url"] + "/emulator/stats")["model_loads"] for b in backends) - loads
    assert results == [200] * 16 and direct == [200] * 16
    # One load per configuration plus a few switches when one configuration's backlog would wait
    # longer than a reload; a key-blind round robin reloads on nearly every request.
    assert loads <= 8, loads
    assert loads_direct >= 12 and loads < loads_direct, (loads, loads_direct)
