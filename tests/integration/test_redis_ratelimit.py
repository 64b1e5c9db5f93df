"""Tenants' request rates end to end.

In-process (the sidecar's app under pytest-aiohttp, an emulator backend served in the same
process): a tenant over its rate gets 429 ``rate_limited`` with Retry-After on /api/v1/tts,
/api/v1/tasks and /v1/audio/speech (OpenAI's shape), counted as rejected under its name; another
tenant is not held back; a reload's new rate applies to the next request.

Across replicas, sharing one real redis-server (tests/redis_server.py): two such apps with tasks
in Redis allow a tenant its burst between them, not each. Two RateLimiters, each with its own
RedisLink, stand for two sidecars under load: sprayed with one tenant's requests they allow no
more than the one bucket's bound between them; with Redis stopped mid-run each goes on with its
own bucket, and picks Redis up again once it is back on the same port.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from glmtts.emulator.app import Emulator, EmulatorOptions
from glmtts.emulator.prompts import PromptStore
from glmtts.emulator.synthetic import SyntheticEngine
from glmtts.emulator.timing import ServiceModel
from scheduler.config import load_config
from scheduler.config.tenants import RateConfig
from scheduler.http.app import RUNTIME, build_app
from scheduler.runtime.ratelimit import RateLimiter, rate_key
from scheduler.runtime.redislink import RedisLink
from tests.inprocess.support import UPSTREAM_TIMEOUT_SCALE
from tests.redis_server import RedisServer, redis_server

TIME_SCALE = 0.01
TOKEN = "admin-token-0123456789abcdef"
ACME = "acme-key-0123456789abcdef"
BULK = "bulk-key-0123456789abcdef"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BODY = urlencode({"input_text": "你好", "index": "exampleA"}).encode()

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


# --- in-process: the routes --------------------------------------------------------------------


def tenants_section(acme_rate: str) -> str:
    return ("tenants:\n  list:\n"
            f"    - {{name: acme, keys: [{ACME}], rate: {acme_rate}}}\n"
            f"    - {{name: bulk, keys: [{BULK}]}}\n")


@dataclass
class Sidecar:
    client: TestClient[web.Request, web.Application]
    config_path: Path

    async def tts(self, key: str) -> ClientResponse:
        return await self.client.post("/api/v1/tts", data=BODY, headers={**FORM, "Authorization": f"Bearer {key}"})

    async def task(self, key: str) -> ClientResponse:
        return await self.client.post("/api/v1/tasks", data=BODY, headers={**FORM, "Authorization": f"Bearer {key}"})

    async def speech(self, key: str) -> ClientResponse:
        return await self.client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "你好"},
                                      headers={"Authorization": f"Bearer {key}"})

    async def reload_tenants(self, acme_rate: str) -> None:
        text = self.config_path.read_text()
        self.config_path.write_text(text[: text.index("tenants:\n")] + tenants_section(acme_rate))
        async with self.client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200, await resp.text()
            assert "tenants" in (await resp.json())["changed"]

    def rejections_counted(self, reason: str) -> float:
        registry = self.client.app[RUNTIME].metrics.registry
        return sum(sample.value for metric in registry.collect() for sample in metric.samples
                   if sample.name == "glmtts_sidecar_admission_rejections_total"
                   and sample.labels.get("reason") == reason)

    def requests_counted(self, tenant: str, outcome: str) -> float:
        registry = self.client.app[RUNTIME].metrics.registry
        return sum(sample.value for metric in registry.collect() for sample in metric.samples
                   if sample.name == "glmtts_sidecar_requests_total" and sample.labels.get("tenant") == tenant
                   and sample.labels.get("outcome") == outcome)


def emulator() -> Emulator:
    store = PromptStore(None)
    store.load()
    return Emulator(SyntheticEngine(ServiceModel(time_scale=TIME_SCALE)), store,
                    EmulatorOptions(time_scale=UPSTREAM_TIMEOUT_SCALE))


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def start_sidecar(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path) -> SidecarFactory:
    async def start(name: str = "a", *, acme_rate: str = "{per_s: 0.2, burst: 2}", store: str = "sqlite") -> Sidecar:
        server = await aiohttp_server(emulator().make_app())
        url = str(server.make_url("")).rstrip("/")
        path = tmp_path / f"sidecar-{name}.yaml"
        path.write_text(f"backends:\n  gpus: []\n  external: [{json.dumps(url)}]\n  slots: 2\n"
                        "  health: {interval_s: 0.05, timeout_s: 2.0, start_timeout_s: 30.0}\n"
                        "  warmup: {enabled: false}\n"
                        f"admin: {{token: {TOKEN}}}\n"
                        f"tasks: {{state_dir: {json.dumps(str(tmp_path / f'state-{name}'))}, store: {store}, "
                        f"redis: {{cluster: rates, replica: {name}}}}}\n"
                        + tenants_section(acme_rate))
        client = await aiohttp_client(build_app(load_config(path), config_path=str(path)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while (await (await client.get("/readyz")).json())["ready_backends"] != 1:
            assert loop.time() < deadline, "the backend did not become ready"
            await asyncio.sleep(0.02)
        return Sidecar(client=client, config_path=path)

    return start


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory) -> Sidecar:
    return await start_sidecar()


async def answer(resp: ClientResponse) -> tuple[int, dict[str, str], Any]:
    async with resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.read()
        return resp.status, dict(resp.headers), body


async def test_over_its_rate_a_tenant_gets_429_with_retry_after_on_every_route(sidecar: Sidecar) -> None:
    assert (await answer(await sidecar.tts(ACME)))[0] == 200
    status, _, body = await answer(await sidecar.task(ACME))
    assert status == 202, body  # the burst of 2 is shared by both APIs
    status, headers, body = await answer(await sidecar.tts(ACME))
    assert (status, body["reason"]) == (429, "rate_limited"), body
    # 0.2 a second: the next token is about 5 s away (less what passed since the burst).
    assert 4 <= int(headers["Retry-After"]) <= 5
    assert "over its request rate (0.2 per second, bursts of 2)" in body["detail"]
    status, headers, body = await answer(await sidecar.task(ACME))
    assert (status, body["reason"], 4 <= int(headers["Retry-After"]) <= 5) == (429, "rate_limited", True)

    status, headers, body = await answer(await sidecar.speech(ACME))
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert 4 <= int(headers["Retry-After"]) <= 5 and 3000 < int(headers["retry-after-ms"]) <= 5000
    assert "x-should-retry" not in headers  # retryable: the SDKs wait Retry-After and try again

    assert (await answer(await sidecar.tts(BULK)))[0] == 200  # another tenant is not held back
    assert (await answer(await sidecar.speech(BULK)))[0] == 200
    assert sidecar.requests_counted("acme", "rejected") == 3
    assert sidecar.requests_counted("bulk", "rejected") == 0
    assert sidecar.rejections_counted("rate_limited") == 3


async def test_a_reloaded_rate_applies_to_the_next_request(sidecar: Sidecar) -> None:
    for _ in range(2):
        assert (await answer(await sidecar.tts(ACME)))[0] == 200
    assert (await answer(await sidecar.tts(ACME)))[0] == 429
    await sidecar.reload_tenants("{per_s: 1000.0, burst: 3}")
    statuses = [(await answer(await sidecar.tts(ACME)))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    await sidecar.reload_tenants("{per_s: 0.01, burst: 1}")  # at most the new burst is left
    assert [(await answer(await sidecar.tts(ACME)))[0] for _ in range(2)] in ([200, 429], [429, 429])
    status, headers, _ = await answer(await sidecar.tts(ACME))
    assert status == 429 and int(headers["Retry-After"]) >= 99


# --- across replicas: one bucket in Redis --------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


async def test_two_sidecars_with_tasks_in_redis_share_a_tenants_rate(start_sidecar: SidecarFactory,
                                                                      redis: RedisServer) -> None:
    replicas = [await start_sidecar(name, acme_rate="{per_s: 0.2, burst: 3}", store=redis.url) for name in "ab"]
    assert all(r.client.app[RUNTIME].redis is not None for r in replicas)
    statuses = [(await answer(await replica.tts(ACME)))[0] for replica in replicas for _ in range(2)]
    assert statuses == [200, 200, 200, 429]  # 3 between them, not 3 each
    status, headers, body = await answer(await replicas[0].speech(ACME))
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded") and 4 <= int(headers["Retry-After"]) <= 5
    assert (await answer(await replicas[1].tts(BULK)))[0] == 200


@pytest.fixture
async def links(redis: RedisServer) -> AsyncIterator[list[RedisLink]]:
    """Two sidecars' links to the one Redis, reconnecting quickly once it is back."""
    links = [RedisLink(redis.url, connect_timeout_s=0.5, reconnect_max_s=0.2) for _ in range(2)]
    try:
        for link in links:
            await link.open()
            assert link.up
        yield links
    finally:
        for link in links:
            await link.close()


@dataclass
class Spray:
    allowed: int = 0
    refused: int = 0
    slowest_s: float = 0.0


async def spray(limiter: RateLimiter, link: RedisLink, rate: RateConfig, seconds: float, cluster: str) -> Spray:
    """One tenant's requests as fast as two clients can send them, for ``seconds`` (at most 20000)."""
    seen = Spray()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def client() -> None:
        for _ in range(10_000):
            if loop.time() >= end:
                return
            started = loop.time()
            wait = await limiter.take("acme", rate, link=link, cluster=cluster)
            seen.slowest_s = max(seen.slowest_s, loop.time() - started)
            if wait is None:
                seen.allowed += 1
            else:
                seen.refused += 1
            await asyncio.sleep(0.001)

    await asyncio.gather(client(), client())
    return seen


async def test_two_replicas_share_one_bucket_in_redis(links: list[RedisLink]) -> None:
    rate = RateConfig(per_s=40.0, burst=10)
    replicas = [RateLimiter(redis_timeout_s=0.5) for _ in links]
    loop = asyncio.get_running_loop()
    started = loop.time()
    a, b = await asyncio.gather(*(spray(r, link, rate, 2.0, "c1") for r, link in zip(replicas, links, strict=True)))
    window = loop.time() - started
    total = a.allowed + b.allowed
    assert a.refused > 100 and b.refused > 100  # both pressed far past the rate
    # One bucket's bound, whoever asked: Redis's clock runs within the window measured here.
    assert total <= rate.burst + rate.per_s * window + 1
    assert total >= rate.burst + rate.per_s * 2.0 * 0.8  # and the rate was given, not starved
    assert min(a.allowed, b.allowed) >= total * 0.2  # to both replicas
    assert not any(r.degraded for r in replicas)
    ttl_ms = await links[0].client.pttl(rate_key("c1", "acme"))
    assert 0 < ttl_ms <= 1000 + rate.burst / rate.per_s * 1000  # gone once it would be full again


async def test_with_redis_stopped_each_replica_goes_on_with_its_own_bucket(redis: RedisServer,
                                                                           links: list[RedisLink]) -> None:
    rate = RateConfig(per_s=20.0, burst=5)
    replicas = [RateLimiter(redis_timeout_s=0.2, retry_redis_s=0.2) for _ in links]
    shared = await asyncio.gather(*(spray(r, link, rate, 1.0, "c2") for r, link in zip(replicas, links, strict=True)))
    assert sum(s.allowed for s in shared) <= rate.burst + rate.per_s * 1.5 + 1

    redis.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    alone = await asyncio.gather(*(spray(r, link, rate, 1.5, "c2") for r, link in zip(replicas, links, strict=True)))
    window = loop.time() - started
    assert all(r.degraded for r in replicas) and not any(link.up for link in links)
    for seen in alone:
        # Each at the full rate on its own (fail open), never past its own bucket's bound ...
        assert rate.per_s * 1.5 * 0.6 <= seen.allowed <= rate.burst + rate.per_s * window + 1
        assert seen.slowest_s < 1.0  # ... and no request waits long for the Redis that is gone
    # ... so together they may pass the cluster-wide rate: up to N times it.
    assert sum(s.allowed for s in alone) > rate.burst + rate.per_s * window + 1

    redis.start()
    deadline = loop.time() + 10.0
    while any(r.degraded for r in replicas):
        assert loop.time() < deadline, "the limiters did not return to Redis"
        for replica, link in zip(replicas, links, strict=True):
            await replica.take("acme", rate, link=link, cluster="c2")
        await asyncio.sleep(0.05)
    assert await links[0].client.exists(rate_key("c2", "acme")) == 1
