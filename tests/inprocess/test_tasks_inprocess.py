"""The async task endpoints in-process: the sidecar's app under pytest-aiohttp's client, its
backends in memory behind backend.fake's FakeTransport.

Submit -> run -> status -> audio -> cancel over HTTP, the task's work going through the same
exchange as /api/v1/tts; a cancelled task in flight keeps its slot until its backend answers; and
at the end of each, no slot, queue place or backend reply left taken.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from backend.fake import FakeAnswer, FakeBackend, FakeTransport
from glmtts.wav import read_wav
from scheduler.config import parse_config
from scheduler.http.app import RUNTIME, build_app
from scheduler.runtime.context import Runtime
from tests.inprocess.support import assert_nothing_held, until

URL = "http://backend-0.test:9000"
KEY = "alpha-key-0123456789abcdef"
HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {KEY}"}
ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


class Sidecar:
    def __init__(self, client: TestClient[web.Request, web.Application], transport: FakeTransport,
                 backend: FakeBackend) -> None:
        self.client = client
        self.runtime: Runtime = client.app[RUNTIME]
        self.transport = transport
        self.backend = backend

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        kwargs["headers"] = {**HEADERS, **kwargs.get("headers", {})}
        async with self.client.request(method, path, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def submit(self, text: str = "hello there", **headers: str) -> dict[str, Any]:
        status, answer_headers, body = await self.call(
            "POST", "/api/v1/tasks", data=f"input_text={text.replace(' ', '+')}&index=exampleA", headers=headers)
        assert status == 202, body
        task = json.loads(body)
        assert answer_headers["Location"] == f"/api/v1/tasks/{task['task_id']}"
        return task  # type: ignore[no-any-return]

    async def status(self, task_id: str) -> dict[str, Any]:
        status, _, body = await self.call("GET", f"/api/v1/tasks/{task_id}")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    async def until(self, check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 10.0) -> None:
        await until(check, what, timeout)

    async def finished(self, task_id: str) -> dict[str, Any]:
        state: dict[str, Any] = {}

        async def done() -> bool:
            state.update(await self.status(task_id))
            return state["status"] not in ("queued", "running")

        await self.until(done, f"task {task_id} to finish")
        return state

    async def assert_idle(self) -> None:
        await assert_nothing_held(self.runtime)
        assert self.transport.unreleased() == []  # health probes may be under way


@pytest.fixture
async def sidecar(aiohttp_client: ClientFactory, tmp_path: Path) -> AsyncIterator[Sidecar]:
    config = {
        "backends": {"gpus": [], "external": [URL], "slots": 1, "warmup": {"enabled": False},
                     "health": {"interval_s": 0.02, "timeout_s": 1.0, "rise": 1}},
        "classes": [{"name": "any", "max_chars": None}],
        "tenants": {"list": [{"name": "alpha", "keys": [KEY]}]},
        "tasks": {"state_dir": str(tmp_path / "tasks")},
    }
    transport, backend = FakeTransport(), FakeBackend()
    transport.route(URL, backend)
    app = build_app(parse_config(json.dumps(config), check_paths=False), transport=transport)
    sidecar = Sidecar(await aiohttp_client(app), transport, backend)
    await sidecar.until(lambda: len(sidecar.runtime.ready_backends()) == 1, "the backend to be ready")
    yield sidecar


async def test_submit_run_status_audio(sidecar: Sidecar) -> None:
    gate = sidecar.backend.gate = asyncio.Event()
    task = await sidecar.submit()
    task_id = task["task_id"]
    assert task["status"] == "queued"
    await sidecar.until(lambda: sidecar.backend.busy == 1, "the task to reach the backend")
    assert (await sidecar.status(task_id))["status"] == "running"
    forwarded = [r for r in sidecar.transport.requests if r.path == "/api/v1/tts"]
    assert [r.headers["X-Request-ID"] for r in forwarded] == [f"task-{task_id}"]
    assert forwarded[0].body == b"input_text=hello+there&index=exampleA"  # the client's bytes, as sent
    gate.set()
    done = await sidecar.finished(task_id)
    assert done["status"] == "succeeded" and done["audio_url"] == f"/api/v1/tasks/{task_id}/audio"
    assert done["result"]["sample_rate"] == 24000 and "audio_base64" not in done["result"]
    status, headers, wav = await sidecar.call("GET", f"/api/v1/tasks/{task_id}/audio")
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    assert read_wav(wav).duration == pytest.approx(0.1)
    status, _, part = await sidecar.call("GET", f"/api/v1/tasks/{task_id}/audio", headers={"Range": "bytes=0-3"})
    assert (status, part) == (206, b"RIFF")
    await sidecar.assert_idle()


async def test_a_failed_answer_fails_the_task_and_has_no_audio(sidecar: Sidecar) -> None:
    sidecar.backend.answer = FakeAnswer(body=b'{"success":false,"message":"TTS generation failed","error":"oom"}')
    task_id = (await sidecar.submit())["task_id"]
    done = await sidecar.finished(task_id)
    assert done["status"] == "failed" and done["reason"] == "backend answered 200: oom"
    status, _, body = await sidecar.call("GET", f"/api/v1/tasks/{task_id}/audio")
    assert status == 409
    assert json.loads(body) == {"detail": f"Task '{task_id}' has no audio (status failed)", "reason": "no_audio",
                                "status": "failed"}
    await sidecar.assert_idle()


async def test_cancel_a_queued_task_gives_back_its_place(sidecar: Sidecar) -> None:
    gate = sidecar.backend.gate = asyncio.Event()
    running = (await sidecar.submit("the first"))["task_id"]
    await sidecar.until(lambda: sidecar.backend.busy == 1, "the first task to hold the slot")
    queued = (await sidecar.submit("the second"))["task_id"]
    assert len(sidecar.runtime.scheduler.queue) == 1
    status, _, body = await sidecar.call("DELETE", f"/api/v1/tasks/{queued}")
    assert status == 200 and json.loads(body)["status"] == "cancelled"
    await sidecar.until(lambda: len(sidecar.runtime.scheduler.queue) == 0, "the queue to be empty")
    gate.set()
    assert (await sidecar.finished(running))["status"] == "succeeded"
    assert len(sidecar.backend.tts_seen) == 1  # the cancelled one never reached the backend
    await sidecar.assert_idle()


async def test_cancel_a_running_task_keeps_the_slot_until_the_backend_answers(sidecar: Sidecar) -> None:
    gate = sidecar.backend.gate = asyncio.Event()
    task_id = (await sidecar.submit())["task_id"]
    await sidecar.until(lambda: sidecar.backend.busy == 1, "the task to reach the backend")
    status, _, body = await sidecar.call("DELETE", f"/api/v1/tasks/{task_id}")
    assert status == 200 and json.loads(body)["status"] == "cancelled"
    await asyncio.sleep(0.1)  # the behaviour: a while after the cancel, nothing has freed the slot
    assert sidecar.runtime.pool.backends[0].in_flight == 1  # GLM-TTS cannot cancel: the slot stays taken
    gate.set()
    await sidecar.assert_idle()
    assert (await sidecar.status(task_id))["status"] == "cancelled"
    status, _, _ = await sidecar.call("GET", f"/api/v1/tasks/{task_id}/audio")
    assert status == 409


async def test_another_tenants_task_and_an_unknown_one_are_the_same_404(sidecar: Sidecar) -> None:
    task_id = (await sidecar.submit())["task_id"]
    await sidecar.finished(task_id)
    for path in (f"/api/v1/tasks/{task_id}x", f"/api/v1/tasks/{task_id}x/audio"):
        status, _, body = await sidecar.call("GET", path)
        assert status == 404
        assert json.loads(body) == {"detail": f"Task '{task_id}x' not found", "reason": "unknown_task"}
    status, _, body = await sidecar.call("DELETE", f"/api/v1/tasks/{task_id}", headers={"Authorization": "Bearer no"})
    assert status == 401 and json.loads(body)["reason"] != "unknown_task"
    await sidecar.assert_idle()


async def test_prefer_respond_async_on_tts_makes_a_task(sidecar: Sidecar) -> None:
    status, headers, body = await sidecar.call("POST", "/api/v1/tts", data=b"input_text=hi&index=exampleA",
                                               headers={"Prefer": "respond-async"})
    assert status == 202
    task_id = json.loads(body)["task_id"]
    assert headers["Location"] == f"/api/v1/tasks/{task_id}"
    assert (await sidecar.finished(task_id))["status"] == "succeeded"
    await sidecar.assert_idle()


async def test_refusals_are_answered_before_anything_is_stored(sidecar: Sidecar) -> None:
    status, _, body = await sidecar.call("POST", "/api/v1/tasks", data=b"input_text=hi&index=exampleA",
                                         headers={"Idempotency-Key": "x" * 201})
    assert status == 400
    assert json.loads(body) == {"detail": "Idempotency-Key must be 1 to 200 printable ASCII characters",
                                "reason": "bad_idempotency_key"}
    status, _, body = await sidecar.call("POST", "/api/v1/tasks", data=b"index=exampleA")
    assert status == 422  # upstream's validation error, as /api/v1/tts answers it
    assert json.loads(body)["detail"][0]["loc"] == ["body", "input_text"]
    assert not sidecar.transport.unreleased() and not sidecar.backend.tts_seen
    await sidecar.assert_idle()
