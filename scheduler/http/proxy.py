"""The client-facing TTS path: validate, attribute, admit, wait, forward, stream back.

``POST /api/v1/tts`` is validated at the edge (upstream's exact error, no backend touched),
attributed to a tenant and a priority band, given a deadline, admitted or turned away with a
reason, queued until the scheduler gives it a backend slot, and forwarded with the client's
original body bytes; the backend's answer streams back without being held whole. The other
upstream endpoints are in scheduler.http.admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from aiohttp import web

from backend.client import BackendClient, BackendTimeout, BackendUnavailable
from backend.pool import Backend, BackendPool
from backend.state import BackendState
from glmtts.contract import check_tts, parse_tts_form, upstream_length_class
from glmtts.errors import HTTPDetailError
from glmtts.form import parse_form
from glmtts.responses import json_response
from glmtts.text import units
from scheduler.config import SidecarConfig
from scheduler.core.admission import Rejection
from scheduler.core.deadlines import client_budget, shed_message, timeout_message
from scheduler.core.queue import Job
from scheduler.core.retry import RetryBudget
from scheduler.core.scheduler import Scheduler
from scheduler.core.tenants import DEFAULT_TENANT, TenantDirectory, TenantError
from scheduler.errors import (
    BackendFailed,
    DeadlineExpired,
    Draining,
    NoBackend,
    PayloadTooLarge,
    Rejected,
    SidecarError,
)
from scheduler.runtime.dispatcher import Dispatcher, QueuedDeadline
from scheduler.runtime.metrics import UNKNOWN_CLASS, Metrics, classify
from scheduler.runtime.prompts import PromptCatalogue

log = logging.getLogger("glmtts_sidecar.proxy")
access_log = logging.getLogger("glmtts_sidecar.access")

REQUEST_ID = "X-Request-ID"
STREAM_CHUNK = 64 * 1024
INLINE_PARSE_BYTES = 256 * 1024  # bodies up to this size are parsed on the event loop
# Backend answer headers worth passing on; hop-by-hop and framing headers are ours to set.
PASSED_HEADERS = ("Content-Type", "Allow", "Retry-After")
# FastAPI serialises TTSResponse in field order, so a success starts with exactly this.
SUCCESS_PREFIX = b'{"success":true'


def error_response(exc: SidecarError | HTTPDetailError) -> web.Response:
    headers = exc.headers() if isinstance(exc, SidecarError) else {}
    return web.Response(body=exc.body_bytes(), status=exc.status,
                        headers={"Content-Type": "application/json", **headers})


def closing(response: web.Response) -> web.Response:
    """Close the connection after this answer: the rest of the client's body is not read."""
    response.force_close()
    return response


def rejection_error(rejection: Rejection) -> Rejected:
    return Rejected(rejection.status, rejection.reason.value, rejection.detail, retry_after=rejection.retry_after_s)


def sendable(value: str) -> str:
    """A received header value as it can be sent on: a byte that was not UTF-8 (a lone surrogate
    from aiohttp's parser) cannot be encoded again, so it is left out."""
    return value if value.isascii() else value.encode("utf-8", "ignore").decode("utf-8")


def request_id(request: web.Request) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one."""
    given = request.headers.get(REQUEST_ID, "")
    if 0 < len(given) <= 200 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


@dataclass(frozen=True, kw_only=True)
class Intake:
    """A validated, attributed TTS request, its job made but not yet admitted."""

    request_id: str
    arrived: float
    body: bytes
    content_type: str
    job: Job


class TaskSubmitter(Protocol):
    async def submit(self, request: web.Request) -> web.StreamResponse: ...


@dataclass
class Outcome:
    """What happened to one TTS request, for the access log."""

    request_id: str = ""  # the client's X-Request-ID (or ours)
    status: int = 0
    outcome: str = "ok"
    reason: str | None = None
    backend: str | None = None
    queue_s: float = 0.0
    started: float = 0.0  # when the job was last forwarded (dispatcher clock)
    service_s: float | None = None
    attempts: int = 0
    extra: dict[str, object] = field(default_factory=dict)


class Proxy:
    def __init__(self, config: SidecarConfig, pool: BackendPool, client: BackendClient, prompts: PromptCatalogue,
                 dispatcher: Dispatcher, tenants: TenantDirectory, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.pool = pool
        self.client = client
        self.prompts = prompts
        self.dispatcher = dispatcher
        self.tenants = tenants
        self.metrics = metrics if metrics is not None else Metrics()
        self.draining = False
        self.retries = RetryBudget(ratio=config.retries.budget_ratio, min_concurrent=config.retries.budget_min)
        self._orphans: set[asyncio.Task[None]] = set()
        self.served = {"short_text": 0, "long_text": 0}  # answers by upstream's 200-character split
        self.tasks: TaskSubmitter | None = None  # the async task mode, for Prefer: respond-async

    @property
    def scheduler(self) -> Scheduler:
        return self.dispatcher.scheduler

    def reconfigure(self, config: SidecarConfig, scheduler: Scheduler, tenants: TenantDirectory) -> None:
        """A reload: new policies from now on; the new scheduler has adopted every queued job."""
        self.config = config
        self.tenants = tenants
        self.dispatcher.scheduler = scheduler
        self.dispatcher.slots = config.backends.slot_policy()
        self.retries.ratio = config.retries.budget_ratio
        self.retries.min_concurrent = config.retries.budget_min
        self.dispatcher.pump()

    # --- middleware: request ids, upstream-shaped 404/405/413 --------------------------------

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        rid = request_id(request)
        request["request_id"] = rid
        try:
            response = await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            response = json_response({"detail": "Method Not Allowed"}, 405,
                                     {"Allow": ", ".join(sorted(exc.allowed_methods))})
        except web.HTTPNotFound:
            response = json_response({"detail": "Not Found"}, 404)
        except web.HTTPRequestEntityTooLarge:
            response = closing(error_response(self._too_large_body()))
        if not response.prepared:
            response.headers[REQUEST_ID] = rid
        return response

    def _too_large_body(self) -> PayloadTooLarge:
        limit = self.config.limits.max_body_bytes
        return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes", limit=limit)

    # --- POST /api/v1/tts ---------------------------------------------------------------------

    async def intake(self, request: web.Request, *, budget_s: float | None = None) -> Intake | web.Response:
        """Everything before queueing, shared by /api/v1/tts and /api/v1/tasks: read and validate
        the body, attribute it, and make its job; or the answer that refuses it (counted).
        ``budget_s``: the deadline budget instead of the policy's (async tasks)."""
        arrived = self.dispatcher.clock()
        rid: str = request["request_id"]
        if self.draining:
            self.metrics.draining_rejection()
            return self._edge(arrived, error_response(Draining(
                "The sidecar is shutting down; send new requests elsewhere",
                retry_after=self.config.shutdown.drain_timeout_s)))
        limits = self.config.limits
        if request.content_length is not None and request.content_length > limits.max_body_bytes:
            return self._edge(arrived, closing(error_response(self._too_large_body())))
        try:
            body = await asyncio.wait_for(self._read_body(request), limits.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            return self._edge(arrived, closing(error_response(self._too_large_body())))
        except asyncio.TimeoutError:
            return self._edge(arrived, closing(json_response(
                {"detail": f"The request body did not arrive within {limits.body_timeout_s:g} s",
                 "reason": "body_timeout"}, 408)))
        content_type = request.headers.get("Content-Type")
        try:
            # A big body is parsed off the event loop: hostile multipart must not stall other requests.
            form = (parse_form(content_type, body) if len(body) <= INLINE_PARSE_BYTES
                    else await asyncio.to_thread(parse_form, content_type, body))
            tts = parse_tts_form(form)
            check_tts(tts, prompts=None)
            if tts.index and not await self.prompts.has(tts.index):
                check_tts(tts, prompts={})  # upstream's 404 for an index no backend knows
        except HTTPDetailError as exc:
            return self._edge(arrived, error_response(exc))
        cls = self.scheduler.classes.of(tts.chars).name
        if tts.chars > limits.max_text_chars:
            return self._edge(arrived, error_response(PayloadTooLarge(
                f"input_text is {tts.chars} characters; the limit is {limits.max_text_chars}",
                limit=limits.max_text_chars)), cls)
        try:
            who = self.tenants.attribute(authorization=request.headers.get("Authorization"),
                                         tenant_header=request.headers.get("X-Tenant"),
                                         priority_header=request.headers.get("X-Priority"))
            client = self._client_budget(request)
        except TenantError as exc:
            return self._edge(arrived, json_response({"detail": exc.detail, "reason": exc.reason}, exc.status), cls)
        except ValueError as exc:
            return self._edge(arrived, json_response({"detail": str(exc), "reason": "bad_timeout"}, 400), cls)
        # Job ids are ours: clients may reuse an X-Request-ID, the scheduler needs unique keys.
        job = self.scheduler.make_job(
            id=uuid.uuid4().hex, chars=tts.chars, units=units(tts.input_text), model_key=tts.model_key, now=arrived,
            tenant=who.tenant.name, weight=who.tenant.weight, band=who.band, tenant_bound=who.tenant.max_queued,
            client_budget_s=client, budget_s=budget_s)
        return Intake(request_id=rid, arrived=arrived, body=body, content_type=content_type or "", job=job)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, holding at most the limit plus one chunk (aiohttp's ``read`` lets its
        buffer grow to the limit on top); HTTPRequestEntityTooLarge as soon as it is over."""
        limit = self.config.limits.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(limit, size)
            chunks.append(chunk)
        return b"".join(chunks)

    async def tts(self, request: web.Request) -> web.StreamResponse:
        if self.tasks is not None and "respond-async" in request.headers.get("Prefer", "").lower():
            return await self.tasks.submit(request)
        intake = await self.intake(request)
        if isinstance(intake, web.Response):
            return intake
        job, rid, arrived, body, content_type = (intake.job, intake.request_id, intake.arrived, intake.body,
                                                 intake.content_type)
        record = Outcome(request_id=rid)
        headers = {"Content-Type": sendable(content_type), REQUEST_ID: rid}
        try:
            response = await self._serve(request, job, body, headers, record)
        except SidecarError as exc:
            record.status, record.outcome, record.reason = exc.status, "rejected", exc.reason
            response = error_response(exc)
        except asyncio.CancelledError:
            record.outcome, record.reason = "client_gone", "client_gone"
            raise
        finally:
            self._log(job, record, arrived, rid)
            self.metrics.request_finished(
                cls=job.cls, tenant=job.tenant, outcome=classify(record.status, record.outcome),
                total_s=self.dispatcher.clock() - arrived, queue_s=record.queue_s if record.attempts else None,
                service_s=record.service_s, predicted_s=job.predicted_s)
        return response

    def _edge(self, arrived: float, response: web.Response, cls: str = UNKNOWN_CLASS) -> web.Response:
        """Count an answer given at the edge, before the request became a job (its tenant unknown)."""
        self.metrics.request_finished(cls=cls, tenant=DEFAULT_TENANT, outcome=classify(response.status, "refused"),
                                      total_s=self.dispatcher.clock() - arrived)
        return response

    def _client_budget(self, request: web.Request) -> float | None:
        header = request.headers.get("X-Request-Timeout")
        if header is None or not self.config.deadlines.client_header:
            return None
        return client_budget(float("inf"), header)

    async def _serve(self, request: web.Request, job: Job, body: bytes, headers: dict[str, str],
                     record: Outcome) -> web.StreamResponse:
        future = self.admit(job)
        backend, resp = await self.exchange(job, future, body, headers, record)
        return await self._stream_back(request, job, backend, resp, record)

    def admit(self, job: Job, *, force: bool = False) -> asyncio.Future[Backend]:
        """Admission: a future for the job's backend slot, or the Rejected error to answer.

        ``force``: a job admitted before (an async task re-queued after a restart) skips the bounds."""
        self.retries.record_request(self.dispatcher.clock())
        admitted = self.dispatcher.offer(job, force=force)
        if isinstance(admitted, Rejection):
            raise rejection_error(admitted)
        return admitted

    async def exchange(self, job: Job, future: asyncio.Future[Backend], body: bytes, headers: dict[str, str],
                       record: Outcome) -> tuple[Backend, aiohttp.ClientResponse]:
        """Wait for a slot, forward, and return once a backend's answer has begun; a backend that
        fails before answering is reported and the job retried elsewhere within the retry budget.
        The caller reads the answer and must end with ``finish_answer``."""
        retrying = False  # holds a permit of the retry budget
        try:
            while True:
                backend = await self._wait(job, future)
                record.attempts += 1
                record.backend = backend.id
                record.queue_s = self.dispatcher.clock() - job.arrived_at
                record.started = self.dispatcher.clock()
                try:
                    resp = await self._send(backend, job, body, headers, record)
                except BackendUnavailable as exc:
                    self.pool.report_failure(backend, str(exc))
                    self.pool.report_outcome(backend, ok=False, latency_ratio=None)
                    retrying = self._retry_permit(job, record, held=retrying)
                    if not retrying:
                        self.dispatcher.finish(job, backend, ok=False)
                        # The client learns which backend; its address and the error stay in the log.
                        log.warning("request %s: backend %s failed before answering (%s); no retry left", job.id,
                                    backend.id, exc)
                        raise BackendFailed(f"Backend {backend.id} went away before answering") from None
                    log.warning("request %s: backend %s failed before answering (%s); trying again", job.id,
                                backend.id, exc)
                    future = self.dispatcher.requeue(job, backend)
                    continue
                record.service_s = self.dispatcher.clock() - record.started
                if resp.status < 500:
                    return backend, resp
                # A server error before any byte went to the client: another backend may succeed.
                retrying = self._retry_permit(job, record, held=retrying)
                if not retrying:
                    return backend, resp  # finish_answer reports it
                self.pool.report_outcome(backend, ok=False, latency_ratio=None)
                log.warning("request %s: backend %s answered HTTP %d; trying again", job.id, backend.id,
                            resp.status)
                resp.release()  # no await: a client leaving now must not strand the slot
                if any(b.state is BackendState.READY for b in self.pool.backends if b is not backend):
                    # Out of rotation until health answers `rise` times (nginx's max_fails), so the
                    # failing backend, idle and quick to fail, does not draw the retry back to itself.
                    self.pool.report_failure(backend, f"answered HTTP {resp.status}")
                future = self.dispatcher.requeue(job, backend)
        finally:
            if retrying:
                self.retries.release()

    def _retry_permit(self, job: Job, record: Outcome, *, held: bool) -> bool:
        """After a failed attempt: give back the retry permit it held (``held``), then whether the
        job may be tried again, taking a permit of the retry budget if so."""
        if held:
            self.retries.release()
        now = self.dispatcher.clock()
        return (record.attempts < self.config.retries.max_attempts and now < job.deadline_at
                and self.retries.try_acquire(now))

    def finish_answer(self, job: Job, backend: Backend, status: int, ok: bool, record: Outcome) -> None:
        """The backend's answer is complete: learn, report the outcome, free the slot."""
        if ok:
            backend.model_key = job.model_key
        elif record.outcome == "ok":
            record.outcome = "backend_error" if status >= 500 else "failed"
        backend.served += 1
        self.served[upstream_length_class(job.chars)] += 1
        # For outlier detection a client's error (4xx) says nothing about the backend.
        healthy = ok or 400 <= status < 500
        ratio = (record.service_s / job.predicted_s) if ok and record.service_s and job.predicted_s else None
        self.pool.report_outcome(backend, ok=healthy, latency_ratio=ratio)
        self.dispatcher.finish(job, backend, ok=ok)

    async def _wait(self, job: Job, future: asyncio.Future[Backend]) -> Backend:
        try:
            return await future
        except QueuedDeadline as exc:
            raise self._expired(job, shed=exc.shed) from None
        except asyncio.CancelledError:
            self.dispatcher.withdraw(job, future)  # the client went away while queued
            raise

    def _expired(self, job: Job, *, shed: bool = False) -> DeadlineExpired:
        """Upstream's 408; ``shed``: taken out of the queue at its latest start, said why."""
        budget = job.deadline_at - job.arrived_at
        if shed:
            return DeadlineExpired(shed_message(budget, job.chars, job.predicted_s))
        return DeadlineExpired(timeout_message(budget, job.chars))

    async def _send(self, backend: Backend, job: Job, body: bytes, headers: dict[str, str],
                    record: Outcome) -> aiohttp.ClientResponse:
        """Forward the original bytes and wait for the answer's headers, until the deadline.

        The exchange is shielded: GLM-TTS cannot cancel, so when the deadline passes or the client
        leaves, the backend slot stays busy until the backend answers, and is freed then.
        """
        task = asyncio.ensure_future(self.client.open(
            "POST", backend.url + "/api/v1/tts", body=body, headers=headers,
            timeout=self.config.backends.request_timeout_s))
        self._watch(task, backend, job)
        left = job.deadline_at - self.dispatcher.clock()
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, left))
        except asyncio.TimeoutError:
            self.dispatcher.answered_early(job)
            self._orphan(task, backend, job)
            record.outcome = "deadline_running"
            raise self._expired(job) from None
        except asyncio.CancelledError:
            self._orphan(task, backend, job, client_left=self.dispatcher.clock())
            raise
        except BackendTimeout as exc:
            self.pool.report_failure(backend, str(exc))
            self.dispatcher.finish(job, backend, ok=False)
            raise BackendFailed(f"Backend {backend.id} did not answer within "
                                f"{self.config.backends.request_timeout_s:g} s") from exc
        except BackendUnavailable:
            raise
        except Exception as exc:  # the request could not even be sent: the slot is free again
            log.exception("request %s: cannot forward to backend %s", job.id, backend.id)
            self.dispatcher.finish(job, backend, ok=False)
            raise BackendFailed(f"The request could not be forwarded to backend {backend.id}: "
                                f"{exc.__class__.__name__}") from exc

    def _watch(self, task: asyncio.Future[aiohttp.ClientResponse], backend: Backend, job: Job) -> None:
        """The watchdog: a request still without an answer far beyond its prediction means a stuck
        backend; kill it (its supervisor restarts it) and the request is retried elsewhere."""
        watchdog = self.config.backends.watchdog
        limit = watchdog.limit_s(job.p95_s)

        def fire() -> None:
            if not task.done():
                log.error("request %s: no answer from backend %s after %.0f s (predicted p95 %.1f s); killing it",
                          job.id, backend.id, limit, job.p95_s)
                self.pool.kill_backend(backend, f"watchdog: request {job.id} ran over {limit:.0f} s")

        handle = asyncio.get_running_loop().call_later(limit, fire)
        task.add_done_callback(lambda _: handle.cancel())

    def _orphan(self, task: asyncio.Future[aiohttp.ClientResponse], backend: Backend, job: Job, *,
                client_left: float | None = None) -> None:
        """Keep the slot busy until the backend really finishes the abandoned request. ``client_left``:
        when its client went away (not a deadline, which the scheduler counts itself)."""
        async def finish() -> None:
            ok = False
            try:
                resp = await task
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    ok = resp.status == 200 and (await resp.read()).startswith(SUCCESS_PREFIX)
                resp.release()
            except (BackendUnavailable, BackendTimeout) as exc:
                self.pool.report_failure(backend, str(exc))
            finally:
                self.dispatcher.finish(job, backend, ok=ok)
                if client_left is not None:  # backend time nobody will receive: orphaned, not lost
                    self.scheduler.tally.orphaned_s += max(0.0, self.dispatcher.clock() - client_left)
                log.info("request %s: backend %s finished work whose client was already answered", job.id,
                         backend.id)

        orphan = asyncio.ensure_future(finish())
        self._orphans.add(orphan)
        orphan.add_done_callback(self._orphans.discard)

    async def _stream_back(self, request: web.Request, job: Job, backend: Backend, resp: aiohttp.ClientResponse,
                           record: Outcome) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        for name in PASSED_HEADERS:
            if name in resp.headers:
                out.headers[name] = resp.headers[name]
        out.headers[REQUEST_ID] = record.request_id
        out.headers["X-Backend"] = backend.id
        out.headers["X-Queue-Wait"] = f"{record.queue_s:.3f}"
        # Service = until the backend's answer began: the synthesis itself.
        out.headers["Server-Timing"] = (f"queue;dur={record.queue_s * 1000:.1f}, "
                                        f"service;dur={(record.service_s or 0.0) * 1000:.1f}")
        if resp.content_length is not None:
            out.content_length = resp.content_length
        record.status = resp.status
        ok = False
        finished = False
        writing = True  # to the client; else reading from the backend: whose failure it is
        try:
            try:
                await out.prepare(request)
                writing = False
                async for chunk in resp.content.iter_chunked(STREAM_CHUNK):
                    if not finished:
                        ok = resp.status == 200 and chunk.startswith(SUCCESS_PREFIX)
                        # GLM-TTS answers once synthesis is over, the whole body at once: the backend
                        # is free now, so a client reading slowly holds a connection, never a slot.
                        finished = True
                        self.finish_answer(job, backend, resp.status, ok, record)
                    writing = True
                    await out.write(chunk)
                    writing = False
                writing = True
                await out.write_eof()
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError) as exc:
                if writing:  # the client went away (aiohttp's write error is a ClientError too)
                    record.outcome = "client_gone"
                    raise
                # The backend died mid-answer: bytes already went out, so no retry; cut the client off.
                ok = False
                record.outcome = "backend_cut"
                self.pool.report_failure(backend, f"answer cut short: {exc}")
                if request.transport is not None:
                    request.transport.close()
            except asyncio.CancelledError:
                record.outcome = "client_gone"
                raise
        finally:
            resp.release()
            if not finished:
                self.finish_answer(job, backend, resp.status, ok, record)
        return out

    def _log(self, job: Job, record: Outcome, arrived: float, request_id: str) -> None:
        entry = {
            "id": request_id, "tenant": job.tenant, "band": self.tenants.band_names[job.band], "chars": job.chars,
            "units": job.units, "class": job.cls, "predicted_s": round(job.predicted_s, 3),
            "service_s": None if record.service_s is None else round(record.service_s, 3),
            "queue_s": round(record.queue_s, 3), "total_s": round(self.dispatcher.clock() - arrived, 3),
            "backend": record.backend, "status": record.status, "outcome": record.outcome,
            "reason": record.reason, "attempts": record.attempts,
        }
        # Text logs carry the entry as a JSON message; JSON logs merge its fields into the record.
        access_log.info(json.dumps(entry, ensure_ascii=False), extra={"access": entry})

    async def close(self) -> None:
        """Wait for orphaned backend work, so no slot accounting is left dangling."""
        self.dispatcher.close()
        if self._orphans:
            await asyncio.gather(*self._orphans, return_exceptions=True)

    # --- readiness ----------------------------------------------------------------------------

    def ready_backends(self) -> list[Backend]:
        return [b for b in self.pool.backends if b.state is BackendState.READY]

    def pick_ready(self) -> Backend:
        ready = self.ready_backends()
        if not ready:
            raise NoBackend("No backend is ready", retry_after=1.0)
        return min(ready, key=lambda b: b.in_flight)
