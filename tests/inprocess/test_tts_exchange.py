"""POST /api/v1/tts in-process: the sidecar's app under pytest-aiohttp's client, its backends
backend.fake's in-memory ones behind a FakeTransport (``backends.external`` URLs): health probes,
forwarded requests and their faults never touch the network.

Retries (a reset before sending; a 5xx answer), a client leaving while its backend works (the
slot held until the backend finishes, the seconds counted as orphaned), a queued request shed at
its latest start (408 with the shed wording), a large answer streamed through, a backend cutting
its answer short; and after each, no slot, queue place or reply left taken.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientPayloadError, ClientTimeout, web
from aiohttp.test_utils import TestClient

from backend.fake import FakeAnswer, FakeBackend, FakeTransport
from scheduler.config import parse_config
from scheduler.core.deadlines import timeout_message
from scheduler.http.app import RUNTIME, build_app
from scheduler.runtime.context import Runtime
from tests.inprocess.support import assert_nothing_held, until

URLS = ["http://backend-0.test:9000", "http://backend-1.test:9000"]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def form(text: str = "hello there") -> bytes:
    return f"input_text={text.replace(' ', '+')}&index=exampleA".encode()


@dataclass
class Sidecar:
    client: TestClient[web.Request, web.Application]
    runtime: Runtime
    transport: FakeTransport
    backends: list[FakeBackend]

    async def post(self, body: bytes | None = None, **headers: str) -> tuple[int, dict[str, str], bytes]:
        async with self.client.post("/api/v1/tts", data=form() if body is None else body,
                                    headers={**FORM, **headers}) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    def backend(self, url: str) -> Any:
        return next(b for b in self.runtime.pool.backends if b.url == url)

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        await until(check, what, timeout)

    async def assert_idle(self) -> None:
        """Every slot given back, nothing queued or in service, every backend reply released."""
        await assert_nothing_held(self.runtime)
        assert self.transport.unreleased() == []  # health probes may be under way


SidecarFactory = Callable[..., Awaitable[Sidecar]]


def config(urls: list[str], **sections: Any) -> str:
    data: dict[str, Any] = {
        "backends": {"gpus": [], "external": urls, "slots": 1,
                     "health": {"interval_s": 0.02, "timeout_s": 1.0, "rise": 1},
                     "warmup": {"enabled": False}, **sections.pop("backends", {})},
        "tasks": {"enabled": False},
        **sections,
    }
    return json.dumps(data)


@pytest.fixture
async def start(aiohttp_client: ClientFactory) -> AsyncIterator[SidecarFactory]:
    async def go(urls: list[str] = URLS, **sections: Any) -> Sidecar:
        transport = FakeTransport()
        backends = [FakeBackend() for _ in urls]
        for url, backend in zip(urls, backends, strict=True):
            transport.route(url, backend)
        app = build_app(parse_config(config(urls, **sections), check_paths=False), transport=transport)
        # As the CLI serves it: a client leaving cancels its handler.
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        sidecar = Sidecar(client, app[RUNTIME], transport, backends)
        await sidecar.until(lambda: len(sidecar.runtime.ready_backends()) == len(urls), "every backend to be ready")
        return sidecar

    yield go


def tts_requests(transport: FakeTransport) -> list[str]:
    return [r.url for r in transport.requests if r.path == "/api/v1/tts"]


async def test_health_probes_go_through_the_transport(start: SidecarFactory) -> None:
    sidecar = await start()
    gets = {r.url for r in sidecar.transport.requests if r.method == "GET"}
    assert {u + "/api/v1/health" for u in URLS} <= gets  # the pool's probes
    assert gets - {u + "/api/v1/health" for u in URLS} <= {u + "/api/v1/prompts" for u in URLS}  # the catalogue's
    assert sidecar.transport.started


async def test_a_reset_before_sending_is_retried(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1])
    sidecar.transport.fail_next(URLS[0], sent=False)
    status, headers, body = await sidecar.post()
    assert status == 200 and body.startswith(b'{"success":true')
    assert headers["X-Backend"] == "ext-0"
    assert tts_requests(sidecar.transport) == [URLS[0] + "/api/v1/tts"]  # the reset one never arrived
    assert sidecar.backend(URLS[0]).last_error.endswith("Connection reset by peer")
    await sidecar.assert_idle()


async def test_with_no_retry_left_a_reset_is_a_502(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1], retries={"max_attempts": 1})
    sidecar.transport.fail_next(URLS[0], sent=True)
    status, _, body = await sidecar.post()
    assert status == 502
    assert json.loads(body) == {"detail": "Backend ext-0 went away before answering", "reason": "backend_failed"}
    assert len(sidecar.backends[0].tts_seen) == 1  # it got the request, then the connection dropped
    await sidecar.assert_idle()


async def test_a_5xx_answer_is_retried_on_another_backend_until_attempts_run_out(start: SidecarFactory) -> None:
    # What the exchange does today: a server error before any byte went to the client is retried
    # (retries.max_attempts, the retry budget), even though the backend got the body.
    sidecar = await start()
    failing = FakeAnswer(status=500, body=b'{"detail":"Inference failed"}')
    for backend in sidecar.backends:
        backend.answer = failing
    status, headers, body = await sidecar.post()
    assert status == 500 and body == b'{"detail":"Inference failed"}'
    assert sorted(tts_requests(sidecar.transport)) == sorted(u + "/api/v1/tts" for u in URLS)  # two attempts
    await sidecar.assert_idle()
    sidecar.backends[0].answer = sidecar.backends[1].answer = None
    await sidecar.until(lambda: len(sidecar.runtime.ready_backends()) == 2, "the backends back in rotation")
    sidecar.backends[int(headers["X-Backend"][-1])].answer = failing  # the last one to fail fails again
    status, headers_again, _ = await sidecar.post()
    assert status == 200 and headers_again["X-Backend"] != headers["X-Backend"]


async def test_a_5xx_is_not_retried_with_one_attempt(start: SidecarFactory) -> None:
    sidecar = await start(retries={"max_attempts": 1})
    for backend in sidecar.backends:
        backend.answer = FakeAnswer(status=503, body=b'{"detail":"busy"}', headers={"Retry-After": "3"})
    status, headers, body = await sidecar.post()
    assert (status, body, headers["Retry-After"]) == (503, b'{"detail":"busy"}', "3")
    assert len(tts_requests(sidecar.transport)) == 1
    await sidecar.assert_idle()


async def test_a_client_leaving_orphans_the_work_and_the_slot_returns_when_the_backend_finishes(
        start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1])
    backend, runtime = sidecar.backends[0], sidecar.runtime
    backend.gate = asyncio.Event()
    with pytest.raises(asyncio.TimeoutError):
        async with sidecar.client.post("/api/v1/tts", data=form(), headers=FORM, timeout=ClientTimeout(total=0.3)):
            pass
    await sidecar.until(lambda: backend.busy == 1, "the backend to work on it")
    await asyncio.sleep(0.2)  # the client is gone; the backend still works
    assert sidecar.backend(URLS[0]).in_flight == 1 and len(runtime.scheduler.running) == 1
    assert runtime.scheduler.tally.orphaned_s == 0.0
    backend.gate.set()
    await sidecar.assert_idle()
    assert runtime.scheduler.tally.orphaned_s >= 0.15  # from the client leaving to the backend's answer
    status, _, _ = await sidecar.post()  # the slot serves again
    assert status == 200


async def test_a_queued_request_shed_at_its_latest_start_gets_a_408(start: SidecarFactory) -> None:
    # Predicted to take ~0.06 s: admitted behind the first request, shed ~0.06 s before its deadline.
    # One length class: the defaults' extra slot for short texts would start it at once.
    sidecar = await start(urls=URLS[:1], cost={"base_s": 0.05, "per_unit_s": 0.001},
                          classes=[{"name": "any", "max_chars": None}])
    backend = sidecar.backends[0]
    backend.gate = asyncio.Event()
    first = asyncio.ensure_future(sidecar.post())
    await sidecar.until(lambda: backend.busy == 1, "the first request to hold the only slot")
    status, _, body = await sidecar.post(form("a queued one"), **{"X-Request-Timeout": "0.5"})
    assert status == 408
    answer = json.loads(body)
    assert answer["reason"] == "deadline"
    pattern = (re.escape(timeout_message(0.5, len("a queued one"))) + r" No backend was free in time: its predicted "
               r"service of \d+\.\d{3} seconds would end after the timeout, so it was not started\.")
    assert re.fullmatch(pattern, answer["detail"]), answer["detail"]
    assert len(backend.tts_seen) == 1  # the shed request never reached the backend
    assert sidecar.runtime.scheduler.tally.shed == 1
    backend.gate.set()
    assert (await first)[0] == 200
    await sidecar.assert_idle()


async def test_a_large_answer_streams_through_in_pieces(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1])
    audio = bytes(range(256)) * 16 * 1024  # 4 MiB
    payload = (b'{"success":true,"message":"TTS generation successful","audio_base64":"'
               + base64.b64encode(audio) + b'","sample_rate":24000}')
    sidecar.backends[0].answer = FakeAnswer(body=payload, chunk_bytes=256 * 1024, chunk_delay_s=0.001)
    received = bytearray()
    pieces = 0
    async with sidecar.client.post("/api/v1/tts", data=form(), headers=FORM) as resp:
        assert resp.status == 200 and resp.content_length == len(payload)
        async for chunk in resp.content.iter_any():
            received += chunk
            pieces += 1
    assert bytes(received) == payload
    assert pieces > 1
    assert sidecar.runtime.served["short_text"] == 1
    assert sidecar.runtime.scheduler.tally.orphaned_s == 0.0
    await sidecar.assert_idle()


async def test_an_answer_cut_short_closes_the_client_and_takes_the_backend_out(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1])
    payload = b'{"success":true,"message":"TTS generation successful","audio_base64":"' + b"A" * 400_000 + b'"}'
    sidecar.backends[0].answer = FakeAnswer(body=payload, chunk_bytes=64 * 1024, cut_after=200_000)
    async with sidecar.client.post("/api/v1/tts", data=form(), headers=FORM) as resp:
        assert resp.status == 200
        with pytest.raises(ClientPayloadError):  # the connection closes before the advertised length
            await resp.read()
    backend = sidecar.backend(URLS[0])
    assert backend.last_error is not None and backend.last_error.startswith("answer cut short: ")
    await sidecar.assert_idle()


async def test_a_backend_that_never_answers_in_time_is_a_502_and_frees_the_slot(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1], backends={"request_timeout_s": 0.2})
    sidecar.backends[0].gate = asyncio.Event()
    status, _, body = await sidecar.post()
    assert status == 502
    assert json.loads(body) == {"detail": "Backend ext-0 did not answer within 0.2 s", "reason": "backend_failed"}
    await sidecar.assert_idle()
