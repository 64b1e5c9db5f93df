"""Async tasks shared by every sidecar of a cluster through Redis (``tasks.store: redis://...``).

A submit stores the task and puts it in the cluster's queue (one step, in Redis) and answers 202;
nothing is admitted locally then. Each sidecar runs three loops: **claim** takes the next task
from the queue, with its lease, while this sidecar can start it soon (a free backend slot, or
fewer than ``tasks.redis.claim_ahead`` claimed tasks still waiting) and admits it to the local
dispatcher; **renew** renews its leases every third of ``lease_s`` and lets go of a task taken
over, deleted or cancelled meanwhile (a queued job leaves the local queue; a running one cannot
be stopped -- GLM-TTS cannot cancel -- and its result is stored only by the task's holder);
**reclaim** takes over the tasks of a sidecar that stopped renewing, once their lease lapsed.
Polls, fetches and cancels work from any sidecar; while Redis is down they answer 503 (synchronous
TTS never touches Redis), final results are retried until it is back, and a task nobody finished
is taken over after its lease: nothing accepted is lost. docs/tasks.md, "Tasks in Redis".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from backend.record import Backend
from glmtts.contract import parse_tts_form
from glmtts.errors import GLMTTSError
from glmtts.form import parse_form
from glmtts.loop import wait_for
from scheduler.config import TasksConfig
from scheduler.core.queue import Job
from scheduler.errors import DeadlineExpired, NoAudio, SidecarError, UnknownTask
from scheduler.runtime.callbacks import deliver
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import Exchange, Intake, Outcome
from scheduler.runtime.redislink import RedisLink
from scheduler.runtime.taskresults import (
    TaskResult,
    callback_stale_s,
    cluster_estimates,
    describe,
    over_quota,
    queue_estimates,
    read_task_answer,
    replayed,
    task_job,
    unavailable,
)
from scheduler.runtime.taskstore import Quota, QuotaExceeded, StoreError, Task, TaskState, request_digest
from scheduler.runtime.taskstore.redis_store import Claimed, EvictionRefused, RedisTaskStore, Settled

__all__ = ["ClusterTasks", "replica_name"]

log = logging.getLogger("glmtts_sidecar.tasks")

CLAIM_BLOCK_S = 1.0  # the longest a read of the queue waits for a task
CAPACITY_POLL_S = 0.25  # with no room to claim, how often room is looked for again
RETRY_MAX_S = 5.0  # the longest wait between attempts to write a final result
HAND_BACK_S = 2.0  # at close, the most time spent returning queued tasks to the cluster's queue
T = TypeVar("T")


def replica_name(config: TasksConfig, port: int) -> str:
    """``tasks.redis.replica``, else ``<host name>-<listen port>``: this sidecar's consumer name."""
    return config.redis.replica or f"{socket.gethostname()}-{port}"


@dataclass(kw_only=True)
class Held:
    """A task this sidecar holds: its queue entry, local job and work, and its lease's last renewal."""

    entry: str
    job: Job
    work: asyncio.Task[None]
    renewed: float  # monotonic
    started: bool = False  # given a backend slot
    settling: bool = False  # its answer is in: only its final write is left


class ClusterTasks:
    """The Redis side of scheduler.runtime.tasks.TaskService: its store, loops and answers."""

    def __init__(self, runtime: Runtime, exchange: Exchange, config: TasksConfig, link: RedisLink, *,
                 wall: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.exchange = exchange
        self.config = config
        self.link = link
        self.wall = wall
        self.replica = replica_name(config, runtime.config.listen.port)
        self.store: RedisTaskStore | None = None  # once opened (Redis reached, noeviction checked)
        self._held: dict[str, Held] = {}
        self._room = asyncio.Event()  # a held task started or ended: there may be room to claim
        self._background: set[asyncio.Task[Any]] = set()

    def reconfigure(self, config: TasksConfig) -> None:
        self.config = config
        if self.store is not None:
            self.store.ttl_s = config.ttl_s

    # --- lifetime -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store in the background: Redis may be down now and come up later."""
        self._spawn(self._open())

    async def _open(self) -> None:
        redis = self.config.redis
        store = RedisTaskStore(self.link, cluster=redis.cluster, replica=self.replica, lease_s=redis.lease_s,
                               ttl_s=self.config.ttl_s)
        delay = 0.1
        while True:
            await self.link.wait_up()
            try:
                await store.open()
                break
            except EvictionRefused as exc:  # the sidecar still serves synchronous requests; submits get 503
                log.error("async tasks unavailable: %s", exc)
                return
            except StoreError as exc:
                log.error("cannot open the task store in Redis: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, redis.reconnect_max_s)
        self.store = store
        log.info("async tasks shared in Redis: cluster %r, replica %r", redis.cluster, self.replica)
        for loop in (self._claim_loop, self._renew_loop, self._reclaim_loop, self._sweeper):
            self._spawn(loop(store))

    async def close(self) -> None:
        """Return the queued tasks this sidecar holds to the cluster's queue, then stop every loop;
        a task running now is left to its lease (another replica takes it once that lapses)."""
        waiting = [(task_id, held) for task_id, held in self._held.items() if not held.started and not held.settling]
        for _, held in waiting:
            held.work.cancel()
        if self.store is not None and waiting and self.link.up:
            with contextlib.suppress(asyncio.TimeoutError, StoreError):
                await wait_for(asyncio.gather(*(self.store.hand_back(task_id, held.entry, self.wall())
                                                for task_id, held in waiting)), HAND_BACK_S)
        works = [held.work for held in self._held.values()]
        background = list(self._background)
        for work in (*works, *background):
            work.cancel()
        await asyncio.gather(*works, *background, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def require(self) -> RedisTaskStore:
        """The open store while Redis answers, or StoreUnavailable (503, Retry-After)."""
        if self.store is None:
            raise unavailable("the task store in Redis is not open (see the log)")
        if not self.link.up:
            raise unavailable("Redis does not answer")
        return self.store

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        """A store call answered to a client: a failure is StoreUnavailable (503), logged."""
        try:
            return await call
        except StoreError as exc:
            log.error("%s: %s", what, exc)
            raise unavailable(str(exc)) from None

    # --- submitting ---------------------------------------------------------------------------

    async def accept(self, intake: Intake, key: str | None, callback: str | None) -> tuple[Task, int]:
        """Store the task and queue it in the cluster: (task, 202), or (the task an earlier submit
        with the same Idempotency-Key made, 200 once it left the queue); or the refusal."""
        store = self.require()
        job = intake.job
        # Hashed off the event loop (a body may be megabytes).
        digest = await asyncio.to_thread(request_digest, intake.content_type, intake.body)
        now = self.wall()
        creating = asyncio.ensure_future(store.create(
            tenant=job.tenant, body=intake.body, content_type=intake.content_type, chars=job.chars,
            deadline_at=now + (job.deadline_at - job.arrived_at), now=now, idempotency_key=key,
            callback_url=callback, band=self.runtime.tenants.band_names[job.band], request_sha256=digest,
            quota=Quota(max_tasks=self.config.max_per_tenant, max_bytes=self.config.max_bytes_per_tenant,
                        min_free_bytes=0)))
        try:
            # Shielded: a client leaving cancels this wait, not the write, which may still store the task.
            task, created = await asyncio.shield(creating)
        except asyncio.CancelledError:
            self._spawn(self._withdraw(store, creating))
            raise
        except QuotaExceeded as exc:
            raise over_quota(job.tenant, exc, self.config, now=self.wall()) from None
        except StoreError as exc:
            log.error("cannot persist a task: %s", exc)
            raise unavailable(str(exc)) from None
        if not created:
            return replayed(task, key or "", digest)
        return task, 202

    async def _withdraw(self, store: RedisTaskStore, creating: asyncio.Future[tuple[Task, bool]]) -> None:
        """Remove a task stored for a client that left before it was told of it."""
        try:
            task, created = await creating
        except Exception:  # nothing was stored
            return
        if created:
            with contextlib.suppress(StoreError):
                await store.delete(task.id)

    async def accepted(self, task: Task, job: Job) -> dict[str, Any]:
        """What a submit answers: the task's id and status, its place in the cluster's queue and
        this sidecar's estimate of its start and end."""
        body: dict[str, Any] = {"task_id": task.id, "status": task.state.value}
        if task.state is TaskState.QUEUED:
            position = await self._call(f"cannot rank task {task.id}", self.require().position(task.id))
            body.update(cluster_estimates(self.runtime.scheduler, self.runtime.dispatcher, job, position, self.wall))
        return body

    # --- GET / DELETE -------------------------------------------------------------------------

    async def owned(self, tenant: str, task_id: str) -> Task:
        task = await self._call(f"cannot read task {task_id}", self.require().get(task_id, tenant=tenant))
        if task is None:
            raise UnknownTask(f"Task '{task_id}' not found")
        return task

    async def describe(self, task: Task) -> dict[str, Any]:
        """A task as GET /api/v1/tasks/{id} answers it: estimates from this sidecar's scheduler
        when it holds the task, else its place in the cluster's queue."""
        held = self._held.get(task.id)
        estimates: dict[str, Any] = {}
        if task.state is TaskState.QUEUED:
            if held is not None and not held.started:
                estimates = queue_estimates(self.runtime.scheduler, self.runtime.dispatcher, held.job, self.wall)
            else:
                position = await self._call(f"cannot rank task {task.id}", self.require().position(task.id))
                estimates = {"position": position} if position is not None else {}
        return describe(task, estimates)

    async def audio(self, task: Task) -> bytes:
        """The WAV of a succeeded task; NoAudio (409) otherwise."""
        wav = await self._call(f"cannot read task {task.id}", self.require().audio(task.id))
        if wav is None:
            raise NoAudio(f"Task '{task.id}' has no audio (status {task.state.value})", status=task.state.value)
        return wav

    async def cancel(self, task: Task) -> Task:
        """Cancel the task wherever it is: the task as it is now (a finished one is unchanged).
        Held here, it is let go now; held elsewhere, its holder lets go of it when it next renews."""
        store = self.require()
        updated, cancelled = await self._call(f"cannot cancel task {task.id}",
                                              store.cancel(task.id, tenant=task.tenant, now=self.wall()))
        if updated is None:
            raise UnknownTask(f"Task '{task.id}' not found")
        if cancelled:
            self._let_go(store, task.id, release=True, why="cancelled")
            self._spawn(self._announce(store, updated))
        return updated

    # --- claiming -------------------------------------------------------------------------------

    def _room_to_claim(self) -> int:
        """How many more tasks this sidecar could start soon: its free backend slots beyond what
        its queue already waits for, or its claim-ahead allowance left; 0 with no backend ready."""
        ready = self.runtime.ready_backends()
        if not ready:
            return 0
        dispatcher = self.runtime.dispatcher
        free = sum(max(0, dispatcher.limit(b).limit - b.in_flight) for b in ready) - len(self.runtime.scheduler.queue)
        waiting = sum(1 for held in self._held.values() if not held.started and not held.settling)
        return max(free, self.config.redis.claim_ahead - waiting, 0)

    async def _wait_for_room(self) -> None:
        self._room.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(self._room.wait(), CAPACITY_POLL_S)

    async def _claim_loop(self, store: RedisTaskStore) -> None:
        while True:
            if not self.link.up:
                await self.link.wait_up()
                continue
            if self._room_to_claim() <= 0:
                await self._wait_for_room()
                continue
            try:
                claimed = await store.next_claim(CLAIM_BLOCK_S)
            except StoreError as exc:
                log.warning("cannot read the cluster's task queue: %s", exc)
                await asyncio.sleep(CAPACITY_POLL_S)
                continue
            if claimed is not None:
                await self._admit(store, claimed)

    async def _reclaim_loop(self, store: RedisTaskStore) -> None:
        """Take over tasks whose holder died, once their lease lapsed (checked every third of it)."""
        while True:
            await asyncio.sleep(store.lease_s / 3)
            room = self._room_to_claim()
            if room <= 0 or not self.link.up:
                continue
            try:
                claimed = await store.reclaim(room, self.wall())
            except StoreError as exc:
                log.warning("cannot reclaim tasks: %s", exc)
                continue
            for one in claimed:
                log.info("task %s taken over from a replica that stopped renewing its lease", one.task.id)
                await self._admit(store, one)

    async def _admit(self, store: RedisTaskStore, claimed: Claimed) -> None:
        """Run a task just claimed: admitted to the local dispatcher, whatever its bounds."""
        task = claimed.task
        left = task.deadline_at - self.wall()
        if left <= 0:
            settled = await self._settle(task.id, lambda: store.fail(
                task.id, state=TaskState.EXPIRED, reason="the deadline passed before a sidecar could start it",
                result=None, now=self.wall()))
            self._finished(store, task.id, settled)
            return
        try:
            body = await store.body(task.id)
            tts = parse_tts_form(parse_form(task.content_type, body))
        except GLMTTSError as exc:  # cannot happen for a stored, validated body; never lose it silently
            unreadable = f"stored request unreadable: {exc}"
            settled = await self._settle(task.id, lambda: store.fail(
                task.id, state=TaskState.FAILED, reason=unreadable, result=None, now=self.wall()))
            self._finished(store, task.id, settled)
            return
        except StoreError as exc:  # its lease lapses and it is taken again
            log.error("task %s: cannot read its body: %s", task.id, exc)
            return
        job = task_job(self.runtime.scheduler, self.runtime.tenants, task, tts, now=self.runtime.dispatcher.clock(),
                       budget_s=left)
        future = self.exchange.admit(job, force=True)
        headers = {"Content-Type": task.content_type, "X-Request-ID": f"task-{task.id}"}
        work = asyncio.ensure_future(self._execute(store, task, job, future, body, headers))
        held = Held(entry=claimed.entry, job=job, work=work, renewed=time.monotonic())
        self._held[task.id] = held
        future.add_done_callback(lambda f: self._started(store, task.id, f))
        work.add_done_callback(lambda _: self._drop(task.id, held))

    def _drop(self, task_id: str, held: Held) -> None:
        if self._held.get(task_id) is held:
            del self._held[task_id]
        self._room.set()

    def _started(self, store: RedisTaskStore, task_id: str, future: asyncio.Future[Backend]) -> None:
        held = self._held.get(task_id)
        if held is None or future.cancelled() or future.exception() is not None:
            return
        held.started = True
        self._room.set()
        self._spawn(self._quietly(f"task {task_id}: cannot mark it running", store.mark_running(task_id, self.wall())))

    async def _quietly(self, what: str, call: Awaitable[Any]) -> None:
        try:
            await call
        except StoreError as exc:
            log.error("%s: %s", what, exc)

    # --- running and finishing ------------------------------------------------------------------

    async def _execute(self, store: RedisTaskStore, task: Task, job: Job, future: asyncio.Future[Backend],
                       body: bytes, headers: dict[str, str]) -> None:
        """Run the task to its outcome and store it (see TaskService._execute: cancelled at any
        point, the exchange gives back whatever it took)."""
        record = Outcome(request_id=f"task-{task.id}")
        finish: Callable[[], Awaitable[Settled]]
        try:
            answered = await self.exchange.forward(job, future, body, headers, record)
        except DeadlineExpired as exc:
            expired = exc.detail
            finish = lambda: store.fail(task.id, state=TaskState.EXPIRED, reason=expired,  # noqa: E731
                                        result=None, now=self.wall())
        except SidecarError as exc:
            reason = f"{exc.reason}: {exc.detail}"
            finish = lambda: store.fail(task.id, state=TaskState.FAILED, reason=reason,  # noqa: E731
                                        result=None, now=self.wall())
        else:
            status, answer = await read_task_answer(answered)
            finish = self._outcome(store, task.id, status, answer)
        held = self._held.get(task.id)
        if held is not None:
            held.settling = True
        self._finished(store, task.id, await self._settle(task.id, finish))

    def _outcome(self, store: RedisTaskStore, task_id: str, status: int,
                 answer: TaskResult) -> Callable[[], Awaitable[Settled]]:
        wav = answer.wav
        if wav is not None:
            return lambda: store.succeed(task_id, wav=wav, result=answer.meta, now=self.wall())
        meta = answer.meta
        detail = meta.get("error") or meta.get("detail") or f"HTTP {status}"
        return lambda: store.fail(task_id, state=TaskState.FAILED, reason=f"backend answered {status}: {detail}",
                                  result=meta or None, now=self.wall())

    async def _settle(self, task_id: str, finish: Callable[[], Awaitable[Settled]]) -> Settled:
        """Write a final state, again and again while Redis cannot be reached (0.1 s, doubling up to
        5 s, between attempts): a result is never dropped for want of Redis."""
        delay = 0.1
        while True:
            try:
                return await finish()
            except StoreError as exc:
                log.warning("task %s: cannot store its outcome yet: %s", task_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            await self.link.wait_up()

    def _finished(self, store: RedisTaskStore, task_id: str, settled: Settled) -> None:
        if settled.outcome == "lost":
            log.warning("task %s: another sidecar took it over; this sidecar's result is discarded", task_id)
        if settled.outcome == "done" and settled.task is not None:
            self._spawn(self._announce(store, settled.task))

    # --- leases ---------------------------------------------------------------------------------

    async def _renew_loop(self, store: RedisTaskStore) -> None:
        while True:
            await asyncio.sleep(store.lease_s / 3)
            held = [task_id for task_id, one in self._held.items() if not one.settling]
            if not held:
                continue
            try:
                states = await store.renew(held)
            except StoreError as exc:
                log.warning("cannot renew task leases: %s", exc)
                self._lapse(store)
                continue
            now = time.monotonic()
            for task_id, state in states.items():
                one = self._held.get(task_id)
                if one is None or one.settling:
                    continue
                if state in ("lost", "gone"):
                    self._let_go(store, task_id, release=False, why=f"{state} (taken over, or deleted)")
                elif state not in (TaskState.QUEUED.value, TaskState.RUNNING.value):
                    self._let_go(store, task_id, release=True, why=state)
                else:
                    one.renewed = now

    def _lapse(self, store: RedisTaskStore) -> None:
        """Redis cannot be reached: a queued task whose lease has lapsed meanwhile may be taken by
        another sidecar, so it leaves the local queue (a running one goes on; its result is stored
        only if no other sidecar took the task over)."""
        now = time.monotonic()
        for task_id, held in list(self._held.items()):
            if not held.started and not held.settling and now - held.renewed > store.lease_s:
                self._let_go(store, task_id, release=False, why="its lease lapsed while Redis was unreachable")

    def _let_go(self, store: RedisTaskStore, task_id: str, *, release: bool, why: str) -> None:
        """Stop holding a task: its queued job leaves the local queue, a running one finishes on its
        backend unused. ``release``: the task is finished (cancelled): let go of its entry too."""
        held = self._held.pop(task_id, None)
        if held is None or held.settling:
            return
        log.info("task %s let go: %s", task_id, why)
        held.work.cancel()
        self._room.set()
        if release:
            self._spawn(self._quietly(f"task {task_id}: cannot release it", store.release(task_id, held.entry)))

    # --- housekeeping -------------------------------------------------------------------------

    async def _sweeper(self, store: RedisTaskStore) -> None:
        """Every ``sweep_interval_s``: remove expired tasks, and announce the callbacks a sidecar
        that died left unfinished."""
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                removed = await store.sweep(now=self.wall(), ttl_s=self.config.ttl_s)
                due = await store.callbacks_due(now=self.wall(), stale_s=callback_stale_s(self.config))
            except StoreError as exc:
                log.error("sweeping expired tasks failed: %s", exc)
                continue
            if removed:
                log.info("swept %d expired task(s)", removed)
            for task in due:
                self._spawn(self._announce(store, task))

    async def _announce(self, store: RedisTaskStore, task: Task) -> None:
        """POST the finished task to its callback URL; its ``callback`` state says how it went."""
        if task.callback_url is None:
            return
        try:
            await store.set_callback_state(task.id, "pending", self.wall())
            delivered = await deliver(self.config.callbacks, task.callback_url, describe(task, {}),
                                      label=f"task {task.id}")
            await store.set_callback_state(task.id, "delivered" if delivered else "failed", self.wall())
        except StoreError as exc:  # announced again by a sidecar's sweep once its start is stale
            log.error("task %s: cannot record its callback: %s", task.id, exc)
