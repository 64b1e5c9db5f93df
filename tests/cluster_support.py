"""A cluster of docs/scale-out.md with real processes, for tests: one redis-server
(tests/redis_server.py), two sidecars sharing their async tasks in it (each with two managed
emulator backends), and the outer nginx (config/nginx-outer.conf through bench.outer_nginx) in
front of both. Every process is stopped by its pid when the cluster's context ends.

nginx listens on plain HTTP here (tests/integration/test_outer_nginx.py covers its TLS) and its
per-address request limit is raised: every test client comes from 127.0.0.1, and the limit is not
what these tests measure. The tasks' records are read straight from Redis (``Cluster.records``)
to learn which sidecar holds a task: the ``holder`` field the claim script writes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis import Redis

from bench.outer_nginx import start_outer
from bench.procs import backend_pids, reap
from tests.contract_cases import multipart
from tests.redis_server import RedisServer
from tests.support import Service, backend_details, http, sidecar_config, start_sidecar, wait_until

__all__ = ["FINISHED", "KEYS", "SHORT", "Cluster", "Node", "auth", "cluster", "each", "live_in_groups", "poll",
           "submit", "sync_tts", "tenants_section", "wait_finished"]

SHORT = "今天天气很好，我们去公园散步。"
KEYS = {name: f"{name}-key-0123456789abcdef" for name in ("alpha", "beta", "gamma")}
FINISHED = {"succeeded", "failed", "expired", "cancelled"}
UNKNOWN_TASK = "0" * 32  # a well-formed id nobody has: 404 once the task store is open, 503 before


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def tenants_section(rates: dict[str, str] | None = None) -> str:
    """The `tenants` section for KEYS' tenants; ``rates``: a tenant's ``rate`` as YAML."""
    rates = rates or {}
    lines = [f"    - {{name: {name}, keys: [{key}]" + (f", rate: {rates[name]}" if name in rates else "") + "}\n"
             for name, key in KEYS.items()]
    return "tenants:\n  list:\n" + "".join(lines)


@dataclass
class Node:
    """One sidecar of the cluster: its replica name, its process, its backends' pids at start."""

    replica: str
    service: Service
    backends: list[int]

    @property
    def url(self) -> str:
        return self.service.url


@dataclass
class Cluster:
    name: str
    redis: RedisServer
    nodes: list[Node]
    nginx: Service

    @property
    def url(self) -> str:
        """The one address clients use: nginx."""
        return self.nginx.url

    def client(self) -> Redis:
        return Redis(host=self.redis.host, port=self.redis.port, db=0, decode_responses=True,
                           socket_timeout=5.0)

    def records(self, task_ids: Sequence[str], fields: Sequence[str] = ("state", "holder", "attempts")
                ) -> dict[str, dict[str, str | None]]:
        """Fields of each task's record in Redis (docs/tasks.md, "Keys"), read in one round trip."""
        with self.client() as client:
            pipe = client.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hmget(f"{{{self.name}}}:task:{task_id}", list(fields))
            answers = pipe.execute()
        return {task_id: dict(zip(fields, values, strict=True)) for task_id, values in zip(task_ids, answers,
                                                                                             strict=True)}

    def held_by(self, replica: str, task_ids: Sequence[str]) -> dict[str, dict[str, str | None]]:
        """The records of the tasks among ``task_ids`` that ``replica`` holds and that are not finished."""
        return {task_id: record for task_id, record in self.records(task_ids).items()
                if record["holder"] == replica and record["state"] not in FINISHED}


def _tasks_section(redis_url: str, name: str, replica: str, *, lease_s: float, claim_ahead: int,
                   tasks_extra: str) -> str:
    redis_options = (f"{{cluster: {name}, replica: {replica}, lease_s: {lease_s}, claim_ahead: {claim_ahead}, "
                     "connect_timeout_s: 0.5, reconnect_max_s: 0.5}")
    more = f", {tasks_extra}" if tasks_extra else ""
    return f"tasks: {{store: {json.dumps(redis_url)}, redis: {redis_options}{more}}}\n"


def _wait_serving(node: Node) -> None:
    """Until the sidecar is ready, with every backend, and its task store in Redis is open."""
    node.service.wait_http("/readyz", 60.0)
    wait_until(lambda: all(b["state"] == "ready" for b in backend_details(node.service)), 60.0,
               f"every backend of {node.replica} to be ready")
    wait_until(lambda: http("GET", f"{node.url}/api/v1/tasks/{UNKNOWN_TASK}")[0] == 404, 30.0,
               f"the task store of {node.replica} to open")


@contextlib.contextmanager
def cluster(tmp_path: Path, redis_server: RedisServer, *, name: str, time_scale: float = 0.01,
            claim_ahead: Sequence[int] = (2, 2), lease_s: float = 3.0, tasks_extra: str = "",
            tenants: str | None = None) -> Iterator[Cluster]:
    """Two sidecars (replicas ``<name>-a``, ``<name>-b``) on ``redis_server``, cluster ``name``,
    each with two emulator backends at ``time_scale``, and nginx in front; all stopped, by pid, at
    exit. ``claim_ahead``: each sidecar's ``tasks.redis.claim_ahead``; ``tasks_extra``: more keys
    of the ``tasks`` section (YAML flow style); ``tenants``: the section (default: KEYS' tenants)."""
    nodes: list[Node] = []
    started: list[Service] = []
    try:
        for i, ahead in enumerate(claim_ahead):
            replica = f"{name}-{'ab'[i]}"
            extra = _tasks_section(redis_server.url, name, replica, lease_s=lease_s, claim_ahead=ahead,
                                   tasks_extra=tasks_extra) + (tenants if tenants is not None else tenants_section())
            text, port = sidecar_config(backends=2, time_scale=time_scale, extra=extra)
            work = tmp_path / replica
            work.mkdir()
            service = start_sidecar(text, port, work, wait_ready=False)
            started.append(service)
            nodes.append(Node(replica, service, []))
        for node in nodes:
            _wait_serving(node)
            node.backends = backend_pids(node.service)
        nginx = start_outer(tmp_path / "nginx", [urlsplit(node.url).netloc for node in nodes],
                            rate_per_s=1000, burst=1000)
        started.append(nginx)
        yield Cluster(name, redis_server, nodes, nginx)
    finally:
        for service in reversed(started):
            service.stop()
        reap([pid for node in nodes for pid in node.backends])  # SIGKILL, by pid, any backend left


def live_in_groups(groups: Iterable[int]) -> list[int]:
    """Processes, zombies aside, in any of these process groups (from /proc): what is left of a
    process tree whose leaders started their own groups."""
    wanted, found = set(groups), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
        if int(pgrp) in wanted and state != "Z":
            found.append(int(stat.parent.name))
    return found


def submit(url: str, tenant: str, text: str = SHORT, *, headers: dict[str, str] | None = None
           ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST /api/v1/tasks at ``url`` (nginx or one sidecar) as ``tenant``."""
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    status, answer_headers, raw = http("POST", url + "/api/v1/tasks", body=body,
                                       headers={"Content-Type": content_type, **auth(tenant), **(headers or {})})
    return status, answer_headers, json.loads(raw)


def sync_tts(url: str, tenant: str, text: str = SHORT) -> tuple[int, dict[str, Any]]:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    status, _, raw = http("POST", url + "/api/v1/tts", body=body, headers={"Content-Type": content_type,
                                                                            **auth(tenant)})
    return status, json.loads(raw)


def poll(url: str, tenant: str, task_id: str) -> tuple[int, dict[str, Any]]:
    status, _, raw = http("GET", f"{url}/api/v1/tasks/{task_id}", headers=auth(tenant))
    return status, json.loads(raw)


def wait_finished(url: str | Callable[[int], str], owners: dict[str, str], *, timeout: float
                  ) -> dict[str, dict[str, Any]]:
    """Poll every task of ``owners`` (task id -> tenant) until each is finished; its last status.
    ``url``: where to poll, or a function of the round giving it (to alternate sidecars). A poll
    answered other than 200 (a sidecar waiting for Redis) counts as not finished yet."""
    finished: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    for round_ in itertools.count():
        pending = [task_id for task_id in owners if task_id not in finished]
        if not pending:
            return finished
        assert time.monotonic() < deadline, \
            f"{len(pending)} task(s) not finished after {timeout:g} s: {pending[:5]}"
        where = url(round_) if callable(url) else url
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(poll, [where] * len(pending), [owners[t] for t in pending], pending))
        for task_id, (status, body) in zip(pending, answers, strict=True):
            if status == 200 and body.get("status") in FINISHED:
                finished[task_id] = body
        time.sleep(0.05)
    raise AssertionError("unreachable")  # itertools.count never ends; mypy wants a return


def each(pool_size: int, calls: Iterable[Callable[[], Any]]) -> list[Any]:
    """Run the calls concurrently on ``pool_size`` threads; their results in order."""
    with ThreadPoolExecutor(pool_size) as pool:
        return list(pool.map(lambda call: call(), list(calls)))
