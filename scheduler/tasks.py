"""The async task mode: submit a TTS request, get 202 and a task id, poll, fetch the WAV, cancel.

A task goes through the same validation, attribution, admission, fair queueing and dispatch as a
synchronous request, under its own, longer deadline (``tasks.deadline_s``). It is persisted
(scheduler.taskstore: SQLite, request body and audio as files) before the 202 goes out, so a
sidecar that is killed and restarted re-queues every task still queued or running: nothing
accepted is lost. Only the tenant that created a task can see, fetch or cancel it (404 to others).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from backend.pool import Backend
from glmtts.contract import parse_tts_form
from glmtts.errors import GLMTTSError
from glmtts.form import parse_form
from glmtts.responses import json_response
from glmtts.text import units
from glmtts.wav import WavError, read_wav
from scheduler.config import TasksConfig
from scheduler.errors import DeadlineExpired, SidecarError
from scheduler.proxy import REQUEST_ID, Intake, Outcome, Proxy, error_response
from scheduler.queue import Job
from scheduler.taskstore import StoreError, Task, TaskState, TaskStore
from scheduler.tenants import TenantError

log = logging.getLogger("glmtts_sidecar.tasks")

IDEMPOTENCY_KEY = "Idempotency-Key"
CALLBACK_URL = "X-Callback-URL"
MAX_IDEMPOTENCY_KEY = 200


class TaskService:
    def __init__(self, proxy: Proxy, config: TasksConfig, *, wall: Callable[[], float] = time.time) -> None:
        self.proxy = proxy
        self.config = config
        self.wall = wall  # task times are wall-clock (they outlive the process)
        self.store: TaskStore | None = None
        self._runners: dict[str, tuple[asyncio.Task[None], Job, asyncio.Future[Backend]]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifetime -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and re-queue what a previous run left queued or running."""
        directory = self.config.directory()
        try:
            self.store = await asyncio.to_thread(TaskStore, directory)
        except StoreError as exc:  # the sidecar still serves synchronous requests; submits get 503
            log.error("async tasks unavailable: cannot open the task store in %s: %s", directory, exc)
            return
        log.info("async tasks stored in %s", directory)
        for task in await asyncio.to_thread(self.store.unfinished):
            await self._recover(task)
        self._spawn(self._sweeper())

    async def close(self) -> None:
        for runner, _, _ in list(self._runners.values()):
            runner.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*(r for r, _, _ in self._runners.values()), *self._background, return_exceptions=True)
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

    # --- POST /api/v1/tasks (and Prefer: respond-async) ---------------------------------------

    async def submit(self, request: web.Request) -> web.StreamResponse:
        if self.store is None:
            return _store_unavailable("the task store could not be opened (see the log)")
        store = self.store
        key = request.headers.get(IDEMPOTENCY_KEY)
        callback = request.headers.get(CALLBACK_URL)
        if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable()):
            return json_response({"detail": f"{IDEMPOTENCY_KEY} must be 1 to {MAX_IDEMPOTENCY_KEY} printable "
                                  "ASCII characters", "reason": "bad_idempotency_key"}, 400)
        if callback is not None and not self.config.callbacks.allows(callback):
            return json_response({"detail": f"{CALLBACK_URL} is not in tasks.callbacks.allow",
                                  "reason": "callback_not_allowed"}, 400)
        intake = await self.proxy.intake(request, budget_s=self.config.deadline_s)
        if isinstance(intake, web.Response):
            return intake
        job = intake.job
        try:
            future = self.proxy.admit(job)
        except SidecarError as exc:
            return error_response(exc)
        budget = job.deadline_at - job.arrived_at
        try:
            task, created = await asyncio.to_thread(
                store.create, tenant=job.tenant, body=intake.body, content_type=intake.content_type,
                chars=job.chars, deadline_at=self.wall() + budget, now=self.wall(), idempotency_key=key,
                callback_url=callback)
        except StoreError as exc:
            self.proxy.dispatcher.withdraw(job, future)
            log.error("cannot persist a task: %s", exc)
            return _store_unavailable(str(exc))
        if not created:  # the same Idempotency-Key from the same tenant: the same task
            self.proxy.dispatcher.withdraw(job, future)
            return self._accepted(task, status=200 if task.state is not TaskState.QUEUED else 202)
        self._run(task, job, future, intake)
        return self._accepted(task)

    def _accepted(self, task: Task, status: int = 202) -> web.Response:
        body = {"task_id": task.id, "status": task.state.value, **self._queue_estimates(task)}
        return json_response(body, status, {"Location": f"/api/v1/tasks/{task.id}"})

    def _queue_estimates(self, task: Task) -> dict[str, Any]:
        """Position and predicted start/finish (unix seconds) while the task waits."""
        runner = self._runners.get(task.id)
        if task.state is not TaskState.QUEUED or runner is None:
            return {}
        job = runner[1]
        scheduler = self.proxy.scheduler
        now = self.proxy.dispatcher.clock()
        order = [j.id for j in scheduler.queue.candidates(now)]
        if job.id not in order:  # already given a backend slot: it starts now
            started = self.wall()
            return {"position": 0, "estimated_start": round(started, 3),
                    "estimated_done": round(started + job.predicted_s, 3)}
        outlook = scheduler.outlook(job, now, self.proxy.dispatcher.views())
        start = self.wall() + outlook.wait_s
        return {"position": order.index(job.id) + 1, "estimated_start": round(start, 3),
                "estimated_done": round(start + job.predicted_s, 3)}

    # --- running a task -----------------------------------------------------------------------

    def _run(self, task: Task, job: Job, future: asyncio.Future[Backend], intake: Intake) -> None:
        headers = {"Content-Type": intake.content_type, REQUEST_ID: f"task-{task.id}"}
        runner = asyncio.ensure_future(self._execute(task, job, future, intake.body, headers))
        self._runners[task.id] = (runner, job, future)
        runner.add_done_callback(lambda _: self._runners.pop(task.id, None))
        future.add_done_callback(lambda f: self._started(task.id, f))

    def _started(self, task_id: str, future: asyncio.Future[Backend]) -> None:
        if future.done() and not future.cancelled() and future.exception() is None:
            self._spawn(asyncio.to_thread(self._require().mark_running, task_id, self.wall()))

    async def _execute(self, task: Task, job: Job, future: asyncio.Future[Backend], body: bytes,
                       headers: dict[str, str]) -> None:
        store = self._require()
        record = Outcome(request_id=f"task-{task.id}")
        try:
            backend, resp = await self.proxy.exchange(job, future, body, headers, record)
        except DeadlineExpired as exc:
            await asyncio.to_thread(store.fail, task.id, state=TaskState.EXPIRED, reason=exc.detail, result=None,
                                    now=self.wall())
            return await self._announce(task)
        except SidecarError as exc:
            await asyncio.to_thread(store.fail, task.id, state=TaskState.FAILED, reason=f"{exc.reason}: {exc.detail}",
                                    result=None, now=self.wall())
            return await self._announce(task)
        ok = False
        try:
            raw = await resp.read()
            payload = json.loads(raw) if raw else None
            ok = resp.status == 200 and isinstance(payload, dict) and payload.get("success") is True
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            payload, raw = {"detail": f"answer unreadable: {exc}"}, b""
        finally:
            resp.release()
            self.proxy.finish_answer(job, backend, resp.status, ok, record)
        await self._record(task, resp.status, payload, ok)
        await self._announce(task)

    async def _record(self, task: Task, status: int, payload: Any, ok: bool) -> None:
        store = self._require()
        meta = {k: v for k, v in payload.items() if k != "audio_base64"} if isinstance(payload, dict) else {}
        if ok:
            try:
                wav = base64.b64decode(payload["audio_base64"], validate=True)
                meta.update(audio_bytes=len(wav), duration_s=round(read_wav(wav).duration, 3))
            except (binascii.Error, KeyError, TypeError, WavError) as exc:
                ok, meta = False, {**meta, "error": f"the backend's audio is not a WAV: {exc}"}
            else:
                await asyncio.to_thread(store.succeed, task.id, wav=wav, result=meta, now=self.wall())
                return
        detail = meta.get("error") or meta.get("detail") or f"HTTP {status}"
        await asyncio.to_thread(store.fail, task.id, state=TaskState.FAILED, reason=f"backend answered {status}: "
                                f"{detail}", result=meta or None, now=self.wall())

    async def _recover(self, task: Task) -> None:
        """Re-queue a task a previous run accepted but did not finish."""
        store = self._require()
        left = task.deadline_at - self.wall()
        if left <= 0:
            await asyncio.to_thread(store.fail, task.id, state=TaskState.EXPIRED,
                                    reason="the deadline passed while the sidecar was stopped", result=None,
                                    now=self.wall())
            return
        body = await asyncio.to_thread(store.body, task.id)
        try:
            tts = parse_tts_form(parse_form(task.content_type, body))
        except GLMTTSError as exc:  # cannot happen for a body that was validated; never lose it silently
            await asyncio.to_thread(store.fail, task.id, state=TaskState.FAILED,
                                    reason=f"stored request unreadable: {exc}", result=None, now=self.wall())
            return
        if task.state is TaskState.RUNNING:
            await asyncio.to_thread(store.requeue, task.id, self.wall())
        try:
            tenant = self.proxy.tenants.tenant(task.tenant)
        except KeyError:
            tenant = self.proxy.tenants.default
        job = self.proxy.scheduler.make_job(
            id=f"task-{task.id}", chars=tts.chars, units=units(tts.input_text), model_key=tts.model_key,
            now=self.proxy.dispatcher.clock(), tenant=tenant.name, weight=tenant.weight,
            band=self.proxy.tenants.default_band, budget_s=left)
        future = self.proxy.admit(job, force=True)
        intake = Intake(request_id=f"task-{task.id}", arrived=job.arrived_at, body=body,
                        content_type=task.content_type, job=job)
        self._run(task, job, future, intake)
        log.info("task %s re-queued after a restart (%.0f s of its deadline left)", task.id, left)

    async def _announce(self, submitted: Task) -> None:
        """POST the finished task to its callback URL, with retries; never fails the task."""
        if submitted.callback_url is None:
            return
        store = self._require()
        task_id = submitted.id
        task = await asyncio.to_thread(store.get, task_id, tenant=submitted.tenant)
        if task is None or task.callback_url is None:
            return
        cfg = self.config.callbacks
        await asyncio.to_thread(store.set_callback_state, task_id, "pending")
        delay = cfg.backoff_s
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        for attempt in range(1, cfg.attempts + 1):
            try:
                async with aiohttp.ClientSession(timeout=timeout) as session, \
                        session.post(task.callback_url, json=self.describe(task)) as resp:
                    if 200 <= resp.status < 300:
                        await asyncio.to_thread(store.set_callback_state, task_id, "delivered")
                        return
                    why = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                why = str(exc) or exc.__class__.__name__
            log.warning("task %s: callback attempt %d of %d failed (%s)", task_id, attempt, cfg.attempts, why)
            if attempt < cfg.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        await asyncio.to_thread(store.set_callback_state, task_id, "failed")

    # --- GET / DELETE -------------------------------------------------------------------------

    def describe(self, task: Task) -> dict[str, Any]:
        body: dict[str, Any] = {
            "task_id": task.id, "status": task.state.value, "created_at": task.created_at,
            "started_at": task.started_at, "finished_at": task.finished_at, "deadline_at": task.deadline_at,
            "attempts": task.attempts, "reason": task.reason, "callback": task.callback_state,
        }
        body.update(self._queue_estimates(task))
        if task.result is not None:
            body["result"] = task.result
        if task.state is TaskState.SUCCEEDED:
            body["audio_url"] = f"/api/v1/tasks/{task.id}/audio"
        return body

    async def _owned(self, request: web.Request) -> Task | web.Response:
        if self.store is None:
            return _store_unavailable("the task store could not be opened (see the log)")
        try:
            who = self.proxy.tenants.attribute(authorization=request.headers.get("Authorization"),
                                               tenant_header=request.headers.get("X-Tenant"), priority_header=None)
        except TenantError as exc:
            return json_response({"detail": exc.detail, "reason": exc.reason}, exc.status)
        task_id = request.match_info["task_id"]
        task = await asyncio.to_thread(self._require().get, task_id, tenant=who.tenant.name)
        if task is None:  # unknown, or another tenant's: the same answer, so ids leak nothing
            return json_response({"detail": f"Task '{task_id}' not found", "reason": "unknown_task"}, 404)
        return task

    async def status(self, request: web.Request) -> web.Response:
        task = await self._owned(request)
        if isinstance(task, web.Response):
            return task
        return json_response(self.describe(task))

    async def audio(self, request: web.Request) -> web.StreamResponse:
        task = await self._owned(request)
        if isinstance(task, web.Response):
            return task
        path = await asyncio.to_thread(self._require().audio_path, task.id)
        if path is None:
            return json_response({"detail": f"Task '{task.id}' has no audio (status {task.state.value})",
                                  "reason": "no_audio", "status": task.state.value}, 409)
        # FileResponse answers Range requests (206 with Content-Range) itself.
        return web.FileResponse(path, headers={"Content-Type": "audio/wav",
                                               "Content-Disposition": f'inline; filename="{task.id}.wav"'})

    async def cancel(self, request: web.Request) -> web.Response:
        task = await self._owned(request)
        if isinstance(task, web.Response):
            return task
        updated = await asyncio.to_thread(self._require().cancel, task.id, tenant=task.tenant, now=self.wall())
        if updated is None:
            return json_response({"detail": f"Task '{task.id}' not found", "reason": "unknown_task"}, 404)
        runner = self._runners.get(task.id)
        if runner is not None and task.state is TaskState.QUEUED:
            future = runner[2]
            if not future.done():  # still waiting: it leaves the queue; a running one finishes, unused
                runner[0].cancel()
        return json_response(self.describe(updated))


def _store_unavailable(why: str) -> web.Response:
    return json_response({"detail": f"Tasks cannot be stored right now: {why}", "reason": "store_unavailable"},
                         503, {"Retry-After": "30"})
