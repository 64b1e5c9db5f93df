"""Async tasks in Redis (``tasks.store: redis://...``), against a real redis-server.

The store (scheduler.runtime.taskstore.redis_store) is driven directly: two RedisTaskStore objects
with different replica names stand for two sidecars sharing one Redis, with short leases so that a
lapse takes about a second. One end-to-end test runs a real sidecar on it and restarts Redis
under it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.runtime.redislink import RedisLink
from scheduler.runtime.taskstore import Quota, QuotaExceeded, StoreError, TaskState
from scheduler.runtime.taskstore.redis_store import EvictionRefused, RedisTaskStore
from tests.contract_cases import multipart
from tests.redis_server import RedisServer, redis_server
from tests.support import Service, http, sidecar_config, start_sidecar, wait_until

LEASE_S = 1.0
TTL_S = 600.0
WAV = b"RIFF" + b"\0" * 40
QUOTA = Quota(max_tasks=3, max_bytes=1 << 20, min_free_bytes=0)
TEXT = "今天天气很好，我们去公园散步。"


@pytest.fixture()
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture()
async def link(redis: RedisServer) -> AsyncIterator[RedisLink]:
    link = RedisLink(redis.url, connect_timeout_s=0.5, reconnect_max_s=0.2)
    await link.open()
    try:
        yield link
    finally:
        await link.close()


def replica(link: RedisLink, name: str, *, cluster: str = "test") -> RedisTaskStore:
    return RedisTaskStore(link, cluster=cluster, replica=name, lease_s=LEASE_S, ttl_s=TTL_S)


@pytest.fixture()
async def stores(link: RedisLink) -> tuple[RedisTaskStore, RedisTaskStore]:
    a, b = replica(link, "a"), replica(link, "b")
    await a.open()
    await b.open()
    return a, b


async def submit(store: RedisTaskStore, *, tenant: str = "alpha", body: bytes = b"body", key: str | None = None,
                 deadline_s: float = 60.0, quota: Quota | None = QUOTA) -> Any:
    now = time.time()
    return await store.create(tenant=tenant, body=body, content_type="text/plain", chars=4,
                              deadline_at=now + deadline_s, now=now, idempotency_key=key, quota=quota)


async def pttl(link: RedisLink, key: str) -> float:
    return float(await link.client.pttl(key)) / 1000


async def test_create_is_idempotent_counts_the_quota_cluster_wide_and_sets_ttls(
        stores: tuple[RedisTaskStore, RedisTaskStore], link: RedisLink) -> None:
    a, b = stores
    first, created = await submit(a, key="order-1", deadline_s=100.0)
    assert created and first.state is TaskState.QUEUED and first.body_bytes == 4
    again, created_again = await submit(b, key="order-1", body=b"other")  # another replica, same key
    assert not created_again and again.id == first.id and again.request_sha256 == first.request_sha256
    assert (await a.find("alpha", "order-1")).id == first.id  # type: ignore[union-attr]
    assert await b.find("beta", "order-1") is None  # another tenant's key is its own
    # Unfinished: the record, body and key live for the deadline plus ttl_s.
    for kind in ("task", "body"):
        assert 100 + TTL_S - 5 < await pttl(link, a.key(kind, first.id)) <= 100 + TTL_S
    assert 100 + TTL_S - 5 < await pttl(link, f"{a.prefix}idem:alpha:order-1") <= 100 + TTL_S
    await submit(a)
    await submit(b)  # the quota is counted over both replicas: 3 stored tasks
    with pytest.raises(QuotaExceeded) as refused:
        await submit(a)
    assert refused.value.limit == "tasks" and refused.value.used == 3 and refused.value.oldest_finished_at is None
    with pytest.raises(QuotaExceeded) as too_big:
        await submit(a, tenant="beta", body=b"x" * ((1 << 20) + 1))
    assert too_big.value.limit == "bytes"
    assert await a.usage("alpha") == (3, 12)
    # Finished: the body goes, the WAV and record live ttl_s, and the WAV counts instead of the body.
    claimed = await a.next_claim(0.1)
    assert claimed is not None and claimed.task.id == first.id
    settled = await a.succeed(first.id, wav=WAV, result={"success": True}, now=time.time())
    assert settled.outcome == "done" and settled.task is not None and settled.task.state is TaskState.SUCCEEDED
    assert await link.client.exists(a.key("body", first.id)) == 0
    for kind in ("task", "wav"):
        assert TTL_S - 5 < await pttl(link, a.key(kind, first.id)) <= TTL_S
    assert await b.audio(first.id) == WAV and await a.usage("alpha") == (3, 8 + len(WAV))
    with pytest.raises(QuotaExceeded) as later:
        await submit(a)
    assert later.value.oldest_finished_at == pytest.approx(settled.task.finished_at)


async def test_a_lapsed_lease_is_reclaimed_by_another_replica_whose_result_wins(
        stores: tuple[RedisTaskStore, RedisTaskStore], link: RedisLink) -> None:
    a, b = stores
    task, _ = await submit(a)
    claimed = await a.next_claim(0.1)
    assert claimed is not None and await b.next_claim(0.1) is None  # delivered once
    assert (await a.mark_running(task.id, time.time())).state is TaskState.RUNNING  # type: ignore[union-attr]
    assert await b.mark_running(task.id, time.time()) is None  # not b's
    # While a renews, b cannot take it over, however long it runs.
    for _ in range(3):
        await asyncio.sleep(LEASE_S / 2)
        assert await a.renew([task.id]) == {task.id: "running"}
        assert await b.reclaim(10, time.time()) == []
    # a stops renewing (it died, or lost Redis): past the lease, b takes it over and it runs again.
    await asyncio.sleep(LEASE_S * 1.3)
    taken = await b.reclaim(10, time.time())
    assert [t.task.id for t in taken] == [task.id] and taken[0].task.state is TaskState.QUEUED
    assert await link.client.get(a.key("lease", task.id)) == b"b"
    assert await a.renew([task.id]) == {task.id: "lost"}  # a would withdraw a queued job now
    assert (await a.succeed(task.id, wav=WAV, result={}, now=time.time())).outcome == "lost"  # discarded
    assert (await b.mark_running(task.id, time.time())).attempts == 2  # type: ignore[union-attr]
    settled = await b.succeed(task.id, wav=WAV + b"b", result={"by": "b"}, now=time.time())
    assert settled.outcome == "done" and await a.audio(task.id) == WAV + b"b"
    assert await link.client.xlen(a.queue) == 0 and (await link.client.xpending(a.queue, "test"))["pending"] == 0
    assert await link.client.exists(a.key("lease", task.id)) == 0


async def test_a_lease_that_lapsed_while_nobody_took_over_is_still_the_holders(
        stores: tuple[RedisTaskStore, RedisTaskStore], link: RedisLink) -> None:
    a, _ = stores
    task, _ = await submit(a)
    assert await a.next_claim(0.1) is not None
    await link.client.delete(a.key("lease", task.id))  # as if Redis was unreachable past the lease
    assert await a.renew([task.id]) == {task.id: "queued"}  # the entry is still a's: the lease is taken again
    assert await link.client.get(a.key("lease", task.id)) == b"a"


async def test_a_cancel_from_any_replica_reaches_the_holder(
        stores: tuple[RedisTaskStore, RedisTaskStore], link: RedisLink) -> None:
    a, b = stores
    held, _ = await submit(a)
    waiting, _ = await submit(a)
    claimed = await a.next_claim(0.1)
    assert claimed is not None and claimed.task.id == held.id
    updated, cancelled = await b.cancel(held.id, tenant="alpha", now=time.time())
    assert cancelled and updated is not None and updated.state is TaskState.CANCELLED
    assert await b.cancel(held.id, tenant="beta", now=time.time()) == (None, False)  # another tenant's: unknown
    assert (await b.cancel(held.id, tenant="alpha", now=time.time()))[1] is False  # already cancelled
    assert await a.renew([held.id]) == {held.id: "cancelled"}  # the holder sees it at its next renewal
    # A running job's answer that comes after the cancel is not stored; the holder lets go of the task.
    assert (await a.succeed(held.id, wav=WAV, result={}, now=time.time())).outcome == "finished"
    assert await a.audio(held.id) is None
    assert (await a.succeed(held.id, wav=WAV, result={}, now=time.time())).outcome == "lost"  # no longer a's
    # A queued task nobody took leaves the queue at once.
    assert (await a.cancel(waiting.id, tenant="alpha", now=time.time()))[1]
    assert await b.next_claim(0.1) is None
    assert await link.client.xlen(a.queue) == 0 and (await link.client.xpending(a.queue, "test"))["pending"] == 0


async def test_sweep_removes_finished_tasks_and_uncounts_expired_ones(
        stores: tuple[RedisTaskStore, RedisTaskStore], link: RedisLink) -> None:
    a, b = stores
    done, _ = await submit(a, key="k1")
    gone, _ = await submit(a)
    kept, _ = await submit(a)
    assert (await a.next_claim(0.1)) is not None
    await a.succeed(done.id, wav=WAV, result={}, now=time.time())
    await link.client.delete(a.key("task", gone.id))  # as if its TTL ran out
    assert await b.sweep(now=time.time(), ttl_s=TTL_S) == 1  # only the expired one: the finished one is recent
    assert await a.usage("alpha") == (2, len(WAV) + 4)
    assert await b.sweep(now=time.time() + TTL_S + 1, ttl_s=TTL_S) == 1
    assert await a.usage("alpha") == (1, 4) and await a.get(done.id, tenant="alpha") is None
    assert await link.client.exists(a.key("wav", done.id), f"{a.prefix}idem:alpha:k1") == 0
    assert (await a.get(kept.id, tenant="alpha")) is not None
    assert (await a.counts())["queued"] == 1


async def test_redis_down_is_a_store_error_and_the_link_reconnects(redis: RedisServer) -> None:
    link = RedisLink(redis.url, connect_timeout_s=0.5, reconnect_max_s=0.2)
    await link.open()
    try:
        store = replica(link, "a")
        await store.open()
        redis.stop()
        with pytest.raises(StoreError):
            await submit(store)
        assert not link.up
        redis.start()
        assert await link.wait_up(10.0)
        task, created = await submit(store)
        assert created and (await store.get(task.id, tenant="alpha")) is not None
    finally:
        await link.close()


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_a_failure_reported_as_the_link_closes_does_not_hold_the_close_up(redis: RedisServer,
                                                                                 turns: int) -> None:
    # A command fails (a request reports it) just as the sidecar shuts down: the watcher, woken by
    # that report, must still take its cancellation (asyncio.wait_for before 3.12 lost it, and the
    # close then waited forever).
    link = RedisLink(redis.url, connect_timeout_s=0.5, reconnect_max_s=0.2)
    await link.open()
    assert link.up
    for _ in range(100):  # a few loop turns: until the watcher waits on its event
        if link._changed._waiters:
            break
        await asyncio.sleep(0)
    assert link._changed._waiters, "the watcher never waited on its event"
    link.failed(ConnectionError("reset by peer"))
    for _ in range(turns):
        await asyncio.sleep(0)
    closing = asyncio.ensure_future(link.close())
    done, _ = await asyncio.wait({closing}, timeout=10.0)
    assert done, "close() still waits for the watcher"
    await closing
    assert not link.up


@pytest.mark.parametrize("extra", [(), ("--rename-command", "CONFIG", "")], ids=["config", "info"])
async def test_a_redis_that_may_evict_is_refused(tmp_path: Path, extra: tuple[str, ...]) -> None:
    with redis_server(tmp_path / "lru", policy="allkeys-lru", extra=extra) as server:
        link = RedisLink(server.url, connect_timeout_s=0.5)
        await link.open()
        try:
            with pytest.raises(EvictionRefused, match="allkeys-lru"):
                await replica(link, "a").open()
        finally:
            await link.close()


async def test_two_replicas_racing_for_50_tasks_claim_each_exactly_once(redis: RedisServer) -> None:
    links = [RedisLink(redis.url, connect_timeout_s=0.5) for _ in range(2)]
    for one in links:
        await one.open()
    try:
        stores = [replica(one, name, cluster="race") for one, name in zip(links, ("a", "b"), strict=True)]
        await stores[0].open()
        ids = {(await submit(stores[0], quota=None))[0].id for _ in range(50)}
        claims: dict[str, list[str]] = {"a": [], "b": []}

        async def work(store: RedisTaskStore) -> None:
            end = time.monotonic() + 20.0
            while time.monotonic() < end and sum(map(len, claims.values())) < 50:
                claimed = await store.next_claim(0.05)
                if claimed is None:
                    continue
                claims[store.replica].append(claimed.task.id)
                assert await store.mark_running(claimed.task.id, time.time()) is not None
                await asyncio.sleep(0.005)
                assert (await store.succeed(claimed.task.id, wav=WAV, result={}, now=time.time())).outcome == "done"

        await asyncio.gather(*(work(store) for store in stores))
        every = claims["a"] + claims["b"]
        assert sorted(every) == sorted(ids) and claims["a"] and claims["b"]
        assert (await stores[1].counts())["succeeded"] == 50
        assert await links[0].client.xlen(stores[0].queue) == 0
    finally:
        for one in links:
            await one.close()


# --- one sidecar on Redis, end to end ------------------------------------------------------------------


def submit_task(service: Service, text: str = TEXT) -> tuple[int, dict[str, str], dict[str, Any]]:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    status, headers, raw = http("POST", service.url + "/api/v1/tasks", body=body,
                                headers={"Content-Type": content_type})
    return status, headers, json.loads(raw)


def sync_tts(service: Service) -> int:
    content_type, body = multipart(("input_text", TEXT), ("index", "exampleA"))
    return http("POST", service.url + "/api/v1/tts", body=body, headers={"Content-Type": content_type})[0]


def test_tasks_survive_a_redis_restart_and_sync_tts_never_notices(tmp_path: Path, redis: RedisServer) -> None:
    store = (f'tasks: {{store: "{redis.url}", redis: {{cluster: e2e, lease_s: 6.0, connect_timeout_s: 0.5, '
             "reconnect_max_s: 0.5}}\n")
    text, port = sidecar_config(backends=2, time_scale=0.2, extra=store)
    service = start_sidecar(text, port, tmp_path)
    sync_statuses: list[int] = []
    stop = threading.Event()

    def keep_syncing() -> None:  # synchronous TTS all along, Redis up or down
        deadline = time.monotonic() + 60.0
        while not stop.is_set() and time.monotonic() < deadline:
            sync_statuses.append(sync_tts(service))
            stop.wait(0.2)

    syncing = threading.Thread(target=keep_syncing)
    try:
        accepted = [submit_task(service, TEXT + str(i)) for i in range(10)]
        assert all(status == 202 for status, _, _ in accepted), accepted
        ids = [body["task_id"] for _, _, body in accepted]
        syncing.start()
        wait_until(lambda: poll(service, ids[0]).get("status") in ("running", "succeeded"), 10.0, "a task to start")
        assert sum(poll(service, task_id).get("status") not in FINISHED for task_id in ids) >= 5
        redis.stop()  # mid-run: tasks running, claimed and waiting, and still in the cluster's queue
        status, headers, refused = submit_task(service)
        assert status == 503 and refused["reason"] == "store_unavailable" and int(headers["Retry-After"]) > 0
        assert http("GET", f"{service.url}/api/v1/tasks/{ids[-1]}")[0] == 503
        time.sleep(1.0)
        redis.start()  # the same port and directory: the AOF brings every task back
        finished: dict[str, dict[str, Any]] = {}

        def all_done() -> bool:
            for task_id in ids:
                if task_id not in finished and (got := poll(service, task_id)).get("status") in FINISHED:
                    finished[task_id] = got
            return len(finished) == len(ids)

        wait_until(all_done, 30.0, "every task to finish after Redis restarted")
        assert {body["status"] for body in finished.values()} == {"succeeded"}, finished
        status, audio_headers, wav = http("GET", f"{service.url}/api/v1/tasks/{ids[0]}/audio",
                                          headers={"Range": "bytes=0-43"})
        assert status == 206 and wav[:4] == b"RIFF" and audio_headers["Content-Range"].startswith("bytes 0-43/")
        status, _, again = submit_task(service)  # submits work again, and so does a cancel
        assert status == 202
        status, _, raw = http("DELETE", f"{service.url}/api/v1/tasks/{again['task_id']}")
        assert status == 200 and json.loads(raw)["status"] == "cancelled"
        assert poll(service, again["task_id"])["status"] == "cancelled"
        assert http("GET", f"{service.url}/api/v1/tasks/{again['task_id']}/audio")[0] == 409
    finally:
        stop.set()
        if syncing.is_alive():
            syncing.join(30.0)
        service.stop()
    assert sync_statuses and set(sync_statuses) == {200}, sync_statuses


FINISHED = {"succeeded", "failed", "expired", "cancelled"}


def poll(service: Service, task_id: str) -> dict[str, Any]:
    """The task's status; {} while the sidecar answers 503 (Redis reconnecting)."""
    status, _, raw = http("GET", f"{service.url}/api/v1/tasks/{task_id}")
    return json.loads(raw) if status == 200 else {}
