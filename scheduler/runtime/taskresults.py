"""What a task's submit and run come to besides the store: the result of a backend's answer, and
the errors that refuse a submit (quota, store, a reused Idempotency-Key), with their exact
wording, how a task reads to its client, and the job a stored task runs as. Shared by the task
service's two stores (SQLite, scheduler.runtime.tasks; Redis, scheduler.runtime.taskcluster)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.transport import BackendTimeout, BackendUnavailable
from glmtts.contract import TTSRequest
from glmtts.responses import succeeded
from glmtts.text import units
from glmtts.wav import WavError, read_wav
from scheduler.config import TasksConfig
from scheduler.core.queue import Job
from scheduler.core.scheduler import Scheduler
from scheduler.core.tenants import TenantDirectory
from scheduler.errors import IdempotencyKeyReused, StoreUnavailable, TaskQuotaExceeded
from scheduler.runtime.dispatcher import Dispatcher
from scheduler.runtime.exchange import Answered
from scheduler.runtime.taskstore import QuotaExceeded, Task, TaskState

__all__ = [
    "IDEMPOTENCY_KEY",
    "STORE_RETRY_AFTER_S",
    "TaskResult",
    "callback_stale_s",
    "cluster_estimates",
    "describe",
    "over_quota",
    "queue_estimates",
    "read_answer",
    "read_task_answer",
    "replayed",
    "task_job",
    "unavailable",
]

IDEMPOTENCY_KEY = "Idempotency-Key"

STORE_RETRY_AFTER_S = 30.0


@dataclass(frozen=True, kw_only=True)
class TaskResult:
    """What a backend's answer to a task comes to: ``ok`` (upstream's success), its metadata, the WAV of a success."""

    ok: bool
    meta: dict[str, Any]
    wav: bytes | None = None


def read_answer(status: int, raw: bytes) -> TaskResult:
    """What a backend's answer to a task comes to; ``raw``: the whole body."""
    try:
        payload = json.loads(raw) if raw else None
    except ValueError as exc:
        return TaskResult(ok=False, meta={"detail": f"answer unreadable: {exc}"})
    ok = succeeded(status, raw) and isinstance(payload, dict) and payload.get("success") is True
    meta = {k: v for k, v in payload.items() if k != "audio_base64"} if isinstance(payload, dict) else {}
    if not ok:
        return TaskResult(ok=False, meta=meta)
    try:
        wav = base64.b64decode(payload["audio_base64"], validate=True)  # type: ignore[index]
        meta.update(audio_bytes=len(wav), duration_s=round(read_wav(wav).duration, 3))
    except (binascii.Error, KeyError, TypeError, WavError) as exc:
        # The backend said success: its slot learns so; the task fails on what it cannot keep.
        return TaskResult(ok=True, meta={**meta, "error": f"the backend's audio is not a WAV: {exc}"})
    return TaskResult(ok=True, meta=meta, wav=wav)


def over_quota(tenant: str, exc: QuotaExceeded, config: TasksConfig, *, now: float) -> TaskQuotaExceeded:
    """The 429 for a submit over the tenant's quota, with when to try again."""
    # Room comes back when the sweep removes the tenant's oldest finished task; else, look again later.
    retry = (exc.oldest_finished_at + config.ttl_s - now if exc.oldest_finished_at is not None
             else config.sweep_interval_s)
    retry = max(retry, 1.0)
    if exc.limit == "tasks":
        return TaskQuotaExceeded(
            f"Tenant {tenant!r} has {exc.used} stored tasks, the most tasks.max_per_tenant allows "
            f"({exc.allowed}); finished tasks are removed tasks.ttl_s after they finish",
            retry_after=retry, limit="tasks.max_per_tenant")
    return TaskQuotaExceeded(
        f"Tenant {tenant!r} stores {exc.used} bytes of task bodies and audio; {exc.adding} more would pass "
        f"tasks.max_bytes_per_tenant ({exc.allowed})", retry_after=retry, limit="tasks.max_bytes_per_tenant")


def unavailable(why: str) -> StoreUnavailable:
    return StoreUnavailable(f"Tasks cannot be stored right now: {why}", retry_after=STORE_RETRY_AFTER_S)


def describe(task: Task, estimates: dict[str, Any]) -> dict[str, Any]:
    """A task as GET /api/v1/tasks/{id} answers it; ``estimates``: ``queue_estimates`` while it waits."""
    body: dict[str, Any] = {
        "task_id": task.id, "status": task.state.value, "created_at": task.created_at,
        "started_at": task.started_at, "finished_at": task.finished_at, "deadline_at": task.deadline_at,
        "attempts": task.attempts, "reason": task.reason, "callback": task.callback_state,
    }
    body.update(estimates)
    if task.result is not None:
        body["result"] = task.result
    if task.state is TaskState.SUCCEEDED:
        body["audio_url"] = f"/api/v1/tasks/{task.id}/audio"
    return body


def queue_estimates(scheduler: Scheduler, dispatcher: Dispatcher, job: Job, wall: Callable[[], float]
                    ) -> dict[str, Any]:
    """Position and predicted start/finish (unix seconds, by ``wall``) of a queued task's job."""
    now = dispatcher.clock()
    order = [j.id for j in scheduler.queue.candidates(now)]
    if job.id not in order:  # already given a backend slot: it starts now
        started = wall()
        return {"position": 0, "estimated_start": round(started, 3),
                "estimated_done": round(started + job.predicted_s, 3)}
    outlook = scheduler.outlook(job, now, dispatcher.views())
    start = wall() + outlook.wait_s
    return {"position": order.index(job.id) + 1, "estimated_start": round(start, 3),
            "estimated_done": round(start + job.predicted_s, 3)}


def cluster_estimates(scheduler: Scheduler, dispatcher: Dispatcher, job: Job, position: int | None,
                      wall: Callable[[], float]) -> dict[str, Any]:
    """Position in the cluster's queue (scheduler.runtime.taskcluster) and predicted start/finish
    of a task not yet taken by any replica: as if this sidecar's scheduler admitted ``job`` now
    (another replica may take it; an estimate, as the SQLite store's are)."""
    wait_s = scheduler.predicted_wait_s(job, dispatcher.clock(), dispatcher.views())
    start = wall() + wait_s
    return {"position": position if position is not None else 0, "estimated_start": round(start, 3),
            "estimated_done": round(start + job.predicted_s, 3)}


def replayed(task: Task, key: str, digest: str) -> tuple[Task, int]:
    """The answer to a retry with an Idempotency-Key: the same task (200 once it left the queue,
    else 202) if the same request, else IdempotencyKeyReused (422)."""
    if task.request_sha256 != digest:
        raise IdempotencyKeyReused(f"{IDEMPOTENCY_KEY} {key!r} was already used for a different request "
                                   "(another body or Content-Type); a new request needs a new key")
    return task, 200 if task.state is not TaskState.QUEUED else 202


def task_job(scheduler: Scheduler, tenants: TenantDirectory, task: Task, tts: TTSRequest, *, now: float,
             budget_s: float) -> Job:
    """The job a stored task runs as (re-queued after a restart, or taken from the cluster's
    queue), in the band it was given: by name, since a reload may have reordered the bands; one
    that is gone means the default band, as an unknown tenant means the default tenant."""
    try:
        tenant = tenants.tenant(task.tenant)
    except KeyError:
        tenant = tenants.default
    band = tenants.band_names.index(task.band) if task.band in tenants.band_names else tenants.default_band
    return scheduler.make_job(id=f"task-{task.id}", chars=tts.chars, units=units(tts.input_text),
                              model_key=tts.model_key, now=now, tenant=tenant.name, weight=tenant.weight, band=band,
                              budget_s=budget_s)


def callback_stale_s(config: TasksConfig) -> float:
    """The longest one callback's announcement can take (every attempt and backoff), plus a
    minute: one begun longer ago was left by a sidecar that stopped, and is announced again."""
    callbacks = config.callbacks
    backoff = callbacks.backoff_s * float(2 ** min(callbacks.attempts - 1, 20) - 1)
    return float(min(callbacks.attempts * callbacks.timeout_s + backoff, config.ttl_s)) + 60.0


async def read_task_answer(answered: Answered) -> tuple[int, TaskResult]:
    """A task's backend answer read whole, decoded off the event loop (megabytes of JSON and
    base64 for a long text), and the attempt finished with whether it is upstream's success."""
    status = answered.reply.status
    async with answered:
        try:
            raw = await answered.reply.read()
            answer = await asyncio.to_thread(read_answer, status, raw)
        except (BackendUnavailable, BackendTimeout) as exc:
            answer = TaskResult(ok=False, meta={"detail": f"answer unreadable: {exc}"})
        answered.finish(answer.ok)
    return status, answer
