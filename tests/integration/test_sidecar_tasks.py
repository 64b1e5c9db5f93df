"""The async task mode end to end: submit, poll, fetch, cancel; persisted across kill -9."""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from glmtts.wav import read_wav
from tests.contract_cases import multipart
from tests.support import Service, http, running_sidecar, sidecar_config, start_sidecar, wait_until

SHORT = "今天天气很好，我们去公园散步。"
KEYS = {name: f"{name}-key-0123456789abcdef" for name in ("alpha", "beta", "gamma")}
TENANTS = "tenants:\n  list:\n" + "".join(
    f"    - {{name: {name}, keys: [{key}], weight: 1.0}}\n" for name, key in KEYS.items())
FINISHED = {"succeeded", "failed", "expired", "cancelled"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def submit(service: Service, text: str = SHORT, *, headers: dict[str, str] | None = None,
           path: str = "/api/v1/tasks", **fields: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"), *fields.items())
    status, resp_headers, raw = http("POST", service.url + path, body=body,
                                     headers={"Content-Type": content_type, **(headers or {})})
    return status, resp_headers, json.loads(raw)


def poll(service: Service, task_id: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    status, _, raw = http("GET", f"{service.url}/api/v1/tasks/{task_id}", headers=headers or {})
    return status, json.loads(raw)


def wait_finished(service: Service, task_id: str, headers: dict[str, str] | None = None,
                  timeout: float = 60.0) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def done() -> bool:
        nonlocal result
        result = poll(service, task_id, headers)[1]
        return result.get("status") in FINISHED

    wait_until(done, timeout=timeout, what=f"task {task_id} to finish")
    return result


@pytest.fixture()
def sidecar(tmp_path: Path) -> Iterator[Service]:
    with running_sidecar(tmp_path, backends=2, time_scale=0.01, extra=TENANTS) as service:
        yield service


def test_submit_poll_fetch_gives_the_synchronous_answer(sidecar: Service) -> None:
    status, headers, accepted = submit(sidecar, headers=auth("alpha"), seed="7")
    assert status == 202 and accepted["status"] == "queued"
    assert accepted["position"] >= 0 and accepted["estimated_done"] >= accepted["estimated_start"] > 0
    assert headers["Location"] == f"/api/v1/tasks/{accepted['task_id']}"
    done = wait_finished(sidecar, accepted["task_id"], auth("alpha"))
    assert done["status"] == "succeeded" and done["result"]["success"] is True
    assert done["audio_url"] == f"/api/v1/tasks/{accepted['task_id']}/audio"
    status, audio_headers, wav = http("GET", sidecar.url + done["audio_url"], headers=auth("alpha"))
    assert status == 200 and audio_headers["Content-Type"] == "audio/wav"
    content_type, body = multipart(("input_text", SHORT), ("index", "exampleA"), ("seed", "7"))
    sync = json.loads(http("POST", sidecar.url + "/api/v1/tts", body=body, headers={"Content-Type": content_type,
                                                                                   **auth("alpha")})[2])
    assert wav == base64.b64decode(sync["audio_base64"])
    assert read_wav(wav).duration == pytest.approx(done["result"]["duration_s"], abs=1e-3)
    # HTTP Range on the audio
    status, range_headers, part = http("GET", sidecar.url + done["audio_url"],
                                       headers={**auth("alpha"), "Range": "bytes=0-43"})
    assert status == 206 and part == wav[:44] and range_headers["Content-Range"] == f"bytes 0-43/{len(wav)}"


def test_prefer_respond_async_on_the_tts_path(sidecar: Service) -> None:
    status, _, accepted = submit(sidecar, path="/api/v1/tts", headers={**auth("beta"), "Prefer": "respond-async"})
    assert status == 202
    assert wait_finished(sidecar, accepted["task_id"], auth("beta"))["status"] == "succeeded"


def test_a_tenant_cannot_see_another_tenants_task(sidecar: Service) -> None:
    _, _, accepted = submit(sidecar, headers=auth("alpha"))
    task_id = accepted["task_id"]
    for method, path in (("GET", ""), ("GET", "/audio"), ("DELETE", "")):
        status, _, raw = http(method, f"{sidecar.url}/api/v1/tasks/{task_id}{path}", headers=auth("beta"))
        assert status == 404 and json.loads(raw)["reason"] == "unknown_task"
    assert wait_finished(sidecar, task_id, auth("alpha"))["status"] == "succeeded"


def test_idempotency_keys_deduplicate(sidecar: Service) -> None:
    first = submit(sidecar, headers={**auth("alpha"), "Idempotency-Key": "order-1"})[2]
    again = submit(sidecar, headers={**auth("alpha"), "Idempotency-Key": "order-1"})[2]
    other = submit(sidecar, headers={**auth("beta"), "Idempotency-Key": "order-1"})[2]
    assert first["task_id"] == again["task_id"] != other["task_id"]
    # The key is bound to its request: the same key with another text is refused, never answered
    # with the first request's task (and so its audio).
    status, _, reused = submit(sidecar, SHORT + "另一个", headers={**auth("alpha"), "Idempotency-Key": "order-1"})
    assert status == 422 and reused["reason"] == "idempotency_key_reused" and "order-1" in reused["detail"]
    assert first["task_id"] not in json.dumps(reused)


def test_per_tenant_caps_and_finished_tasks_keep_no_body(tmp_path: Path) -> None:
    state = tmp_path / "task-state"
    extra = TENANTS + f"tasks: {{state_dir: {json.dumps(str(state))}, max_per_tenant: 2, ttl_s: 300.0}}\n"
    with running_sidecar(tmp_path, backends=1, extra=extra) as service:
        keyed = {**auth("alpha"), "Idempotency-Key": "order-7"}
        first = submit(service, headers=keyed)[2]["task_id"]
        second = submit(service, SHORT + "二", headers=auth("alpha"))[2]["task_id"]
        status, headers, refused = submit(service, SHORT + "三", headers=auth("alpha"))
        assert status == 429 and refused["reason"] == "task_quota" and refused["limit"] == "tasks.max_per_tenant"
        assert 1 <= int(headers["Retry-After"]) <= 300
        # A retry of a stored task is no new task: answered, not refused by the cap.
        status, _, again = submit(service, headers=keyed)
        assert status in (200, 202) and again["task_id"] == first
        assert submit(service, headers=auth("beta"))[0] == 202  # another tenant has its own cap
        for task_id in (first, second):
            assert wait_finished(service, task_id, auth("alpha"))["status"] == "succeeded"
            assert (state / "results" / f"{task_id}.wav").exists()
            assert not (state / "requests" / f"{task_id}.body").exists()  # gone once the task finished


def test_cancel_while_queued(tmp_path: Path) -> None:
    # The blocker holds the only slot ~2 s at this scale (load, cold start): the cancel comes at once.
    with running_sidecar(tmp_path, backends=1, time_scale=0.02, extra=TENANTS) as service:
        long = ("从前有一座山，山上有一座庙。" * 20)[:190]
        blocker = submit(service, long, headers=auth("alpha"))[2]["task_id"]
        queued = submit(service, headers=auth("alpha"))[2]["task_id"]
        assert poll(service, queued, auth("alpha"))[1]["status"] == "queued"
        status, _, raw = http("DELETE", f"{service.url}/api/v1/tasks/{queued}", headers=auth("alpha"))
        assert status == 200 and json.loads(raw)["status"] == "cancelled"
        assert wait_finished(service, blocker, auth("alpha"))["status"] == "succeeded"
        assert poll(service, queued, auth("alpha"))[1]["status"] == "cancelled"
        assert http("GET", f"{service.url}/api/v1/tasks/{queued}/audio", headers=auth("alpha"))[0] == 409


def test_200_tasks_from_3_tenants_all_finish_interleaved(tmp_path: Path) -> None:
    # Tasks share the queue (and its bound) with synchronous requests: room for all 200.
    with running_sidecar(tmp_path, backends=2, time_scale=0.01, extra=TENANTS + "queue: {max_size: 300}\n") as sidecar:
        _run_200(sidecar)


def _run_200(sidecar: Service) -> None:
    with ThreadPoolExecutor(12) as pool:
        accepted = list(pool.map(lambda i: (list(KEYS)[i % 3], submit(
            sidecar, SHORT + str(i), headers=auth(list(KEYS)[i % 3]))[2]["task_id"]), range(200)))
    finished = [(tenant, wait_finished(sidecar, task_id, auth(tenant), timeout=120))
                for tenant, task_id in accepted]
    assert all(done["status"] == "succeeded" for _, done in finished)
    order = [tenant for tenant, done in sorted(finished, key=lambda item: item[1]["finished_at"])]
    # Fair interleaving: in every stretch of 30 completions each tenant has its share, give or take.
    for start in range(0, 180, 30):
        window = order[start:start + 30]
        assert all(window.count(tenant) >= 5 for tenant in KEYS), window


def test_kill_9_with_30_tasks_queued_or_running_loses_none(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=1, time_scale=0.02, extra=TENANTS)
    service = start_sidecar(text, port, tmp_path)
    try:
        ids = [submit(service, SHORT * 3 + str(i), headers=auth("gamma"))[2]["task_id"] for i in range(30)]
        os.kill(service.pid, signal.SIGKILL)
        service.proc.wait(10)
    finally:
        service.stop()
    restarted = start_sidecar(text, port, tmp_path)  # same config file, same task directory
    try:
        results = [wait_finished(restarted, task_id, auth("gamma"), timeout=120) for task_id in ids]
        assert all(r["status"] == "succeeded" or (r["status"] == "failed" and r["reason"]) for r in results)
        assert sum(r["status"] == "succeeded" for r in results) == 30
    finally:
        restarted.stop()


def test_finished_tasks_expire_with_their_files(tmp_path: Path) -> None:
    state = tmp_path / "task-state"
    extra = TENANTS + f"tasks: {{state_dir: {json.dumps(str(state))}, ttl_s: 0.5, sweep_interval_s: 0.2}}\n"
    with running_sidecar(tmp_path, backends=1, extra=extra) as service:
        task_id = submit(service, headers=auth("alpha"))[2]["task_id"]
        assert wait_finished(service, task_id, auth("alpha"))["status"] == "succeeded"
        assert (state / "results" / f"{task_id}.wav").exists()
        wait_until(lambda: poll(service, task_id, auth("alpha"))[0] == 404, timeout=10, what="the sweep")
        assert not (state / "results" / f"{task_id}.wav").exists()
        assert not (state / "requests" / f"{task_id}.body").exists()


def test_an_unwritable_state_directory_answers_503_on_submit(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the task directory should be")
    extra = TENANTS + f"tasks: {{state_dir: {json.dumps(str(blocked))}}}\n"
    with running_sidecar(tmp_path, backends=1, extra=extra) as service:
        status, headers, body = submit(service, headers=auth("alpha"))
        assert status == 503 and body["reason"] == "store_unavailable" and headers["Retry-After"] == "30"
        assert http("POST", service.url + "/api/v1/tts", body=multipart(("input_text", SHORT),
                    ("index", "exampleA"))[1], headers={"Content-Type": multipart()[0]})[0] == 200


def test_a_finished_task_is_announced_to_its_allowed_callback(tmp_path: Path) -> None:
    import http.server
    import threading

    received: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(payload)
            self.send_response(500 if len(received) == 1 else 204)  # the first attempt fails
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/hooks/"
    extra = TENANTS + (f"tasks: {{state_dir: {json.dumps(str(tmp_path / 'state'))}, "
                       f"callbacks: {{allow: [{json.dumps(hook)}], secret: callback-secret-0123456789abcdef, "
                       f"backoff_s: 0.1}}}}\n")
    try:
        with running_sidecar(tmp_path, backends=1, extra=extra) as service:
            status, _, body = submit(service, headers={**auth("alpha"), "X-Callback-URL": "http://127.0.0.1:1/x"})
            assert status == 400 and body["reason"] == "callback_not_allowed"
            task_id = submit(service, headers={**auth("alpha"), "X-Callback-URL": hook + "done"})[2]["task_id"]
            wait_until(lambda: poll(service, task_id, auth("alpha"))[1]["callback"] == "delivered", timeout=20,
                       what="the callback to be delivered")
    finally:
        server.shutdown()
        server.server_close()
    assert len(received) == 2  # one failure, one retry
    assert received[-1]["task_id"] == task_id and received[-1]["status"] == "succeeded"
