"""The admin and control routes in-process: the sidecar's app under pytest-aiohttp's client, its
backends emulator apps served in the same process and configured as ``backends.external`` URLs.

Health, queue and concurrency (what anyone sees, what the admin token adds), prompt writes fanned
out to every backend (and the 502 when they disagree), reload, drain and backend restarts behind
the admin token, and the middleware's answers: upstream's 404/405, the sidecar's 413, X-Request-ID.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from glmtts.contract import PromptConfig
from glmtts.emulator.app import Emulator, EmulatorOptions
from glmtts.emulator.prompts import DEFAULT_PROMPTS, PromptStore
from glmtts.emulator.synthetic import SyntheticEngine
from glmtts.emulator.timing import ServiceModel
from scheduler.config import load_config
from scheduler.http.admin import PUBLIC_QUEUE
from scheduler.http.app import build_app
from tests.contract_cases import multipart
from tests.inprocess.support import UPSTREAM_TIMEOUT_SCALE, until

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIME_SCALE = 0.01
UNAUTHORIZED = (b'{"detail":"This endpoint needs the admin token (Authorization: Bearer <token>)",'
                b'"reason":"unauthorized"}')
GUARDED = [
    ("POST", "/admin/reload"),
    ("POST", "/admin/drain"),
    ("POST", "/admin/backends/ext-0/restart"),
    ("POST", "/api/v1/prompts"),
    ("PUT", "/api/v1/prompts/exampleA"),
    ("DELETE", "/api/v1/prompts/exampleA"),
    ("POST", "/api/v1/clear_cache"),
]
WRONG = [None, "Bearer wrong-token-0123456789", "", "Bearer", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"]

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@dataclass
class Sidecar:
    client: TestClient[web.Request, web.Application]
    emulators: list[Emulator]
    config_path: Path
    stopped: asyncio.Event  # set when a finished drain stops the sidecar


def config_text(urls: list[str], state_dir: Path, extra: str = "") -> str:
    return (f"backends:\n  gpus: []\n  external: {json.dumps(urls)}\n  slots: 1\n"
            "  health: {interval_s: 0.05, timeout_s: 2.0, start_timeout_s: 30.0}\n"
            "  warmup: {enabled: false}\n"
            f"tasks: {{state_dir: {json.dumps(str(state_dir))}}}\n"
            f"admin: {{token: {TOKEN}}}\n{extra}")


def emulator() -> Emulator:
    store = PromptStore(None)
    store.load()
    engine = SyntheticEngine(ServiceModel(time_scale=TIME_SCALE))
    return Emulator(engine, store, EmulatorOptions(time_scale=UPSTREAM_TIMEOUT_SCALE))


async def ready_backends(client: TestClient[web.Request, web.Application]) -> int:
    async with client.get("/readyz") as resp:
        return int((await resp.json())["ready_backends"])


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def start_sidecar(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory,
                  tmp_path: Path) -> SidecarFactory:
    async def start(extra: str = "", backends: int = 2) -> Sidecar:
        emulators = [emulator() for _ in range(backends)]
        servers = [await aiohttp_server(e.make_app()) for e in emulators]
        path = tmp_path / "sidecar.yaml"
        path.write_text(config_text([str(s.make_url("")).rstrip("/") for s in servers], tmp_path / "state", extra))
        stopped = asyncio.Event()
        app = build_app(load_config(path), config_path=str(path), stop=stopped.set)
        client = await aiohttp_client(app)
        await until(lambda: _all_ready(client, backends), "every backend to be ready")
        return Sidecar(client=client, emulators=emulators, config_path=path, stopped=stopped)

    async def _all_ready(client: TestClient[web.Request, web.Application], count: int) -> bool:
        return await ready_backends(client) == count

    return start


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory) -> Sidecar:
    return await start_sidecar()


async def answer(resp: ClientResponse) -> tuple[int, Any]:
    async with resp:
        return resp.status, await resp.json()


# --- reads: health, queue, concurrency ------------------------------------------------------------


async def test_health_in_upstreams_shape_with_backends_for_the_admin(sidecar: Sidecar) -> None:
    client = sidecar.client
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        status, body = await answer(await client.get("/api/v1/health", headers=headers))
        assert status == 200
        assert body == {"status": "healthy", "model_loaded": False, "model_sample_rate": None,
                        "model_use_phoneme": None, "prompt_cache_count": len(DEFAULT_PROMPTS)}
    status, body = await answer(await client.get("/api/v1/health", headers=AUTH))
    assert status == 200 and body["status"] == "healthy"
    assert [(b["id"], b["state"], b["managed"]) for b in body["backends"]] == [("ext-0", "ready", False),
                                                                               ("ext-1", "ready", False)]


async def test_queue_shows_the_public_part_and_the_details_to_the_admin(sidecar: Sidecar) -> None:
    client = sidecar.client
    status, public = await answer(await client.get("/api/v1/queue"))
    assert status == 200
    assert set(public) == {*PUBLIC_QUEUE, "policy", "estimates"}
    assert public["depth"] == 0 and public["policy"] == {"bands": ["interactive", "standard", "batch"]}
    assert set(public["estimates"]) == {"short", "long"}
    assert set(public["estimates"]["short"]) == {"chars", "wait_s", "service_s", "deadline_s"}
    status, details = await answer(await client.get("/api/v1/queue", headers=AUTH))
    assert status == 200
    assert {*PUBLIC_QUEUE, "policy", "estimates", "cost", "slow_backends", "slots", "backends"} <= set(details)
    assert set(details["policy"]) == {"order", "deadlines", "bands", "tenants"}
    assert [b["id"] for b in details["backends"]] == ["ext-0", "ext-1"]


async def test_concurrency_in_upstreams_shape_for_the_pool(sidecar: Sidecar) -> None:
    status, body = await answer(await sidecar.client.get("/api/v1/stats/concurrency"))
    assert status == 200 and body["success"] is True
    assert body["stats"]["short_text"] == {"active": 0, "total": 0, "limit": 2, "available": 2}
    assert body["config"]["concurrency"]["threshold"] == 200
    assert body["config"]["queue"]["worker_count"] == 2 and body["config"]["workers"] == 2
    assert set(body["queue"]) == set(PUBLIC_QUEUE)
    status, body = await answer(await sidecar.client.get("/api/v1/stats/concurrency", headers=AUTH))
    assert set(body["queue"]) > set(PUBLIC_QUEUE)


async def test_a_read_goes_to_one_ready_backend(sidecar: Sidecar) -> None:
    async with sidecar.client.get("/api/v1/prompts/exampleA") as resp:
        assert resp.status == 200 and resp.headers["X-Backend"] in ("ext-0", "ext-1")
        assert (await resp.json())["config"]["prompt_text"] == DEFAULT_PROMPTS["exampleA"].prompt_text


# --- writes: fanned out to every backend ----------------------------------------------------------


def prompt_form(text: str = "到处", index: str | None = "everywhere") -> tuple[str, bytes]:
    parts = [("prompt_audio_path", DEFAULT_PROMPTS["exampleB"].prompt_audio_path), ("prompt_text", text)]
    return multipart(*([("index", index)] if index is not None else []), *parts)


async def test_a_prompt_write_reaches_every_backend(sidecar: Sidecar) -> None:
    client = sidecar.client
    content_type, body = prompt_form()
    async with client.post("/api/v1/prompts", data=body, headers={"Content-Type": content_type, **AUTH}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Backend"] == "ext-0,ext-1"
        assert (await resp.json())["message"] == "Prompt 'everywhere' added successfully"
    assert [e.store["everywhere"].prompt_text for e in sidecar.emulators] == ["到处", "到处"]
    content_type, body = prompt_form("又一次", index=None)
    async with client.put("/api/v1/prompts/everywhere", data=body,
                          headers={"Content-Type": content_type, **AUTH}) as resp:
        assert resp.status == 200 and (await resp.json())["message"] == "Prompt 'everywhere' updated successfully"
    assert [e.store["everywhere"].prompt_text for e in sidecar.emulators] == ["又一次", "又一次"]
    async with client.delete("/api/v1/prompts/everywhere", headers=AUTH) as resp:
        assert resp.status == 200 and resp.headers["X-Backend"] == "ext-0,ext-1"
    assert ["everywhere" in e.store for e in sidecar.emulators] == [False, False]


async def test_backends_that_answer_a_write_differently_give_502_with_each_answer(sidecar: Sidecar) -> None:
    audio = DEFAULT_PROMPTS["exampleB"].prompt_audio_path
    sidecar.emulators[0].store.put("everywhere", PromptConfig(prompt_audio_path=audio, prompt_text="先有"))
    content_type, body = prompt_form()
    async with sidecar.client.post("/api/v1/prompts", data=body,
                                   headers={"Content-Type": content_type, **AUTH}) as resp:
        assert resp.status == 502 and resp.headers["Content-Type"] == "application/json"
        assert "Retry-After" not in resp.headers and "X-Backend" not in resp.headers
        payload = await resp.json()
    added = {"success": True, "message": "Prompt 'everywhere' added successfully", "index": "everywhere",
             "config": {"prompt_audio_path": audio, "prompt_text": "到处"}}
    assert payload == {
        "detail": "Backends gave different answers; their prompt caches may now differ",
        "reason": "partial_failure",
        "backends": [{"id": "ext-0", "status": 400, "body": {"detail": "Prompt index 'everywhere' already exists"}},
                     {"id": "ext-1", "status": 200, "body": added}],
    }


async def test_an_invalid_prompt_form_gets_upstreams_answer_before_any_backend(start_sidecar: SidecarFactory,
                                                                               tmp_path: Path) -> None:
    sidecar = await start_sidecar(f"prompts: {{allowed_dirs: [{json.dumps(str(tmp_path))}]}}\n")
    async with sidecar.client.post("/api/v1/prompts", data=b"not a form",
                                   headers={"Content-Type": "text/plain", **AUTH}) as resp:
        assert resp.status in (400, 422) and "detail" in await resp.json()
    content_type, body = prompt_form()
    async with sidecar.client.post("/api/v1/prompts", data=body,
                                   headers={"Content-Type": content_type, **AUTH}) as resp:
        assert resp.status == 403
        assert await resp.read() == (b'{"detail":"prompt_audio_path is outside the directories prompts.allowed_dirs '
                                     b'permits","reason":"prompt_path_not_allowed"}')
    assert ["everywhere" in e.store for e in sidecar.emulators] == [False, False]


# --- the admin token ------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
async def test_admin_routes_refuse_every_wrong_credential(sidecar: Sidecar, method: str, path: str) -> None:
    content_type, body = prompt_form()
    for authorization in WRONG:
        headers = {"Content-Type": content_type, "X-Request-ID": "who-1"}
        if authorization is not None:
            headers["Authorization"] = authorization
        async with sidecar.client.request(method, path, data=body, headers=headers) as resp:
            assert resp.status == 401, (authorization, await resp.text())
            assert await resp.read() == UNAUTHORIZED
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.headers["X-Request-ID"] == "who-1"
    assert ["everywhere" in e.store for e in sidecar.emulators] == [False, False]
    assert all("exampleA" in e.store for e in sidecar.emulators)
    assert await ready_backends(sidecar.client) == 2 and not sidecar.stopped.is_set()


@pytest.mark.parametrize("method,path", GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
async def test_an_authorization_that_is_not_ascii_is_400(sidecar: Sidecar, method: str, path: str) -> None:
    async with sidecar.client.request(method, path, headers={"Authorization": f"Bearer {TOKEN[:-2]}é"}) as resp:
        assert resp.status == 400
        assert await resp.read() == (b'{"detail":"The Authorization header must be ASCII: \'Bearer <token>\'",'
                                     b'"reason":"bad_authorization"}')
        assert "WWW-Authenticate" not in resp.headers


async def test_reload_with_the_token(sidecar: Sidecar) -> None:
    status, body = await answer(await sidecar.client.post("/admin/reload", headers=AUTH))
    assert (status, body) == (200, {"reloaded": True, "changed": [], "needs_restart": []})
    text = sidecar.config_path.read_text()
    sidecar.config_path.write_text(text + "queue: {max_size: 7}\n")
    status, body = await answer(await sidecar.client.post("/admin/reload", headers=AUTH))
    assert (status, body) == (200, {"reloaded": True, "changed": ["queue"], "needs_restart": []})
    assert (await answer(await sidecar.client.get("/api/v1/queue")))[1]["max_size"] == 7
    sidecar.config_path.write_text(text + "queue: {max_size: -1}\n")
    status, body = await answer(await sidecar.client.post("/admin/reload", headers=AUTH))
    assert status == 400
    assert set(body) == {"detail", "reason", "problems"}
    assert (body["detail"], body["reason"]) == ("The configuration file is invalid; the running one is kept",
                                                "invalid_config")
    assert body["problems"] and all("max_size" in p for p in body["problems"])
    assert (await answer(await sidecar.client.get("/api/v1/queue")))[1]["max_size"] == 7


async def test_drain_with_the_token_stops_admitting_then_stops(sidecar: Sidecar) -> None:
    status, body = await answer(await sidecar.client.post("/admin/drain", headers=AUTH))
    assert (status, body) == (202, {"draining": True, "queued": 0, "running": 0, "drain_timeout_s": 30.0})
    await asyncio.wait_for(sidecar.stopped.wait(), 5.0)
    status, body = await answer(await sidecar.client.get("/readyz"))
    assert (status, body) == (503, {"ready": False, "ready_backends": 2, "draining": True})


async def test_restart_backend_with_the_token(sidecar: Sidecar) -> None:
    status, body = await answer(await sidecar.client.post("/admin/backends/nope/restart", headers=AUTH))
    assert (status, body) == (404, {"detail": "No backend 'nope'", "reason": "unknown_backend"})
    status, body = await answer(await sidecar.client.post("/admin/backends/ext-0/restart", headers=AUTH))
    assert (status, body) == (202, {"restarting": "ext-0"})

    async def restarted() -> bool:
        backends = (await answer(await sidecar.client.get("/api/v1/health", headers=AUTH)))[1]["backends"]
        return [(b["restarts"], b["state"]) for b in backends] == [(1, "ready"), (0, "ready")]

    await until(restarted, "ext-0 to be restarted and ready again")


# --- the middleware: request ids, 404, 405, 413 ----------------------------------------------------


async def test_not_found_and_method_not_allowed_in_upstreams_shape(sidecar: Sidecar) -> None:
    async with sidecar.client.get("/nope", headers={"X-Request-ID": "r-1"}) as resp:
        assert (resp.status, await resp.read()) == (404, b'{"detail":"Not Found"}')
        assert resp.headers["X-Request-ID"] == "r-1" and resp.headers["Content-Type"] == "application/json"
    async with sidecar.client.delete("/api/v1/health", headers={"X-Request-ID": "r-2"}) as resp:
        assert (resp.status, await resp.read()) == (405, b'{"detail":"Method Not Allowed"}')
        assert resp.headers["Allow"] == "GET" and resp.headers["X-Request-ID"] == "r-2"
    async with sidecar.client.put("/healthz") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"


async def test_a_body_over_the_limit_is_413_and_the_connection_closed(start_sidecar: SidecarFactory) -> None:
    sidecar = await start_sidecar("limits: {max_body_bytes: 65536}\n")
    content_type, body = multipart(("index", "big"), ("prompt_audio_path", "x" * 70000), ("prompt_text", "大"))
    async with sidecar.client.post("/api/v1/prompts", data=body,
                                   headers={"Content-Type": content_type, "X-Request-ID": "big-1", **AUTH}) as resp:
        assert resp.status == 413
        assert await resp.read() == (b'{"detail":"Request body is larger than the limit of 65536 bytes",'
                                     b'"reason":"too_large","limit":65536}')
        assert resp.headers["X-Request-ID"] == "big-1" and resp.headers["Connection"] == "close"
    assert ["big" in e.store for e in sidecar.emulators] == [False, False]


async def test_request_ids_are_kept_when_sane_and_made_otherwise(sidecar: Sidecar) -> None:
    for given, kept in (("trace-42", True), ("x" * 200, True), ("x" * 201, False), ("", False),
                        ("tab\there", False)):
        async with sidecar.client.get("/healthz", headers={"X-Request-ID": given}) as resp:
            echoed = resp.headers["X-Request-ID"]
        assert (echoed == given) is kept, given
        if not kept:
            assert re.fullmatch(r"[0-9a-f]{32}", echoed), echoed
    async with sidecar.client.get("/healthz") as resp:
        assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"])
