"""The async task mode: submit a TTS request, get 202 and a task id, poll, fetch the WAV, cancel.

A task goes through the same validation, attribution, admission, fair queueing and dispatch as a
synchronous request, under its own, longer deadline (``tasks.deadline_s``). It is persisted
(scheduler.runtime.taskstore: SQLite, request body and audio as files) before the 202 goes out, so a
sidecar that is killed and restarted re-queues every task still queued or running (in its
priority band) and resumes the callbacks it had not finished: nothing accepted is lost. Only the
tenant that created a task can see, fetch or cancel it (404 to others). Its attempts with backends
go through scheduler.runtime.exchange, as a synchronous request's do; its HTTP endpoints are
scheduler.http.tasks.

With ``tasks.store`` a Redis URL, every sidecar of a cluster shares the tasks instead
(scheduler.runtime.taskcluster): a submit is stored and queued in Redis, and whichever sidecar can
start it soon claims it; the methods below hand over to it.

A submit is stored first and admitted second: whatever ends the request early (a store error, the
client leaving while the body is written, admission refusing it) leaves neither a queued job nobody
awaits nor a stored task nobody runs. Each tenant's stored tasks and bytes are capped (429), and no
task is taken when the store's disk runs low (503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from backend.record import Backend
from glmtts.contract import parse_tts_form
from glmtts.errors import GLMTTSError
from glmtts.form import parse_form
from scheduler.config import TasksConfig
from scheduler.core.queue import Job
from scheduler.errors import (
    DeadlineExpired,
    DiskSpaceLow,
    NoAudio,
    SidecarError,
    UnknownTask,
)
from scheduler.runtime.callbacks import deliver
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import Exchange, Intake, Outcome
from scheduler.runtime.redislink import RedisLink
from scheduler.runtime.taskcluster import ClusterTasks
from scheduler.runtime.taskresults import (
    IDEMPOTENCY_KEY,
    TaskResult,
    describe,
    over_quota,
    queue_estimates,
    read_task_answer,
    replayed,
    task_job,
    unavailable,
)
from scheduler.runtime.taskstore import (
    DiskLow,
    Quota,
    QuotaExceeded,
    StoreError,
    Task,
    TaskState,
    TaskStore,
    request_digest,
)

log = logging.getLogger("glmtts_sidecar.tasks")

__all__ = ["IDEMPOTENCY_KEY", "REQUEST_ID", "Runner", "TaskService"]

REQUEST_ID = "X-Request-ID"

T = TypeVar("T")


@dataclass(frozen=True)
class Runner:
    """What runs one admitted task: cancelling ``work`` gives back its queue place or slot."""

    work: asyncio.Task[None]
    job: Job


class TaskService:
    """The tasks of one sidecar. ``config`` is read where it is used: ``reconfigure`` makes later
    work follow a new ``tasks`` section (the store's directory is the one opened at start).
    ``redis``: the link to the cluster's Redis when ``tasks.store`` names one (``cluster`` then
    keeps the tasks, and ``store`` stays None)."""

    def __init__(self, runtime: Runtime, exchange: Exchange, config: TasksConfig, *,
                 wall: Callable[[], float] = time.time, redis: RedisLink | None = None) -> None:
        self.runtime = runtime
        self.exchange = exchange
        self.config = config
        self.wall = wall  # task times are wall-clock (they outlive the process)
        self.store: TaskStore | None = None
        self._runners: dict[str, Runner] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Removals of tasks stored for a client that was never told of them; awaited, not cancelled, at close.
        self._withdrawals: set[asyncio.Task[None]] = set()
        # (tenant, Idempotency-Key) of submits being stored or removed: a retry waits for the outcome.
        self._claims: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self.cluster = ClusterTasks(runtime, exchange, config, redis, wall=wall) if redis is not None else None

    def reconfigure(self, config: TasksConfig) -> None:
        """A reload: quotas, deadlines, TTL, sweeping and callbacks follow ``config`` from now on."""
        self.config = config
        if self.cluster is not None:
            self.cluster.reconfigure(config)

    # --- lifetime -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and re-queue what a previous run left queued or running."""
        if self.cluster is not None:  # the cluster's queue keeps what is unfinished
            await self.cluster.start()
            return
        directory = self.config.directory()
        try:
            self.store = await asyncio.to_thread(TaskStore, directory)
        except StoreError as exc:  # the sidecar still serves synchronous requests; submits get 503
            log.error("async tasks unavailable: cannot open the task store in %s: %s", directory, exc)
            return
        log.info("async tasks stored in %s", directory)
        try:
            unfinished = await asyncio.to_thread(self.store.unfinished)
            announcing = await asyncio.to_thread(self.store.callbacks_due)
        except StoreError as exc:
            log.error("cannot read the tasks a previous run left: %s", exc)
            unfinished, announcing = [], []
        for task in unfinished:
            try:
                await self._recover(task)
            except StoreError as exc:  # it stays stored: the next start tries again
                log.error("task %s cannot be re-queued: %s", task.id, exc)
        for task in announcing:  # finished, but its callback was never delivered or given up on
            self._spawn(self._announce(task))
        self._spawn(self._sweeper())

    async def close(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
        runners = [runner.work for runner in self._runners.values()]
        background = list(self._background)
        for work in (*runners, *background):
            work.cancel()
        await asyncio.gather(*runners, *background, return_exceptions=True)
        await asyncio.gather(*self._withdrawals, return_exceptions=True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                removed = await asyncio.to_thread(self._require().sweep, now=self.wall(), ttl_s=self.config.ttl_s)
            except StoreError as exc:
                log.error("sweeping expired tasks failed: %s", exc)
                continue
            if removed:
                log.info("swept %d expired task(s)", removed)

    def _require(self) -> TaskStore:
        if self.store is None:
            raise StoreError("the task store is not open")
        return self.store

    async def _call(self, what: str, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store call off the event loop; any failure is StoreUnavailable (503), logged."""
        try:
            return await asyncio.to_thread(method, *args, **kwargs)
        except StoreError as exc:
            log.error("%s: %s", what, exc)
            raise unavailable(str(exc)) from None
        except Exception as exc:
            log.exception("%s", what)
            raise unavailable(f"{exc.__class__.__name__}: {exc}") from None

    def _quota(self) -> Quota:
        return Quota(max_tasks=self.config.max_per_tenant, max_bytes=self.config.max_bytes_per_tenant,
                     min_free_bytes=self.config.min_free_bytes)

    # --- submitting (POST /api/v1/tasks, and Prefer: respond-async) --------------------------------

    def require_open(self) -> None:
        """StoreUnavailable (503) unless tasks can be stored now."""
        if self.cluster is not None:
            self.cluster.require()
        else:
            self.require_store()

    def require_store(self) -> TaskStore:
        """The open store, or StoreUnavailable (503) when it could not be opened at start."""
        if self.store is None:
            raise unavailable("the task store could not be opened (see the log)")
        return self.store

    async def accept(self, intake: Intake, key: str | None, callback: str | None) -> tuple[Task, int]:
        """Store and admit a validated request as a task: (the task, 202), or (the task an
        earlier submit with the same Idempotency-Key made, 200 once it left the queue); or the
        SidecarError that refuses it."""
        if self.cluster is not None:
            return await self.cluster.accept(intake, key, callback)
        if key is None:
            return await self._store_and_admit(intake, key, callback, "")
        # What the key is bound to; hashed off the event loop (a body may be megabytes).
        digest = await asyncio.to_thread(request_digest, intake.content_type, intake.body)
        # One submit per key at a time: a retry that comes while the first is being stored waits for
        # its outcome (accepted, or removed again because its client left), so that it is never
        # told of a task about to be removed.
        claim = (intake.job.tenant, key)
        while (earlier := self._claims.get(claim)) is not None:
            await asyncio.wait([earlier])
        held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._claims[claim] = held
        try:
            # A retry of a stored task is answered before any admission or quota.
            existing = await self._call("cannot look up an Idempotency-Key", self._require().find, claim[0], key)
            if existing is not None:
                return self._replay(existing, key, digest)
            return await self._store_and_admit(intake, key, callback, digest)
        finally:
            held.set_result(None)
            if self._claims.get(claim) is held:  # else a removal holds the key until it is done
                del self._claims[claim]

    async def _store_and_admit(self, intake: Intake, key: str | None, callback: str | None,
                               digest: str) -> tuple[Task, int]:
        """Store the task, then admit its job: a refusal, or the client leaving meanwhile, removes
        the stored task again; nothing is admitted that is not stored. ``digest``: the request's,
        when it has an Idempotency-Key."""
        store = self._require()
        job = intake.job
        claim = None if key is None else (job.tenant, key)
        now = self.wall()
        creating = asyncio.ensure_future(asyncio.to_thread(
            store.create, tenant=job.tenant, body=intake.body, content_type=intake.content_type, chars=job.chars,
            deadline_at=now + (job.deadline_at - job.arrived_at), now=now, idempotency_key=key,
            callback_url=callback, band=self.runtime.tenants.band_names[job.band], quota=self._quota()))
        try:
            # Shielded: a client leaving cancels this wait, not the thread, which may still store the task.
            task, created = await asyncio.shield(creating)
        except asyncio.CancelledError:
            self._withdraw(creating, claim)
            raise
        except QuotaExceeded as exc:
            raise over_quota(job.tenant, exc, self.config, now=self.wall()) from None
        except DiskLow as exc:
            raise DiskSpaceLow(f"The task store's filesystem has {exc.free} bytes free; a new task needs {exc.needed} "
                               "(its body plus tasks.min_free_bytes)", retry_after=self.config.sweep_interval_s,
                               limit="tasks.min_free_bytes") from None
        except StoreError as exc:
            log.error("cannot persist a task: %s", exc)
            raise unavailable(str(exc)) from None
        except Exception as exc:
            log.exception("cannot persist a task")
            raise unavailable(f"{exc.__class__.__name__}: {exc}") from None
        if not created:  # a concurrent submit with the same key stored it first
            return self._replay(task, key or "", digest)
        try:
            future = self.exchange.admit(job)
        except SidecarError:
            await asyncio.shield(self._withdraw(creating, claim))
            raise
        self._run(task, job, future, intake)
        return task, 202

    def _replay(self, task: Task, key: str, digest: str) -> tuple[Task, int]:
        """The answer to a retry with an Idempotency-Key: the same task, if the same request."""
        return replayed(task, key, digest)

    def _withdraw(self, creating: asyncio.Future[tuple[Task, bool]],
                  claim: tuple[str, str] | None) -> asyncio.Task[None]:
        """Remove the task ``creating`` stores, once stored: its client was never told of it. Its
        Idempotency-Key stays claimed until then."""
        async def remove() -> None:
            try:
                task, created = await creating
            except Exception:  # nothing was stored (create leaves nothing behind when it fails)
                return
            if not created:  # another request's task, found by its Idempotency-Key
                return
            try:
                await asyncio.to_thread(self._require().delete, task.id)
            except Exception as exc:
                log.error("task %s was never accepted but cannot be removed: %s", task.id, exc)

        removal = asyncio.ensure_future(remove())
        self._withdrawals.add(removal)
        removal.add_done_callback(self._withdrawals.discard)
        if claim is not None:
            self._claims[claim] = removal

            def unclaim(_: object) -> None:
                if self._claims.get(claim) is removal:
                    del self._claims[claim]

            removal.add_done_callback(unclaim)
        return removal

    async def accepted_body(self, task: Task, job: Job) -> dict[str, Any]:
        """What a submit of ``job`` that made (or found) ``task`` answers."""
        return await self.cluster.accepted(task, job) if self.cluster is not None else self.accepted(task)

    def accepted(self, task: Task) -> dict[str, Any]:
        """What a submit answers: the task's id and status, and while it waits, its estimates."""
        return {"task_id": task.id, "status": task.state.value, **self._queue_estimates(task)}

    def _queue_estimates(self, task: Task) -> dict[str, Any]:
        runner = self._runners.get(task.id)
        if task.state is not TaskState.QUEUED or runner is None:
            return {}
        return queue_estimates(self.runtime.scheduler, self.runtime.dispatcher, runner.job, self.wall)

    # --- running a task -----------------------------------------------------------------------

    def _run(self, task: Task, job: Job, future: asyncio.Future[Backend], intake: Intake) -> None:
        headers = {"Content-Type": intake.content_type, REQUEST_ID: f"task-{task.id}"}
        work = asyncio.ensure_future(self._execute(task, job, future, intake.body, headers))
        self._runners[task.id] = Runner(work, job)
        work.add_done_callback(lambda _: self._runners.pop(task.id, None))
        future.add_done_callback(lambda f: self._started(task.id, f))

    def _started(self, task_id: str, future: asyncio.Future[Backend]) -> None:
        if future.done() and not future.cancelled() and future.exception() is None:
            self._spawn(self._store_quietly(f"task {task_id}: cannot mark it running", self._require().mark_running,
                                            task_id, self.wall()))

    async def _store_quietly(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """A store write whose failure is logged, not raised (True when it went through): a task left
        unfinished by it is re-queued at the next start."""
        try:
            await asyncio.to_thread(method, *args, **kwargs)
        except StoreError as exc:
            log.error("%s: %s", what, exc)
            return False
        except Exception:
            log.exception("%s", what)
            return False
        return True

    async def _execute(self, task: Task, job: Job, future: asyncio.Future[Backend], body: bytes,
                       headers: dict[str, str]) -> None:
        """Run the task to its outcome, then announce it. Cancelled at any point (DELETE, shutdown),
        nothing stays taken: the exchange withdraws a queued job and leaves one in flight to finish
        on its backend (GLM-TTS cannot cancel), whose slot is freed when it answers; an answer being
        read is finished when its ``async with`` is left."""
        store = self._require()
        record = Outcome(request_id=f"task-{task.id}")
        try:
            answered = await self.exchange.forward(job, future, body, headers, record)
        except DeadlineExpired as exc:
            stored = await self._store_quietly(f"task {task.id}: cannot mark it expired", store.fail, task.id,
                                               state=TaskState.EXPIRED, reason=exc.detail, result=None,
                                               now=self.wall())
        except SidecarError as exc:
            stored = await self._store_quietly(f"task {task.id}: cannot mark it failed", store.fail, task.id,
                                               state=TaskState.FAILED, reason=f"{exc.reason}: {exc.detail}",
                                               result=None, now=self.wall())
        else:
            status, answer = await read_task_answer(answered)
            stored = await self._record(task, status, answer)
        if stored:  # else the task is still unfinished in the store: nothing to announce yet
            self._spawn(self._announce(task))

    async def _record(self, task: Task, status: int, answer: TaskResult) -> bool:
        store = self._require()
        if answer.wav is not None:
            return await self._store_quietly(f"task {task.id}: cannot store its audio", store.succeed, task.id,
                                             wav=answer.wav, result=answer.meta, now=self.wall())
        meta = answer.meta
        detail = meta.get("error") or meta.get("detail") or f"HTTP {status}"
        return await self._store_quietly(f"task {task.id}: cannot mark it failed", store.fail, task.id,
                                         state=TaskState.FAILED, reason=f"backend answered {status}: {detail}",
                                         result=meta or None, now=self.wall())

    async def _recover(self, task: Task) -> None:
        """Re-queue a task a previous run accepted but did not finish, in the band it was given."""
        store = self._require()
        left = task.deadline_at - self.wall()
        if left <= 0:
            await asyncio.to_thread(store.fail, task.id, state=TaskState.EXPIRED,
                                    reason="the deadline passed while the sidecar was stopped", result=None,
                                    now=self.wall())
            self._spawn(self._announce(task))
            return
        try:
            body = await asyncio.to_thread(store.body, task.id)
            tts = parse_tts_form(parse_form(task.content_type, body))
        except (GLMTTSError, StoreError) as exc:  # cannot happen for a stored, validated body; never lose it silently
            await asyncio.to_thread(store.fail, task.id, state=TaskState.FAILED,
                                    reason=f"stored request unreadable: {exc}", result=None, now=self.wall())
            self._spawn(self._announce(task))
            return
        if task.state is TaskState.RUNNING:
            await asyncio.to_thread(store.requeue, task.id, self.wall())
        job = task_job(self.runtime.scheduler, self.runtime.tenants, task, tts, now=self.runtime.dispatcher.clock(),
                       budget_s=left)
        future = self.exchange.admit(job, force=True)
        intake = Intake(request_id=f"task-{task.id}", arrived=job.arrived_at, body=body,
                        content_type=task.content_type, tts=tts, job=job)
        self._run(task, job, future, intake)
        log.info("task %s re-queued after a restart (%.0f s of its deadline left)", task.id, left)

    async def _announce(self, submitted: Task) -> None:
        """POST the finished task to its callback URL (scheduler.runtime.callbacks.deliver); never fails the task.

        The task's ``callback`` says only pending, delivered or failed; why an attempt failed is logged."""
        if submitted.callback_url is None:
            return
        store = self._require()
        task_id = submitted.id
        task = await asyncio.to_thread(store.get, task_id, tenant=submitted.tenant)
        if task is None or task.callback_url is None:
            return
        await asyncio.to_thread(store.set_callback_state, task_id, "pending")
        delivered = await deliver(self.config.callbacks, task.callback_url, self.describe(task),
                                  label=f"task {task_id}")
        await asyncio.to_thread(store.set_callback_state, task_id, "delivered" if delivered else "failed")

    # --- GET / DELETE -------------------------------------------------------------------------

    def describe(self, task: Task) -> dict[str, Any]:
        """A task as GET /api/v1/tasks/{id} answers it."""
        return describe(task, self._queue_estimates(task))

    async def status_body(self, task: Task) -> dict[str, Any]:
        """A task as GET /api/v1/tasks/{id} answers it, from either store."""
        return await self.cluster.describe(task) if self.cluster is not None else self.describe(task)

    async def owned(self, tenant: str, task_id: str) -> Task:
        """The tenant's task; UnknownTask (404) for one that does not exist or is another tenant's,
        the same answer, so ids leak nothing."""
        if self.cluster is not None:
            return await self.cluster.owned(tenant, task_id)
        task = await self._call(f"cannot read task {task_id}", self.require_store().get, task_id, tenant=tenant)
        if task is None:
            raise _unknown(task_id)
        return task

    async def audio(self, task: Task) -> Path | bytes:
        """The WAV of a succeeded task: a file (SQLite) or its bytes (Redis); NoAudio (409) otherwise."""
        return await self.cluster.audio(task) if self.cluster is not None else await self.audio_path(task)

    async def audio_path(self, task: Task) -> Path:
        """The WAV file of a succeeded task; NoAudio (409) otherwise."""
        path = await self._call(f"cannot read task {task.id}", self._require().audio_path, task.id)
        if path is None:
            raise NoAudio(f"Task '{task.id}' has no audio (status {task.state.value})", status=task.state.value)
        return path

    async def cancel(self, task: Task) -> Task:
        """Cancel the task (a finished one stays as it is): the task as it is now."""
        if self.cluster is not None:
            return await self.cluster.cancel(task)
        updated = await self._call(f"cannot cancel task {task.id}", self._require().cancel, task.id,
                                   tenant=task.tenant, now=self.wall())
        if updated is None:
            raise _unknown(task.id)
        runner = self._runners.get(task.id)
        # Whichever attempt runs now: a queued one leaves the queue; one in flight finishes on its
        # backend (GLM-TTS cannot cancel), its slot freed when it answers, its result unused.
        if runner is not None and updated.state is TaskState.CANCELLED and runner.work.cancel():
            self._spawn(self._announce(updated))
        return updated


def _unknown(task_id: str) -> UnknownTask:
    return UnknownTask(f"Task '{task_id}' not found")
