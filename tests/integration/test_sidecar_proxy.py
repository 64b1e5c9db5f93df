"""The sidecar as a drop-in proxy over a supervised pool of real emulator processes."""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from glmtts.emulator.prompts import DEFAULT_PROMPTS
from tests.contract_cases import multipart
from tests.support import (
    Service,
    admin_headers,
    backend_details,
    backend_pids,
    get_json,
    http,
    pid_gone,
    sidecar_config,
    start_sidecar,
    wait_until,
)

SHORT = "今天天气很好，我们去公园散步。"
LONG = ("从前有一座山，山上有一座庙，庙里有一个老和尚在给小和尚讲故事。" * 16)[:500]


def tts(service: Service, text: str = SHORT, *, timeout: float = 60.0, headers: dict[str, str] | None = None,
        **fields: Any) -> tuple[int, dict[str, str], bytes]:
    content_type, body = multipart(("input_text", text), ("index", fields.pop("index", "exampleA")),
                                   *fields.items())
    return http("POST", service.url + "/api/v1/tts", body=body,
                headers={"Content-Type": content_type, **(headers or {})}, timeout=timeout)


def backends(service: Service) -> list[dict[str, Any]]:
    return backend_details(service)


@pytest.fixture()
def sidecar(tmp_path: Path) -> Iterator[Service]:
    text, port = sidecar_config(backends=2, time_scale=0.01)
    service = start_sidecar(text, port, tmp_path)
    try:
        yield service
    finally:
        service.stop()


def test_concurrent_requests_spread_over_backends_within_slots(sidecar: Service) -> None:
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: tts(sidecar, SHORT + str(i), seed=str(i)), range(20)))
    assert [status for status, _, _ in results] == [200] * 20
    assert all(json.loads(body)["success"] for _, _, body in results)
    served = Counter(headers["X-Backend"] for _, headers, _ in results)
    assert set(served) == {"gpu0-0", "gpu1-0"}, served
    for backend in backends(sidecar):
        stats = get_json(backend["url"] + "/emulator/stats")
        assert stats["max_in_flight"] == 1  # slots: 1
        assert stats["tts_received"] == served[backend["id"]]


def test_request_id_is_kept_echoed_and_forwarded(sidecar: Service) -> None:
    status, headers, _ = tts(sidecar, headers={"X-Request-ID": "trace-42"})
    assert status == 200 and headers["X-Request-ID"] == "trace-42"
    backend = next(b for b in backends(sidecar) if b["id"] == headers["X-Backend"])
    assert get_json(backend["url"] + "/emulator/stats")["last_request_id"] == "trace-42"
    assert re.fullmatch(r"queue;dur=\d+\.\d, service;dur=\d+\.\d", headers["Server-Timing"])
    status, headers, _ = tts(sidecar)
    assert len(headers["X-Request-ID"]) == 32
    status, headers, _ = http("GET", sidecar.url + "/nope", headers={"X-Request-ID": "r-1"})
    assert (status, headers["X-Request-ID"]) == (404, "r-1")


def test_prompt_writes_reach_every_backend(sidecar: Service) -> None:
    audio = DEFAULT_PROMPTS["exampleB"].prompt_audio_path
    content_type, body = multipart(("index", "everywhere"), ("prompt_audio_path", audio), ("prompt_text", "到处"))
    status, _headers, raw = http("POST", sidecar.url + "/api/v1/prompts", body=body,
                                headers={"Content-Type": content_type, **admin_headers(sidecar)})
    assert status == 200, raw
    assert json.loads(raw)["message"] == "Prompt 'everywhere' added successfully"
    for backend in backends(sidecar):
        assert get_json(backend["url"] + "/api/v1/prompts/everywhere")["config"]["prompt_text"] == "到处"
    assert tts(sidecar, index="everywhere")[0] == 200
    assert http("DELETE", sidecar.url + "/api/v1/prompts/everywhere", headers=admin_headers(sidecar))[0] == 200
    for backend in backends(sidecar):
        assert http("GET", backend["url"] + "/api/v1/prompts/everywhere")[0] == 404


def test_a_10_mb_upload_passes(sidecar: Service) -> None:
    audio = Path(DEFAULT_PROMPTS["exampleA"].prompt_audio_path).read_bytes()
    upload = audio + b"\0" * (10 * 1024 * 1024 - len(audio))
    content_type, body = multipart(("input_text", SHORT), ("prompt_audio", ("big.wav", upload)),
                                   ("prompt_text", "参考"))
    status, _, raw = http("POST", sidecar.url + "/api/v1/tts", body=body, headers={"Content-Type": content_type})
    assert status == 200 and json.loads(raw)["success"] is True


def test_limits_answer_413(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=1, extra="limits: {max_body_bytes: 65536, max_text_chars: 300}")
    service = start_sidecar(text, port, tmp_path)
    try:
        content_type, body = multipart(("input_text", SHORT), ("prompt_audio", ("big.wav", b"\0" * 70000)),
                                       ("prompt_text", "参考"))
        status, _headers, raw = http("POST", service.url + "/api/v1/tts", body=body,
                                    headers={"Content-Type": content_type})
        assert status == 413
        assert json.loads(raw) == {"detail": "Request body is larger than the limit of 65536 bytes",
                                   "reason": "too_large", "limit": 65536}
        status, _, raw = tts(service, "字" * 301)
        assert status == 413
        assert json.loads(raw)["detail"] == "input_text is 301 characters; the limit is 300"
        assert get_json(backends(service)[0]["url"] + "/emulator/stats")["tts_received"] == 0
    finally:
        service.stop()


def test_a_client_that_leaves_while_queued_leaves_the_queue(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=1, time_scale=0.02)
    service = start_sidecar(text, port, tmp_path)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(tts, service, LONG)  # ~1.6 s in the only slot
            wait_until(lambda: backends(service)[0]["in_flight"] == 1, what="the long request to start")
            with pytest.raises(TimeoutError):
                tts(service, timeout=0.3)  # queued behind it, then gone
            wait_until(lambda: get_json(service.url + "/api/v1/stats/concurrency")["queue"]["depth"] == 0,
                       what="the queue to empty")
            assert running.result()[0] == 200
        backend = backends(service)[0]
        assert get_json(backend["url"] + "/emulator/stats")["tts_received"] == 1
        assert backend["in_flight"] == 0
        assert tts(service)[0] == 200  # the slot was not leaked
    finally:
        service.stop()


def test_kill_9_of_the_sidecar_leaves_no_backend(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=2)
    service = start_sidecar(text, port, tmp_path)
    try:
        pids = backend_pids(service)
        assert len(pids) == 2 and all(pids)
        os.kill(service.pid, signal.SIGKILL)
        service.proc.wait(10)
        wait_until(lambda: all(pid_gone(pid) for pid in pids), timeout=10, what="backends to die")
    finally:
        service.stop()


def test_a_backend_that_dies_is_restarted_and_traffic_continues(sidecar: Service) -> None:
    victim = backends(sidecar)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: tts(sidecar, SHORT + str(i))[0], range(6)))
    assert statuses == [200] * 6
    wait_until(lambda: backends(sidecar)[0]["state"] == "ready", timeout=30, what="the restart")
    assert backends(sidecar)[0]["restarts"] == 1


def test_cli_checks_and_prints_configuration(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support import ROOT

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scheduler", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)

    default = cli("--print-default-config")
    assert default.returncode == 0 and "listen:" in default.stdout
    assert cli("--check-config").returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {port: abc}\nbackends: {slotz: 2}\n")
    result = cli("--config", str(bad), "--check-config")
    assert result.returncode == 2
    assert "listen.port" in result.stderr and "backends.slotz: unknown key" in result.stderr
    assert cli("--config", str(tmp_path / "missing.yaml")).returncode == 2
    assert cli("--version").stdout.startswith("glmtts-sidecar ")
