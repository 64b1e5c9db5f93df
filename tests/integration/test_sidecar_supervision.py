"""Supervision and live reconfiguration through the whole sidecar: every admitted request gets
exactly one correct answer while backends die, hang, crash-loop, start slowly, or are replaced."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.contract_cases import multipart
from tests.support import (
    Service,
    backend_details,
    backend_pids,
    details,
    get_json,
    http,
    pid_gone,
    running_sidecar,
    sidecar_config,
    start_sidecar,
    wait_http,
    wait_until,
)

SHORT = "今天天气很好，我们去公园散步。"
ADMIN = "admin-token-for-tests-0123"


def tts(service: Service, text: str = SHORT, *, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    status, _, raw = http("POST", service.url + "/api/v1/tts", body=body, headers={"Content-Type": content_type},
                          timeout=timeout)
    return status, json.loads(raw)


def ok(result: tuple[int, dict[str, Any]]) -> bool:
    status, body = result
    return status == 200 and body.get("success") is True and bool(body.get("audio_base64"))


def backends(service: Service) -> list[dict[str, Any]]:
    """Backend detail from /api/v1/health (503 while no backend is ready, same body)."""
    return backend_details(service)


def states(service: Service) -> list[str]:
    return [b["state"] for b in backends(service)]


def test_kill_9_of_a_backend_with_40_requests_in_flight_or_queued(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, backends=2, time_scale=0.02) as service, ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(tts, service, SHORT * 2 + str(i)) for i in range(40)]
        wait_until(lambda: get_json(service.url + "/api/v1/queue")["depth"] >= 10, what="a queue to build")
        victim = backends(service)[0]
        os.kill(victim["pid"], signal.SIGKILL)
        results = [f.result() for f in futures]
        assert all(ok(r) for r in results), [r[0] for r in results]
        wait_until(lambda: states(service) == ["ready", "ready"], timeout=30, what="the backend to come back")
        assert backends(service)[0]["pid"] != victim["pid"] and backends(service)[0]["restarts"] == 1


def test_a_hung_backend_is_killed_and_its_request_retried(tmp_path: Path) -> None:
    watchdog = "watchdog: {factor: 2.0, min_s: 1.0, unresponsive_s: 1.0}"
    with running_sidecar(tmp_path, backends=2, time_scale=0.01, backend_extra=watchdog) as service:
        victim = backends(service)[0]
        status, _, _ = http("POST", victim["url"] + "/emulator/faults", body=b'{"hang_after": 0}',
                            headers={"Content-Type": "application/json"})
        assert status == 200
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: tts(service, SHORT + str(i)), range(4)))
        assert all(ok(r) for r in results)
        wait_until(lambda: backends(service)[0]["restarts"] >= 1 and states(service) == ["ready", "ready"],
                   timeout=30, what="the hung backend to be replaced")
        assert pid_gone(victim["pid"])


def test_a_backend_crashing_at_start_backs_off_into_failed_without_spinning(tmp_path: Path) -> None:
    text, port = sidecar_config(
        backends=1, command=["{python}", "-c", "import sys; sys.exit(3)"], backend_extra='env: {UNUSED: "{port}"}',
        restart="{backoff_initial_s: 0.1, backoff_max_s: 0.4, crash_loop: {max_failures: 3, window_s: 30.0, "
                "cooldown_s: 60.0}}")
    service = start_sidecar(text, port, tmp_path, wait_ready=False)
    try:
        wait_http(service, "/healthz")
        wait_until(lambda: states(service) == ["failed"], timeout=20, what="the crash loop to be declared")
        health = http("GET", service.url + "/api/v1/health")
        assert health[0] == 503 and json.loads(health[2])["status"] == "unhealthy"
        cpu_before = _cpu_seconds(service.pid)
        time.sleep(1.0)  # a failed backend waits out its cool-down: no spawning, no busy loop
        assert _cpu_seconds(service.pid) - cpu_before < 0.2
        assert backends(service)[0]["restarts"] <= 5
        status, body = tts(service)
        assert status == 503 and body["reason"] == "no_backend"
    finally:
        service.stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_slow_starting_backend_gets_no_traffic_before_its_warm_up(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=1, time_scale=0.01, emulator_args=("--start-delay", "1.5"), warmup=True)
    service = start_sidecar(text, port, tmp_path, wait_ready=False)
    try:
        wait_http(service, "/healthz")
        with ThreadPoolExecutor(3) as pool:  # sent while the backend is still starting
            results = list(pool.map(lambda i: tts(service, SHORT + str(i)), range(3)))
        assert all(ok(r) for r in results)
        stats = get_json(backends(service)[0]["url"] + "/emulator/stats")
        assert stats["first_request_id"].startswith("warmup-")
        assert stats["tts_received"] == 4
    finally:
        service.stop()


class SteadyLoad:
    """A bounded background stream of requests; every answer is kept."""

    def __init__(self, service: Service, *, max_requests: int = 400, max_s: float = 90.0) -> None:
        self.service = service
        self.results: list[tuple[int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(max_requests // 3, max_s)) for _ in range(3)]

    def _run(self, count: int, max_s: float) -> None:
        ends = time.monotonic() + max_s
        for i in range(count):
            if self._stop.is_set() or time.monotonic() > ends:
                return
            self.results.append(tts(self.service, SHORT + str(i)))

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)


def test_sighup_from_2_to_3_backends_and_back_under_load_fails_nothing(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=2, time_scale=0.01)
    service = start_sidecar(text, port, tmp_path)
    config = tmp_path / f"sidecar-{port}.yaml"
    text = config.read_text()  # as started (start_sidecar adds the task directory)
    try:
        before = {b["id"]: b["pid"] for b in backends(service)}
        with SteadyLoad(service) as load:
            grown = text.replace('gpus: ["0", "1"]', 'gpus: ["0", "1", "2"]')
            assert grown != text
            config.write_text(grown)
            os.kill(service.pid, signal.SIGHUP)
            wait_until(lambda: states(service) == ["ready"] * 3, timeout=60, what="the third backend")
            config.write_text(text)
            os.kill(service.pid, signal.SIGHUP)
            wait_until(lambda: [b["id"] for b in backends(service)] == list(before), timeout=60,
                       what="the third backend to be drained and removed")
            time.sleep(0.5)  # the load goes on after the removal, and must not fail either
        assert len(load.results) > 20
        assert all(ok(r) for r in load.results), [r[0] for r in load.results if not ok(r)]
        assert {b["id"]: b["pid"] for b in backends(service)} == before  # untouched backends kept running
    finally:
        service.stop()


def test_a_bad_file_on_reload_keeps_the_running_config(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=1, extra=f"admin: {{token: {ADMIN}}}")
    service = start_sidecar(text, port, tmp_path)
    config = tmp_path / f"sidecar-{port}.yaml"
    text = config.read_text()  # as started (start_sidecar adds the task directory)
    try:
        config.write_text(text + "\nqueue: {max_size: -1, bogus: 1}\n")
        status, _, raw = http("POST", service.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
        body = json.loads(raw)
        assert status == 400 and body["reason"] == "invalid_config"
        assert any("queue.max_size" in p for p in body["problems"]), body
        assert any("queue.bogus: unknown key" in p for p in body["problems"]), body
        os.kill(service.pid, signal.SIGHUP)
        wait_until(lambda: "configuration reload (SIGHUP) refused" in service.output(), what="the SIGHUP refusal")
        assert ok(tts(service))
        assert get_json(service.url + "/api/v1/queue")["max_size"] == 100
        assert http("POST", service.url + "/admin/reload")[0] == 401  # the token is still required
        config.write_text(text + "\nqueue: {max_size: 7}\n")
        status, _, raw = http("POST", service.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
        assert status == 200 and json.loads(raw)["changed"] == ["queue"]
        assert get_json(service.url + "/api/v1/queue")["max_size"] == 7
    finally:
        service.stop()


def test_sigterm_under_load_drains_and_leaves_nothing(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=2, time_scale=0.05)
    service = start_sidecar(text, port, tmp_path)
    try:
        pids = backend_pids(service)
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(tts, service, SHORT * 4 + str(i)) for i in range(12)]
            # SIGTERM only once all 12 are admitted: every admitted request must be answered.
            wait_until(lambda: details(service, "/api/v1/queue")["admitted"] == 12,
                       what="all 12 requests to be admitted")
            assert get_json(service.url + "/api/v1/queue")["depth"] >= 4
            os.kill(service.pid, signal.SIGTERM)
            wait_until(lambda: http("GET", service.url + "/readyz")[0] == 503, what="readiness to drop")
            status, late = tts(service)
            assert status == 503 and late["reason"] == "draining"
            results = [f.result() for f in futures]
        assert all(ok(r) for r in results)
        assert service.proc.wait(30) == 0
        assert all(pid_gone(pid) for pid in pids)
    finally:
        service.stop()


def test_a_drain_closes_the_listener_after_unready_s_while_work_finishes(tmp_path: Path) -> None:
    """A load balancer sees /readyz fail at once; shutdown.unready_s later new connections are
    refused (so it goes elsewhere even without health checks), while the request in progress
    still gets its answer and the sidecar then exits 0."""
    text, port = sidecar_config(backends=1, time_scale=0.05, extra="shutdown: {unready_s: 0.5, drain_timeout_s: 30.0}")
    service = start_sidecar(text, port, tmp_path)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(tts, service, SHORT * 8)  # ~1.3 s of synthesis
            wait_until(lambda: details(service, "/api/v1/queue")["in_service"] == 1, what="the request to run")
            os.kill(service.pid, signal.SIGTERM)
            wait_until(lambda: http("GET", service.url + "/readyz")[0] == 503, what="readiness to drop")
            wait_until(lambda: refused(port), timeout=5.0, what="the listener to close")
            assert not running.done()  # closed while the work went on
            status, answer = running.result(timeout=30)
            assert status == 200 and answer["success"] is True
        assert service.proc.wait(30) == 0
    finally:
        service.stop()


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def test_admin_endpoints_need_the_token_and_restart_a_backend(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=2, extra=f"admin: {{token: {ADMIN}}}")
    service = start_sidecar(text, port, tmp_path)
    try:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        for method, path in (("POST", "/admin/reload"), ("POST", "/admin/drain"),
                             ("POST", "/admin/backends/gpu0-0/restart"), ("POST", "/api/v1/clear_cache"),
                             ("DELETE", "/api/v1/prompts/exampleA")):
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
                assert http(method, service.url + path, headers=headers)[0] == 401, (method, path)
        assert http("GET", service.url + "/api/v1/prompts/exampleA")[0] == 200  # reads stay open
        assert http("POST", service.url + "/admin/backends/nope/restart", headers=auth)[0] == 404
        old = backends(service)[0]["pid"]
        assert http("POST", service.url + "/admin/backends/gpu0-0/restart", headers=auth)[0] == 202
        wait_until(lambda: backends(service)[0]["pid"] not in (None, old) and states(service) == ["ready", "ready"],
                   timeout=30, what="the graceful restart")
        assert ok(tts(service))
    finally:
        service.stop()
