"""Past one host, with real processes: a redis-server, two sidecars sharing their async tasks in
it (each with two emulator backends of its own) and the outer nginx in front of both
(tests/cluster_support.py). Each test has its own Redis and its own cluster name, and a lease of
3 s (the least allowed) so that a dead sidecar's tasks are taken over quickly.

- 100 tasks of 3 tenants submitted through nginx all finish, and both sidecars answer the same
  for each (status, timings, result, audio);
- ``kill -9`` of a sidecar holding 20 or more tasks, queued or running: each finishes on the other,
  and the dead sidecar's backends died with it;
- an Idempotency-Key used on one sidecar, then on the other, gives the same task;
- with Redis stopped, synchronous TTS goes on (200), submits answer 503; once it is back, every
  task accepted before finishes;
- a tenant spraying both sidecars at once gets no more than its cluster-wide bounds between them:
  ``tasks.max_per_tenant`` and its ``rate``.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bench.nginx import nginx_binary
from tests.cluster_support import (
    KEYS,
    SHORT,
    Cluster,
    auth,
    cluster,
    each,
    live_in_groups,
    poll,
    submit,
    sync_tts,
    tenants_section,
    wait_finished,
)
from tests.redis_server import REDIS_SERVER, RedisServer, redis_server
from tests.support import http, pid_gone, wait_until

pytestmark = [
    pytest.mark.slow,  # a Redis, two sidecars with two backends each and nginx, per test
    pytest.mark.xdist_group("serial"),  # nine processes at work: never beside other such tests
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed"),
    pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="redis-server is not installed"),
]

TENANTS = list(KEYS)


@pytest.fixture()
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def accepted_ids(answers: list[tuple[int, dict[str, str], dict[str, Any]]]) -> list[str]:
    statuses = [status for status, _, _ in answers]
    assert statuses == [202] * len(answers), [(s, body) for s, _, body in answers if s != 202][:3]
    return [body["task_id"] for _, _, body in answers]


def views(c: Cluster, tenant: str, task_id: str) -> list[dict[str, Any]]:
    """The task as each sidecar, asked on its own port, answers it."""
    answers = [poll(node.url, tenant, task_id) for node in c.nodes]
    assert [status for status, _ in answers] == [200] * len(c.nodes), answers
    return [body for _, body in answers]


def audio(url: str, tenant: str, task_id: str) -> bytes:
    status, _, wav = http("GET", f"{url}/api/v1/tasks/{task_id}/audio", headers=auth(tenant))
    assert status == 200 and wav[:4] == b"RIFF", (status, wav[:100])
    return wav


def test_100_tasks_of_3_tenants_through_nginx_all_finish_and_both_sidecars_agree(tmp_path: Path,
                                                                               redis: RedisServer) -> None:
    with cluster(tmp_path, redis, name="hundred") as c:
        owners = [TENANTS[i % 3] for i in range(100)]
        ids = accepted_ids(each(8, (partial(submit, c.url, owners[i], f"{SHORT}{i}") for i in range(100))))
        owner_of = dict(zip(ids, owners, strict=True))
        assert len(owner_of) == 100
        finished = wait_finished(c.url, owner_of, timeout=90.0)
        assert {body["status"] for body in finished.values()} == {"succeeded"}
        # Both sidecars ran tasks: the cluster's queue fed both.
        holders = {record["holder"] for record in c.records(ids).values()}
        assert holders == {node.replica for node in c.nodes}, holders
        for task_id, tenant in owner_of.items():
            first, second = views(c, tenant, task_id)
            assert first == second, (first, second)  # status, timings, attempts, result: one record
            assert first["status"] == "succeeded" and first["result"] and first["attempts"] == 1
        for task_id in ids[::10]:  # the audio too, byte for byte, from each sidecar
            tenant = owner_of[task_id]
            assert audio(c.nodes[0].url, tenant, task_id) == audio(c.nodes[1].url, tenant, task_id)
        # A task is its tenant's only, on every sidecar.
        other = TENANTS[(TENANTS.index(owners[0]) + 1) % 3]
        assert [poll(node.url, other, ids[0])[0] for node in c.nodes] == [404, 404]


def test_kill_9_of_a_sidecar_holding_20_tasks_and_the_other_finishes_them(tmp_path: Path,
                                                                            redis: RedisServer) -> None:
    """Which tasks the victim holds is read from Redis: each task's record names its holder (the
    claim script writes it, with the lease). The victim claims up to 30 tasks beyond its free
    slots (``claim_ahead``), the survivor none, so the victim takes most of 26 tasks submitted
    at once through nginx; each runs ~0.6 s, two at a time, so 20 or more still wait or run when
    it is killed. The record is read after the kill, so the tasks counted are exactly those it held
    when it died: nobody else may touch them until their lease lapses (3 s). Then each must finish
    on the survivor, which holds it now, in one more attempt than it had (a running one runs again)."""
    with cluster(tmp_path, redis, name="kill", time_scale=0.2, claim_ahead=(30, 0)) as c:
        victim, survivor = c.nodes
        ids = accepted_ids(each(8, (partial(submit, c.url, "alpha", f"{SHORT}{i}") for i in range(26))))
        wait_until(lambda: len(c.held_by(victim.replica, ids)) >= 22, 15.0, "the victim to hold 22 tasks")
        os.kill(victim.service.pid, signal.SIGKILL)  # the sidecar alone: its backends are in their own sessions
        assert victim.service.proc.wait(10) == -signal.SIGKILL
        held = c.held_by(victim.replica, ids)
        assert len(held) >= 20, held
        states = sorted(str(record["state"]) for record in held.values())
        # Its backends die with it (their parent-death signal): nothing of it is left, in its
        # process group or in theirs (each backend leads its own).
        assert len(victim.backends) == 2 and victim.service.pid not in victim.backends
        wait_until(lambda: all(pid_gone(pid) for pid in victim.backends), 10.0, "the victim's backends to exit")
        wait_until(lambda: not live_in_groups([victim.service.pid, *victim.backends]), 10.0,
                   "every process of the victim to exit")
        # Clients go on through nginx, which finds the dead sidecar's port refused: every task is
        # still there for its tenant, and a new one is accepted.
        assert all(poll(c.url, "alpha", task_id)[0] == 200 for task_id in held)
        late = accepted_ids([submit(c.url, "alpha", SHORT + "后来")])
        finished = wait_finished(c.url, dict.fromkeys([*ids, *late], "alpha"), timeout=90.0)
        assert {body["status"] for body in finished.values()} == {"succeeded"}, states
        after = c.records(list(held))
        for task_id, before in held.items():
            assert after[task_id]["holder"] == survivor.replica, (task_id, before, after[task_id])
            assert int(after[task_id]["attempts"] or 0) == int(before["attempts"] or 0) + 1, (before, after[task_id])
            assert audio(survivor.url, "alpha", task_id)[:4] == b"RIFF"


def test_an_idempotency_key_reused_on_the_other_sidecar_gives_the_same_task(tmp_path: Path,
                                                                             redis: RedisServer) -> None:
    with cluster(tmp_path, redis, name="idem") as c:
        one, two = c.nodes
        keyed = {"Idempotency-Key": "order-42"}
        status, _, first = submit(one.url, "alpha", headers=keyed)
        assert status == 202
        status, _, again = submit(two.url, "alpha", headers=keyed)  # a retry that reached the other replica
        assert status in (200, 202) and again["task_id"] == first["task_id"]
        status, _, through = submit(c.url, "alpha", headers=keyed)  # and one through nginx
        assert status in (200, 202) and through["task_id"] == first["task_id"]
        # The key is the tenant's: another tenant's same key is another task.
        status, _, others = submit(two.url, "beta", headers=keyed)
        assert status == 202 and others["task_id"] != first["task_id"]
        # The key is bound to its request on every replica: another text is refused, not answered.
        status, _, reused = submit(two.url, "alpha", SHORT + "另一个", headers=keyed)
        assert status == 422 and reused["reason"] == "idempotency_key_reused"
        assert first["task_id"] not in str(reused)
        done = wait_finished(two.url, {first["task_id"]: "alpha", others["task_id"]: "beta"}, timeout=30.0)
        assert {body["status"] for body in done.values()} == {"succeeded"}
        # Finished, the retry is answered 200 with the same task, on either sidecar.
        for node in c.nodes:
            status, _, late = submit(node.url, "alpha", headers=keyed)
            assert status == 200 and late["task_id"] == first["task_id"] and late["status"] == "succeeded"
        assert c.records([first["task_id"]])[first["task_id"]]["attempts"] == "1"  # it ran once


def test_with_redis_stopped_sync_tts_goes_on_and_submits_503_then_every_task_finishes(
        tmp_path: Path, redis: RedisServer) -> None:
    """Redis stays down past the lease (3 s): the tasks the sidecars hold lose their leases
    meanwhile and are taken again when it is back; nothing accepted before is lost."""
    down_s = 4.0
    with cluster(tmp_path, redis, name="outage", time_scale=0.2) as c:
        owners = {}
        for i in range(16):
            tenant = TENANTS[i % 3]
            status, _, body = submit(c.url, tenant, f"{SHORT}{i}")
            assert status == 202, body
            owners[body["task_id"]] = tenant
        wait_until(lambda: any(r["state"] == "running" for r in c.records(list(owners)).values()), 15.0,
                   "a task to run")
        unfinished = sum(r["state"] in ("queued", "running") for r in c.records(list(owners)).values())
        assert unfinished >= 8, unfinished
        some = next(iter(owners))
        redis.stop()
        stopped = time.monotonic()
        # Through nginx, to either sidecar: synchronous TTS never touches Redis; tasks need it.
        answers = each(4, (partial(sync_tts, c.url, "beta") for _ in range(6)))
        assert [status for status, _ in answers] == [200] * 6, answers
        assert all(base64.b64decode(body["audio_base64"])[:4] == b"RIFF" for _, body in answers)
        for node in c.nodes:
            status, headers, refused = submit(node.url, "gamma")
            assert status == 503 and refused["reason"] == "store_unavailable", refused
            assert int(headers["Retry-After"]) > 0
            assert poll(node.url, owners[some], some)[0] == 503
        status, _, refused = submit(c.url, "gamma")
        assert status == 503 and refused["reason"] == "store_unavailable"
        time.sleep(max(0.0, down_s - (time.monotonic() - stopped)))
        redis.start()  # the same port and directory: the append-only file brings every task back
        # Polled on each sidecar in turn, every task finishes.
        finished = wait_finished(lambda round_: c.nodes[round_ % 2].url, owners, timeout=90.0)
        assert {body["status"] for body in finished.values()} == {"succeeded"}, finished
        for task_id, tenant in owners.items():
            first, second = views(c, tenant, task_id)
            assert first == second
        assert submit(c.url, "gamma")[0] == 202  # and submits are accepted again


def test_a_tenants_cluster_wide_bounds_hold_when_it_sprays_both_sidecars(tmp_path: Path,
                                                                         redis: RedisServer) -> None:
    """``tasks.max_per_tenant`` 6: 40 submits of one tenant, 20 to each sidecar's own port at
    once, get exactly 6 tasks between them (each sidecar alone would allow 6). ``rate`` 4 at once
    and 0.2 a second: 24 synchronous requests to both sidecars at once get at most 4, plus what the
    rate refilled meanwhile (each sidecar alone would allow 4)."""
    per_s, burst, max_tasks = 0.2, 4, 6
    tenants = tenants_section({"gamma": f"{{per_s: {per_s}, burst: {burst}}}"})
    with cluster(tmp_path, redis, name="bounds", tasks_extra=f"max_per_tenant: {max_tasks}", tenants=tenants) as c:
        urls = [node.url for node in c.nodes]
        answers = each(16, (partial(submit, urls[i % 2], "alpha", f"{SHORT}{i}") for i in range(40)))
        accepted = [body["task_id"] for status, _, body in answers if status == 202]
        refused = [body for status, _, body in answers if status != 202]
        assert len(accepted) == max_tasks, [status for status, _, _ in answers]
        assert all(body["reason"] == "task_quota" and body["limit"] == "tasks.max_per_tenant" for body in refused)
        by_sidecar = [sum(status == 202 for status, _, _ in answers[i::2]) for i in range(2)]
        assert sum(by_sidecar) == max_tasks, by_sidecar
        with c.client() as client:
            assert client.hlen(f"{{{c.name}}}:usage:alpha") == max_tasks  # what Redis counts for it
        started = time.monotonic()
        rated = each(12, (partial(sync_tts, urls[i % 2], "gamma", f"{SHORT}{i}") for i in range(24)))
        elapsed = time.monotonic() - started
        ok = sum(status == 200 for status, _ in rated)
        assert all(body.get("reason") == "rate_limited" for status, body in rated if status != 200), rated
        assert 1 <= ok <= burst + int(per_s * elapsed), (ok, elapsed)
        # Another tenant is not held back by either bound.
        assert submit(urls[1], "beta")[0] == 202 and sync_tts(urls[0], "beta")[0] == 200
        done = wait_finished(urls[0], dict.fromkeys(accepted, "alpha"), timeout=30.0)
        assert {body["status"] for body in done.values()} == {"succeeded"}
        # Finished tasks count until swept: the bound still holds on either sidecar.
        assert [submit(url, "alpha")[2].get("reason") for url in urls] == ["task_quota"] * 2

