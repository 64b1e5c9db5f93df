"""The task store in Redis: one store shared by every sidecar of a cluster (``tasks.store: redis://...``).

Records are hashes, request bodies and WAVs strings, each with a TTL (an unfinished task's: its
deadline plus ``ttl_s``; a finished one's: ``ttl_s``), so nothing outlives its use even if no
sweep ever runs. Tasks to run wait in one Stream (the cluster's queue) read by a consumer group
named after the cluster, one consumer per replica. A replica takes a task only when it can start
it soon (scheduler.runtime.taskcluster decides), holds it by a lease it renews, and lets go of it
when it is final; a lapsed lease lets another replica take the task over. The scripts, the keys
and the rule of who holds a task: scheduler.runtime.taskstore.redis_scripts.

Every method is a coroutine; a Redis that cannot be reached, or refuses a write (out of memory
under noeviction), raises StoreError, and a broken connection is reported to the RedisLink.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scheduler.runtime.redislink import EvictingRedis, RedisLink
from scheduler.runtime.taskstore import redis_scripts as scripts
from scheduler.runtime.taskstore.model import (
    CALLBACK_STATES,
    Quota,
    QuotaExceeded,
    StoreError,
    Task,
    TaskState,
    request_digest,
)

__all__ = ["Claimed", "EvictionRefused", "RedisTaskStore", "Settled"]

_ID = re.compile(r"^[0-9a-f]{32}$")
_FLOATS = ("created_at", "updated_at", "started_at", "finished_at", "deadline_at")
_INTS = ("chars", "attempts", "body_bytes", "audio_bytes")
_TEXTS = ("idempotency_key", "callback_url", "reason", "callback_state", "request_sha256", "band")


class EvictionRefused(StoreError):
    """Redis may evict keys (its maxmemory-policy is not noeviction): the store refuses to open."""


@dataclass(frozen=True, kw_only=True)
class Claimed:
    """A task this replica now holds: its record and its queue entry (what it acknowledges)."""

    task: Task
    entry: str


@dataclass(frozen=True, kw_only=True)
class Settled:
    """What a final write came to: ``outcome`` "done" (stored), "finished" (it already was: a
    cancel came first), "lost" (another replica holds the task: this result is discarded) or
    "gone" (swept or deleted); ``task``: the record as it is now, when there is one."""

    outcome: str
    task: Task | None = None


class RedisTaskStore:
    """The cluster's tasks in Redis, as this replica (``replica``: its consumer name) sees them."""

    def __init__(self, link: RedisLink, *, cluster: str, replica: str, lease_s: float, ttl_s: float) -> None:
        self.link = link
        self.cluster = cluster
        self.replica = replica
        self.lease_s = lease_s
        self.ttl_s = ttl_s  # finished tasks' lifetime; a reload may change it
        self.prefix = "{" + cluster + "}:"  # one hash tag: every key in one slot, so scripts may touch any
        self.queue = self.prefix + "queue"
        client: Redis = link.client
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(getattr(scripts, name))
            for name in ("CREATE", "TAKE", "RECLAIM", "RENEW", "MARK_RUNNING", "REQUEUE", "FINISH", "CANCEL",
                         "RELEASE", "HAND_BACK", "DELETE", "SWEEP", "POSITION", "CALLBACKS_DUE", "SET_CALLBACK")
        }

    @property
    def lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    # --- opening ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Refuse a Redis that may evict (StoreError naming its policy), and make sure the queue
        and its consumer group exist (entries added before the group are delivered too)."""
        async with self._guard("cannot open the task store in Redis"):
            try:
                await self.link.check_noeviction()
            except EvictingRedis as exc:
                raise EvictionRefused(str(exc)) from None
            await self._ensure_group()

    async def _ensure_group(self) -> None:
        try:
            await self.link.client.xgroup_create(self.queue, self.cluster, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        """Nothing of its own to close: the connection is the RedisLink's."""

    # --- creation ----------------------------------------------------------------------------------

    async def create(self, *, tenant: str, body: bytes, content_type: str, chars: int, deadline_at: float,
                     now: float, idempotency_key: str | None = None, callback_url: str | None = None,
                     band: str | None = None, quota: Quota | None = None,
                     request_sha256: str | None = None) -> tuple[Task, bool]:
        """Store a new QUEUED task and put it in the cluster's queue, in one step; (task, created).
        A key this tenant already used returns that task and False, whatever the quota. Else
        QuotaExceeded when the tenant's stored tasks or bytes, counted over the cluster, would
        pass ``quota`` (``min_free_bytes`` does not apply: Redis refuses writes when full).
        ``request_sha256``: the request's digest when the caller computed it already."""
        task_id = uuid.uuid4().hex
        record: dict[str, Any] = {
            "id": task_id, "tenant": tenant, "state": TaskState.QUEUED.value, "created_at": now, "updated_at": now,
            "deadline_at": deadline_at, "idempotency_key": idempotency_key, "callback_url": callback_url,
            "content_type": content_type, "chars": chars, "attempts": 0,
            "request_sha256": request_sha256 or request_digest(content_type, body), "band": band,
            "body_bytes": len(body), "audio_bytes": 0,
        }
        pairs = [item for name, value in record.items() if value is not None for item in (name, _text(value))]
        live_ms = self._ms(deadline_at - now + self.ttl_s)
        args = [task_id, tenant, idempotency_key or "", body, live_ms,
                quota.max_tasks if quota else 0, quota.max_bytes if quota else 0, *pairs]
        async with self._guard("cannot persist task"):
            answer = await self._run("CREATE", args)
        kind = _str(answer[0])
        if kind == "existing":
            return _task(answer[1]), False
        if kind == "quota":
            limit, used = _str(answer[1]), int(answer[2])
            oldest = float(answer[3]) if answer[3] else None
            allowed = quota.max_tasks if limit == "tasks" else quota.max_bytes  # type: ignore[union-attr]
            raise QuotaExceeded(limit=limit, used=used, allowed=allowed, adding=1 if limit == "tasks" else len(body),
                                oldest_finished_at=oldest)
        return _task_from_fields(record), True

    # --- reading ---------------------------------------------------------------------------------

    async def get(self, task_id: str, *, tenant: str) -> Task | None:
        """The task, or None when it is unknown or another tenant owns it."""
        task = await self._get_any(task_id)
        return task if task is not None and task.tenant == tenant else None

    async def _get_any(self, task_id: str) -> Task | None:
        if not _ID.fullmatch(task_id):  # ids come from URLs: never let one name another key
            return None
        async with self._guard(f"cannot read task {task_id}"):
            fields = await _awaited(self.link.client.hgetall(self._key("task", task_id)))
        return _task(fields) if fields else None

    async def body(self, task_id: str) -> bytes:
        """The original request body of an unfinished task."""
        async with self._guard(f"cannot read the body of task {task_id}"):
            body = await self.link.client.get(self._key("body", _checked(task_id)))
        if body is None:
            raise StoreError(f"the body of task {task_id} is gone")
        return bytes(body)

    async def audio(self, task_id: str) -> bytes | None:
        """The WAV of a SUCCEEDED task; None for any other task."""
        task = await self._get_any(task_id)
        if task is None or task.state is not TaskState.SUCCEEDED:
            return None
        async with self._guard(f"cannot read the audio of task {task_id}"):
            wav = await self.link.client.get(self._key("wav", task_id))
        return None if wav is None else bytes(wav)

    async def find(self, tenant: str, idempotency_key: str) -> Task | None:
        """The tenant's task created with this Idempotency-Key, if not yet swept."""
        async with self._guard("cannot read tasks"):
            task_id = await self.link.client.get(f"{self.prefix}idem:{tenant}:{idempotency_key}")
        return None if task_id is None else await self.get(_str(task_id), tenant=tenant)

    async def usage(self, tenant: str) -> tuple[int, int]:
        """(stored tasks, stored bytes) of a tenant over the whole cluster: what its Quota counts."""
        async with self._guard("cannot read tasks"):
            sizes = await _awaited(self.link.client.hvals(f"{self.prefix}usage:{tenant}"))
        return len(sizes), sum(int(size) for size in sizes)

    async def counts(self) -> dict[str, int]:
        """Tasks by state, every state present (a scan of every record: for operators and tests)."""
        counts = {state.value: 0 for state in TaskState}
        async with self._guard("cannot count tasks"):
            async for name in self.link.client.scan_iter(match=self._key("task", "*"), count=500):
                state = await _awaited(self.link.client.hget(name, "state"))
                if state is not None:
                    counts[_str(state)] = counts.get(_str(state), 0) + 1
        return counts

    async def position(self, task_id: str) -> int | None:
        """Where a QUEUED task waits in the cluster's queue (1: next); 0 once a replica took it;
        None when it is not queued. Approximate: each replica's own scheduler orders what it took."""
        if not _ID.fullmatch(task_id):
            return None
        async with self._guard(f"cannot rank task {task_id}"):
            state, entry = await _awaited(self.link.client.hmget(self._key("task", task_id), ["state", "entry"]))
            if state is None or _str(state) != TaskState.QUEUED.value or entry is None:
                return None
            return int(await self._run("POSITION", [_str(entry)]))

    # --- the claim protocol ------------------------------------------------------------------

    async def next_claim(self, block_s: float) -> Claimed | None:
        """The next task nobody took yet, now held by this replica; None when none came within
        ``block_s`` (or the one that came was finished, or held by a live replica)."""
        async with self._guard("cannot read the task queue"):
            try:
                got = await self.link.client.xreadgroup(self.cluster, self.replica, {self.queue: ">"}, count=1,
                                                        block=max(1, round(block_s * 1000)))
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()  # Redis lost its data (no AOF): the queue starts afresh
                return None
            if not got:
                return None
            entry_id, fields = got[0][1][0]
            entry = _str(entry_id)
            task_id = fields.get(b"task")
            if task_id is None:
                await self._run("RELEASE", ["", entry])
                return None
            answer = await self._run("TAKE", [_str(task_id), entry, self.lease_ms, _text(self._now())])
        return Claimed(task=_task(answer[1]), entry=entry) if _str(answer[0]) == "taken" else None

    async def reclaim(self, count: int, now: float) -> list[Claimed]:
        """Take over up to ``count`` tasks whose holder stopped renewing (its lease lapsed and its
        entry went idle past the lease): XAUTOCLAIM, then the lease, as one step."""
        async with self._guard("cannot reclaim tasks"):
            taken = await self._run("RECLAIM", [self.lease_ms, max(1, count), self.lease_ms, _text(now)])
        return [Claimed(task=_task(fields), entry=_str(entry)) for entry, fields in taken]

    async def renew(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Renew this replica's leases: per task, its state while still held, "lost" when another
        replica holds it, "gone" when it no longer exists."""
        if not task_ids:
            return {}
        async with self._guard("cannot renew task leases"):
            states = await self._run("RENEW", [self.lease_ms, *task_ids])
        return {task_id: _str(state) for task_id, state in zip(task_ids, states, strict=True)}

    async def release(self, task_id: str, entry: str) -> None:
        """Let go of a held task (its entry and lease) without finishing it: it was cancelled."""
        async with self._guard(f"cannot release task {task_id}"):
            await self._run("RELEASE", [task_id, entry])

    async def hand_back(self, task_id: str, entry: str, now: float) -> bool:
        """Return a held, still queued task to the cluster's queue at once (this replica stops)."""
        async with self._guard(f"cannot hand task {task_id} back"):
            return bool(await self._run("HAND_BACK", [task_id, entry, _text(now)]))

    # --- transitions ---------------------------------------------------------------------------

    async def mark_running(self, task_id: str, now: float) -> Task | None:
        """QUEUED → RUNNING, one more attempt, if this replica holds it; None (no change) otherwise."""
        async with self._guard(f"cannot update task {task_id}"):
            fields = await self._run("MARK_RUNNING", [task_id, _text(now), self.lease_ms])
        return _task(fields) if fields else None

    async def requeue(self, task_id: str, now: float) -> None:
        """RUNNING → QUEUED."""
        async with self._guard(f"cannot update task {task_id}"):
            await self._run("REQUEUE", [task_id, _text(now)])

    async def succeed(self, task_id: str, *, wav: bytes, result: dict[str, Any], now: float) -> Settled:
        """Store the WAV and mark SUCCEEDED, acknowledging the queue entry and dropping the lease,
        if this replica still holds the task; else nothing is stored (see ``Settled``)."""
        return await self._finish(task_id, TaskState.SUCCEEDED, now, wav=wav, held=True,
                                  fields={"result": _dump(result), "reason": None})

    async def fail(self, task_id: str, *, state: TaskState, reason: str, result: dict[str, Any] | None,
                   now: float, held: bool = True) -> Settled:
        """Mark FAILED or EXPIRED (``held``: only if this replica holds it, then letting go of it)."""
        if state not in (TaskState.FAILED, TaskState.EXPIRED):
            raise ValueError(f"fail() takes FAILED or EXPIRED, not {state}")
        return await self._finish(task_id, state, now, wav=b"", held=held,
                                  fields={"reason": reason, "result": None if result is None else _dump(result)})

    async def _finish(self, task_id: str, state: TaskState, now: float, *, wav: bytes, held: bool,
                      fields: dict[str, str | None]) -> Settled:
        pairs = [item for name, value in fields.items() for item in (name, value or "")]
        async with self._guard(f"cannot finish task {task_id}"):
            answer = await self._run("FINISH", [task_id, _text(now), self._ms(self.ttl_s), self.lease_ms,
                                                state.value, wav, "1" if held else "0", *pairs])
        outcome = _str(answer[0])
        return Settled(outcome=outcome, task=_task(answer[1]) if len(answer) > 1 else None)

    async def cancel(self, task_id: str, *, tenant: str, now: float) -> tuple[Task | None, bool]:
        """QUEUED/RUNNING → CANCELLED, from any replica: (the task as it is now, whether this call
        cancelled it). A finished task is returned unchanged; (None, False) when unknown or
        another tenant's. The holder of a cancelled task lets go of it when it next renews."""
        if not _ID.fullmatch(task_id):
            return None, False
        async with self._guard(f"cannot cancel task {task_id}"):
            answer = await self._run("CANCEL", [task_id, tenant, _text(now), self._ms(self.ttl_s)])
        if _str(answer[0]) == "unknown":
            return None, False
        return _task(answer[1]), _str(answer[0]) == "cancelled"

    async def delete(self, task_id: str) -> bool:
        """Remove a task, its blobs, lease, key and queue entry, whatever its state."""
        async with self._guard(f"cannot delete task {task_id}"):
            return bool(await self._run("DELETE", [_checked(task_id)]))

    async def set_callback_state(self, task_id: str, state: str, now: float = 0.0) -> None:
        if state not in CALLBACK_STATES:
            raise ValueError(f"callback state must be one of {sorted(CALLBACK_STATES)}, not {state!r}")
        async with self._guard(f"cannot update task {task_id}"):
            await self._run("SET_CALLBACK", [task_id, state, _text(now or self._now())])

    async def callbacks_due(self, *, now: float, stale_s: float, limit: int = 100) -> list[Task]:
        """Finished tasks whose announcement was never finished and began more than ``stale_s``
        ago (its replica died): this replica's to announce now."""
        async with self._guard("cannot read callbacks"):
            ids = await self._run("CALLBACKS_DUE", [_text(now - stale_s), _text(now), limit])
        tasks = []
        for task_id in ids:
            task = await self._get_any(_str(task_id))
            if task is not None and task.finished and task.callback_url is not None:
                tasks.append(task)
        return tasks

    # --- housekeeping ------------------------------------------------------------------------

    async def sweep(self, *, now: float, ttl_s: float) -> int:
        """Delete tasks finished more than ``ttl_s`` ago, and stop counting those Redis already
        expired. Returns how many tasks went."""
        async with self._guard("cannot sweep tasks"):
            swept, expired = await self._run("SWEEP", [_text(now - ttl_s), 1000])
        return int(swept) + int(expired)

    def key(self, kind: str, task_id: str) -> str:
        """A task's key of ``kind`` (task, body, wav, lease): for operators and tests."""
        return self._key(kind, task_id)

    # --- internals ---------------------------------------------------------------------------

    def _key(self, kind: str, task_id: str) -> str:
        return f"{self.prefix}{kind}:{task_id}"

    def _ms(self, seconds: float) -> int:
        return max(1000, round(seconds * 1000))

    @staticmethod
    def _now() -> float:
        return time.time()

    async def _run(self, name: str, args: Sequence[Any]) -> Any:
        return await self._scripts[name](args=[self.prefix, self.cluster, self.replica, *args])

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Any Redis failure as StoreError saying ``what`` could not be done; a broken connection
        is also the link's to notice (it reconnects)."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.link.failed(exc)
            raise StoreError(f"{what}: Redis unreachable: {exc}") from exc
        except RedisError as exc:
            raise StoreError(f"{what}: {exc}") from exc


async def _awaited(result: Awaitable[Any] | Any) -> Any:
    """A redis.asyncio reply (its commands are typed for the synchronous client too)."""
    return await result


def _checked(task_id: str) -> str:
    if not _ID.fullmatch(task_id):
        raise StoreError(f"malformed task id {task_id!r}")
    return task_id


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _dump(result: dict[str, Any]) -> str:
    # The audio lives in its own key; never in the record.
    return json.dumps({k: v for k, v in result.items() if k != "audio_base64"}, separators=(",", ":"))


def _task(raw: Any) -> Task:
    """A record as Redis answers it (a flat list from a script, or a dict) as a Task."""
    items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    return _task_from_fields({_str(k): v.decode() if isinstance(v, bytes) else v for k, v in items})


def _task_from_fields(fields: dict[str, Any]) -> Task:
    try:
        values: dict[str, Any] = {name: None for name in _TEXTS}
        values.update({name: str(fields[name]) for name in _TEXTS if fields.get(name) not in (None, "")})
        values.update({name: float(fields[name]) if fields.get(name) not in (None, "") else None
                       for name in _FLOATS})
        values.update({name: int(fields.get(name) or 0) for name in _INTS})
        result = fields.get("result")
        return Task(id=str(fields["id"]), tenant=str(fields["tenant"]), state=TaskState(fields["state"]),
                    content_type=str(fields.get("content_type") or ""),
                    result=json.loads(result) if result not in (None, "") else None, **values)
    except (KeyError, TypeError, ValueError) as exc:  # not a record of ours, or damaged
        raise StoreError(f"corrupt task record {fields.get('id')!r}: {exc}") from exc
