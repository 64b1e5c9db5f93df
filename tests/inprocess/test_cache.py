"""The result cache in-process: the sidecar's app under pytest-aiohttp's client, backends in memory
(backend.fake) counting every synthesis that reaches them.

A repeated request is answered without reaching a backend (both APIs, and across them); identical
concurrent requests cause one synthesis, and share its failure; a prompt write through the sidecar
invalidates; the cache's bytes stay under max_bytes; tenants do not share entries unless
``cache.shared``; a client leaving does not stop the synthesis; with the cache off nothing changes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientTimeout, web
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest

from backend.fake import FakeAnswer, FakeBackend, FakeRequest, FakeTransport
from scheduler.config import parse_config
from scheduler.http.app import RUNTIME, build_app
from scheduler.runtime.context import Runtime
from tests.inprocess.support import assert_nothing_held, until

URLS = ["http://backend-0.test:9000", "http://backend-1.test:9000"]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
KEYS = {"acme": "acme-key-0123456789abcdef", "bulk": "bulk-key-0123456789abcdef"}
ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def form(text: str = "hello there", index: str = "exampleA") -> bytes:
    return f"input_text={text.replace(' ', '+')}&index={index}".encode()


class Backend(FakeBackend):
    """A FakeBackend that also accepts prompt writes (as upstream does when the file exists) and
    clear_cache, and lists its prompts with their configuration as upstream does."""

    def __init__(self) -> None:
        super().__init__()
        self.configs = {"exampleA": {"prompt_audio_path": "examples/prompt/a.wav", "prompt_text": "hello"},
                        "exampleB": {"prompt_audio_path": "examples/prompt/b.wav", "prompt_text": "bye"}}

    async def __call__(self, request: FakeRequest) -> FakeAnswer:
        writes = request.path.startswith("/api/v1/prompts") or request.path == "/api/v1/clear_cache"
        if request.method in ("PUT", "POST", "DELETE") and writes:
            return FakeAnswer(body=b'{"success":true,"message":"ok"}')
        if request.method == "GET" and request.path == "/api/v1/prompts":
            prompts = [{"index": index, "config": config} for index, config in self.configs.items()]
            return FakeAnswer(body=json.dumps({"success": True, "prompts": prompts}).encode())
        return await super().__call__(request)


@dataclass
class Sidecar:
    client: TestClient[web.Request, web.Application]
    runtime: Runtime
    backends: list[Backend]

    async def tts(self, body: bytes | None = None, **headers: str) -> tuple[int, dict[str, str], bytes]:
        async with self.client.post("/api/v1/tts", data=form() if body is None else body,
                                    headers={**FORM, **headers}) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def speech(self, **fields: Any) -> tuple[int, dict[str, str], bytes]:
        payload = {"model": "glm-tts", "input": "hello there", "voice": "alloy", "response_format": "wav", **fields}
        async with self.client.post("/v1/audio/speech", json=payload,
                                    headers={"Authorization": "Bearer sk-anything"}) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    @property
    def syntheses(self) -> int:
        return sum(len(b.tts_seen) for b in self.backends)

    def counted(self, result: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value("glmtts_sidecar_cache_requests_total",
                                                                {"result": result})
        return value or 0.0

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        await until(check, what, timeout)

    async def assert_idle(self) -> None:
        runtime = self.runtime
        await assert_nothing_held(runtime)
        assert runtime.cache.in_flight == 0


SidecarFactory = Callable[..., Awaitable[Sidecar]]


def config(urls: list[str], cache: dict[str, Any] | None, **sections: Any) -> str:
    data: dict[str, Any] = {
        "backends": {"gpus": [], "external": urls, "slots": 1,
                     "health": {"interval_s": 0.02, "timeout_s": 1.0, "rise": 1}, "warmup": {"enabled": False}},
        "tasks": {"enabled": False},
        "tenants": {"list": [{"name": name, "keys": [key]} for name, key in KEYS.items()]},
        **sections,
    }
    if cache is not None:
        data["cache"] = cache
    return json.dumps(data)


@pytest.fixture
async def start(aiohttp_client: ClientFactory) -> AsyncIterator[SidecarFactory]:
    async def go(urls: list[str] = URLS, cache: dict[str, Any] | None = None, **sections: Any) -> Sidecar:
        transport = FakeTransport()
        backends = [Backend() for _ in urls]
        for url, backend in zip(urls, backends, strict=True):
            transport.route(url, backend)
        settings = {"enabled": True, **(cache or {})} if cache != {} else None
        app = build_app(parse_config(config(urls, settings, **sections), check_paths=False), transport=transport)
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        sidecar = Sidecar(client, app[RUNTIME], backends)
        await sidecar.until(lambda: len(sidecar.runtime.ready_backends()) == len(urls), "every backend to be ready")
        # The prompts' digests are in every key: a request before the first list would key without them.
        await sidecar.until(lambda: sidecar.runtime.prompts.indexes is not None, "the prompt list")
        return sidecar

    yield go


async def test_a_repeated_request_is_answered_without_a_backend(start: SidecarFactory) -> None:
    sidecar = await start()
    first = await sidecar.tts()
    second = await sidecar.tts()
    assert first[0] == second[0] == 200 and first[2] == second[2]
    assert json.loads(second[2])["success"] is True
    assert (first[1]["X-Cache"], second[1]["X-Cache"]) == ("miss", "hit")
    assert second[1]["Content-Type"] == "application/json" and "X-Backend" not in second[1]
    assert sidecar.syntheses == 1
    assert (sidecar.counted("hit"), sidecar.counted("miss"), sidecar.counted("shared")) == (1, 1, 0)
    scrape = generate_latest(sidecar.runtime.metrics.registry).decode()
    assert f"glmtts_sidecar_cache_bytes {float(len(first[2]))}" in scrape
    assert "glmtts_sidecar_cache_entries 1.0" in scrape
    # Every request is still counted as answered, the hit too.
    assert sidecar.runtime.metrics.registry.get_sample_value(
        "glmtts_sidecar_requests_total", {"class": "short", "tenant": "default", "outcome": "ok"}) == 2
    await sidecar.assert_idle()


async def test_a_hit_still_goes_through_intake(start: SidecarFactory) -> None:
    sidecar = await start()
    assert (await sidecar.tts())[0] == 200
    status, _, body = await sidecar.tts(Authorization="Bearer not-a-key-0123456789abcdef",
                                        **{"X-Tenant": "nobody"})
    assert status in (400, 401) and sidecar.syntheses == 1, body
    status, _, body = await sidecar.tts(form(index="noSuchPrompt"))
    assert status == 404 and b"noSuchPrompt" in body


async def test_the_speech_api_caches_the_backend_answer_and_encodes_after(start: SidecarFactory) -> None:
    sidecar = await start()
    status, headers, wav = await sidecar.speech()
    assert status == 200 and headers["X-Cache"] == "miss" and wav.startswith(b"RIFF")
    status, headers, again = await sidecar.speech()
    assert status == 200 and headers["X-Cache"] == "hit" and again == wav
    status, headers, flac = await sidecar.speech(response_format="flac")  # another format, the same entry
    assert status == 200 and headers["X-Cache"] == "hit" and flac.startswith(b"fLaC")
    # The same inputs through upstream's API (alloy = exampleA, 24 kHz, seed 42): the same entry.
    status, headers, _ = await sidecar.tts()
    assert status == 200 and headers["X-Cache"] == "hit"
    assert sidecar.syntheses == 1
    await sidecar.assert_idle()


async def test_twenty_identical_concurrent_requests_cause_one_synthesis(start: SidecarFactory) -> None:
    sidecar = await start()
    for backend in sidecar.backends:
        backend.gate = asyncio.Event()
    requests = [asyncio.ensure_future(sidecar.tts()) for _ in range(10)]
    requests += [asyncio.ensure_future(sidecar.speech(input="hello there")) for _ in range(10)]
    await sidecar.until(lambda: sidecar.counted("shared") == 19, "19 requests to join the first one's synthesis")
    for backend in sidecar.backends:
        assert backend.gate is not None
        backend.gate.set()
    answers = await asyncio.gather(*requests)
    assert [status for status, _, _ in answers] == [200] * 20
    assert sorted(headers["X-Cache"] for _, headers, _ in answers) == ["miss"] + ["shared"] * 19
    assert sidecar.syntheses == 1
    assert len({body for _, _, body in answers[:10]}) == 1
    await sidecar.assert_idle()


async def test_a_failed_synthesis_reaches_every_waiter_and_is_not_cached(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1], retries={"max_attempts": 1})
    backend = sidecar.backends[0]
    backend.gate = asyncio.Event()
    backend.answer = FakeAnswer(status=500, body=b'{"detail":"Inference failed"}')
    requests = [asyncio.ensure_future(sidecar.tts()) for _ in range(3)]
    await sidecar.until(lambda: sidecar.counted("shared") == 2, "2 requests to join the first one")
    backend.gate.set()
    answers = await asyncio.gather(*requests)
    assert {(status, body) for status, _, body in answers} == {(500, b'{"detail":"Inference failed"}')}
    assert sidecar.syntheses == 1 and sidecar.runtime.cache.entries == 0
    backend.answer = None
    status, headers, _ = await sidecar.tts()
    assert status == 200 and headers["X-Cache"] == "miss" and sidecar.syntheses == 2
    await sidecar.assert_idle()


async def test_a_request_sharing_a_synthesis_keeps_its_own_deadline(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1])
    backend = sidecar.backends[0]
    backend.gate = asyncio.Event()
    leader = asyncio.ensure_future(sidecar.tts())
    await sidecar.until(lambda: backend.busy == 1, "the first request to reach the backend")
    loop = asyncio.get_running_loop()
    began = loop.time()
    status, headers, body = await sidecar.tts(**{"X-Request-Timeout": "0.3"})
    took = loop.time() - began
    assert status == 408 and json.loads(body)["reason"] == "deadline", body
    assert 0.25 <= took < 2.0, took
    assert sidecar.counted("shared") == 1 and not leader.done() and sidecar.runtime.cache.in_flight == 1
    assert sidecar.runtime.metrics.registry.get_sample_value(
        "glmtts_sidecar_requests_total", {"class": "short", "tenant": "default", "outcome": "deadline"}) == 1
    backend.gate.set()
    status, headers, _ = await leader
    assert status == 200 and headers["X-Cache"] == "miss" and sidecar.syntheses == 1
    assert (await sidecar.tts())[1]["X-Cache"] == "hit"
    await sidecar.assert_idle()


async def test_the_first_client_leaving_does_not_stop_the_synthesis(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:1])
    backend = sidecar.backends[0]
    backend.gate = asyncio.Event()
    with pytest.raises(asyncio.TimeoutError):
        async with sidecar.client.post("/api/v1/tts", data=form(), headers=FORM, timeout=ClientTimeout(total=0.3)):
            pass
    assert backend.busy == 1 and sidecar.runtime.cache.in_flight == 1
    backend.gate.set()
    await sidecar.until(lambda: sidecar.runtime.cache.entries == 1, "the abandoned synthesis to be stored")
    status, headers, _ = await sidecar.tts()
    assert status == 200 and headers["X-Cache"] == "hit" and sidecar.syntheses == 1
    await sidecar.assert_idle()


async def test_a_prompt_write_through_the_sidecar_invalidates(start: SidecarFactory) -> None:
    sidecar = await start()
    assert (await sidecar.tts())[1]["X-Cache"] == "miss"
    assert (await sidecar.tts(form("other text")))[1]["X-Cache"] == "miss"
    async with sidecar.client.put("/api/v1/prompts/exampleA",
                                  data={"prompt_audio_path": "a.wav", "prompt_text": "new"}) as resp:
        assert resp.status == 200, await resp.text()
    assert sidecar.runtime.cache.entries == 0  # both were of exampleA
    status, headers, _ = await sidecar.tts()
    assert status == 200 and headers["X-Cache"] == "miss" and sidecar.syntheses == 3
    # Adding another index leaves exampleA's entries; deleting exampleA drops them.
    async with sidecar.client.post("/api/v1/prompts", data={"index": "exampleB", "prompt_audio_path": "b.wav",
                                                             "prompt_text": "b"}) as resp:
        assert resp.status == 200
    assert sidecar.runtime.cache.entries == 1
    async with sidecar.client.delete("/api/v1/prompts/exampleA") as resp:
        assert resp.status == 200
    assert sidecar.runtime.cache.entries == 0
    async with sidecar.client.post("/api/v1/clear_cache") as resp:
        assert resp.status == 200
    assert (await sidecar.tts())[1]["X-Cache"] == "miss"
    assert sidecar.syntheses == 4
    assert (await sidecar.tts())[1]["X-Cache"] == "hit"
    async with sidecar.client.post("/api/v1/clear_cache") as resp:
        assert resp.status == 200
    assert sidecar.runtime.cache.entries == 0


async def test_a_prompt_changed_past_the_sidecar_misses_once_the_catalogue_refreshed(start: SidecarFactory) -> None:
    sidecar = await start()
    assert (await sidecar.tts())[1]["X-Cache"] == "miss"
    assert (await sidecar.tts())[1]["X-Cache"] == "hit"
    await sidecar.runtime.prompts.refresh()  # nothing changed: still the same entry
    assert (await sidecar.tts())[1]["X-Cache"] == "hit"
    for backend in sidecar.backends:  # written on the backends directly, not through the sidecar
        backend.configs["exampleA"] = {"prompt_audio_path": "examples/prompt/other.wav", "prompt_text": "hello"}
    await sidecar.runtime.prompts.refresh()
    status, headers, _ = await sidecar.tts()
    assert status == 200 and headers["X-Cache"] == "miss" and sidecar.syntheses == 2
    assert (await sidecar.tts())[1]["X-Cache"] == "hit"


async def test_memory_stays_under_max_bytes(start: SidecarFactory) -> None:
    one = len((await (await start(cache={"enabled": False})).tts())[2])
    sidecar = await start(cache={"max_bytes": one * 3 + 10})
    for i in range(30):
        status, _, _ = await sidecar.tts(form(f"text number {i}"))
        assert status == 200
        assert sidecar.runtime.cache.bytes <= one * 3 + 10
    assert sidecar.runtime.cache.entries == 3
    assert (await sidecar.tts(form("text number 29")))[1]["X-Cache"] == "hit"
    assert (await sidecar.tts(form("text number 0")))[1]["X-Cache"] == "miss"  # long evicted


@pytest.mark.parametrize("shared", [False, True])
async def test_tenants_share_entries_only_when_shared(start: SidecarFactory, shared: bool) -> None:
    sidecar = await start(cache={"shared": shared})
    acme = await sidecar.tts(Authorization=f"Bearer {KEYS['acme']}")
    bulk = await sidecar.tts(Authorization=f"Bearer {KEYS['bulk']}")
    assert acme[1]["X-Cache"] == "miss"
    assert bulk[1]["X-Cache"] == ("hit" if shared else "miss")
    assert sidecar.syntheses == (1 if shared else 2)
    assert (await sidecar.tts(Authorization=f"Bearer {KEYS['bulk']}"))[1]["X-Cache"] == "hit"


async def test_with_the_cache_off_nothing_changes(start: SidecarFactory) -> None:
    sidecar = await start(cache={})
    assert not sidecar.runtime.config.cache.enabled
    for _ in range(2):
        status, headers, _ = await sidecar.tts()
        assert status == 200 and "X-Cache" not in headers and "X-Backend" in headers
        status, headers, _ = await sidecar.speech()
        assert status == 200 and "X-Cache" not in headers
    assert sidecar.syntheses == 4 and sidecar.runtime.cache.entries == 0
    assert sidecar.counted("hit") == sidecar.counted("miss") == 0


# --- the disk copy (cache.disk) ------------------------------------------------------------------


def disk_settings(state: Path) -> dict[str, Any]:
    return {"cache": {"disk": True}, "tasks": {"enabled": True, "state_dir": str(state)}}


def entry_files(state: Path) -> set[str]:
    return {p.name for p in (state / "cache").iterdir()}


async def test_entries_on_disk_survive_a_restart_until_a_prompt_write(start: SidecarFactory, tmp_path: Path) -> None:
    settings = disk_settings(tmp_path)
    first = await start(cache=settings["cache"], tasks=settings["tasks"])
    assert (await first.tts())[1]["X-Cache"] == "miss"
    assert (await first.tts(form(index="exampleB")))[1]["X-Cache"] == "miss"
    await first.client.close()  # the sidecar stops: its disk copy is written by now
    assert len(entry_files(tmp_path)) == 2
    second = await start(cache=settings["cache"], tasks=settings["tasks"])
    status, headers, body = await second.tts()
    assert status == 200 and headers["X-Cache"] == "hit" and second.syntheses == 0
    assert json.loads(body)["success"] is True
    assert second.runtime.cache.entries == 2
    # The write counts start at zero again: a prompt write deletes the entries read back of its index.
    async with second.client.put("/api/v1/prompts/exampleA",
                                 data={"prompt_audio_path": "a.wav", "prompt_text": "new"}) as resp:
        assert resp.status == 200, await resp.text()
    assert second.runtime.cache.entries == 1
    await second.client.close()
    assert len(entry_files(tmp_path)) == 1
    third = await start(cache=settings["cache"], tasks=settings["tasks"])
    assert (await third.tts())[1]["X-Cache"] == "miss" and third.syntheses == 1
    assert (await third.tts(form(index="exampleB")))[1]["X-Cache"] == "hit"


async def test_a_corrupt_file_on_disk_is_removed_and_not_served(start: SidecarFactory, tmp_path: Path) -> None:
    settings = disk_settings(tmp_path)
    first = await start(cache=settings["cache"], tasks=settings["tasks"])
    assert (await first.tts())[1]["X-Cache"] == "miss"
    await first.client.close()
    (name,) = entry_files(tmp_path)
    path = tmp_path / "cache" / name
    header, body = path.read_bytes().split(b"\n", 1)
    path.write_bytes(header + b"\n" + body[:-1])  # one byte short of what its header says
    second = await start(cache=settings["cache"], tasks=settings["tasks"])
    assert second.runtime.cache.entries == 0 and entry_files(tmp_path) == set()
    status, headers, _ = await second.tts()
    assert status == 200 and headers["X-Cache"] == "miss" and second.syntheses == 1
