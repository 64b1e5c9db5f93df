"""The client-facing handlers: upstream's API, scheduled and forwarded to the backend pool.

``POST /api/v1/tts`` is validated at the edge (upstream's exact error, no backend touched),
waits in the queue for a backend slot, and is forwarded with the client's original body bytes;
the backend's answer streams back without being held whole. Everything else is passed to one
ready backend (reads) or every backend (prompt writes, clear_cache) -- see scheduler.admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from backend.client import BackendClient, BackendTimeout, BackendUnavailable
from backend.pool import Backend, BackendPool
from backend.state import BackendState
from glmtts.contract import check_tts, parse_tts_form
from glmtts.errors import HTTPDetailError, dump_json
from glmtts.form import parse_form
from glmtts.text import units
from scheduler.config import SidecarConfig
from scheduler.dispatcher import Dispatcher
from scheduler.errors import BackendFailed, NoBackend, PayloadTooLarge, QueueFull, SidecarError
from scheduler.prompts import PromptCatalogue
from scheduler.queue import Job, QueueFullError

log = logging.getLogger("glmtts_sidecar.proxy")
access_log = logging.getLogger("glmtts_sidecar.access")

REQUEST_ID = "X-Request-ID"
MAX_ATTEMPTS = 2  # a request whose backend went away before answering is tried once more elsewhere
STREAM_CHUNK = 64 * 1024
# Backend answer headers worth passing on; hop-by-hop and framing headers are ours to set.
PASSED_HEADERS = ("Content-Type", "Allow", "Retry-After")


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dump_json(payload), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


def error_response(exc: SidecarError | HTTPDetailError) -> web.Response:
    headers = exc.headers() if isinstance(exc, SidecarError) else {}
    return web.Response(body=exc.body_bytes(), status=exc.status,
                        headers={"Content-Type": "application/json", **headers})


def request_id(request: web.Request) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one."""
    given = request.headers.get(REQUEST_ID, "")
    if 0 < len(given) <= 200 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


@dataclass
class Counters:
    """Totals by length class, for /api/v1/stats/concurrency."""

    served: dict[str, int] = field(default_factory=lambda: {"short_text": 0, "long_text": 0})
    active: dict[str, int] = field(default_factory=lambda: {"short_text": 0, "long_text": 0})


LONG_THRESHOLD_CHARS = 200  # upstream's TEXT_LENGTH_THRESHOLD


def length_class(chars: int) -> str:
    return "long_text" if chars > LONG_THRESHOLD_CHARS else "short_text"


class Proxy:
    def __init__(self, config: SidecarConfig, pool: BackendPool, client: BackendClient,
                 prompts: PromptCatalogue) -> None:
        self.config = config
        self.pool = pool
        self.client = client
        self.prompts = prompts
        self.dispatcher = Dispatcher(lambda: pool.backends, slots=config.backends.slots,
                                     max_queue=config.queue.max_size)
        self.counters = Counters()
        # Mean service seconds (EWMA), starting from the seed's short-text figure.
        self.mean_service_s = 3.5
        self._orphans: set[asyncio.Task[None]] = set()

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
            response = error_response(self._too_large_body())
        if not response.prepared:
            response.headers[REQUEST_ID] = rid
        return response

    def _too_large_body(self) -> PayloadTooLarge:
        limit = self.config.limits.max_body_bytes
        return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes", limit=limit)

    # --- POST /api/v1/tts ---------------------------------------------------------------------

    async def tts(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        rid: str = request["request_id"]
        limits = self.config.limits
        if request.content_length is not None and request.content_length > limits.max_body_bytes:
            return error_response(self._too_large_body())
        body = await request.read()
        content_type = request.headers.get("Content-Type")
        try:
            tts = parse_tts_form(parse_form(content_type, body))
            check_tts(tts, prompts=None)
            if tts.index and not await self.prompts.has(tts.index):
                check_tts(tts, prompts={})  # upstream's 404 for an index no backend knows
        except HTTPDetailError as exc:
            return error_response(exc)
        if tts.chars > limits.max_text_chars:
            return error_response(PayloadTooLarge(
                f"input_text is {tts.chars} characters; the limit is {limits.max_text_chars}",
                limit=limits.max_text_chars))
        job = Job(id=rid, chars=tts.chars, units=units(tts.input_text), model_key=tts.model_key,
                  enqueued_at=received)
        headers = {"Content-Type": content_type or "", REQUEST_ID: rid}
        try:
            return await self._serve(request, job, body, headers)
        except SidecarError as exc:
            log.info("request %s: %s (%s)", rid, exc.reason, exc.detail)
            return error_response(exc)

    async def _serve(self, request: web.Request, job: Job, body: bytes,
                     headers: dict[str, str]) -> web.StreamResponse:
        cls = length_class(job.chars)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            backend = await self._wait_for_slot(job)
            queued_s = time.monotonic() - job.enqueued_at
            started = time.monotonic()
            self.counters.active[cls] += 1
            try:
                resp = await self._send(backend, job, body, headers)
            except BackendUnavailable as exc:
                self.counters.active[cls] -= 1
                self.pool.report_failure(backend, str(exc))
                self.dispatcher.release(backend)
                log.warning("request %s: backend %s failed before answering (%s); attempt %d of %d",
                            job.id, backend.id, exc, attempt, MAX_ATTEMPTS)
                job.enqueued_at = time.monotonic()
                continue
            try:
                return await self._stream_back(request, job, backend, resp, queued_s, started)
            finally:
                self.counters.active[cls] -= 1
                self.counters.served[cls] += 1
        raise BackendFailed(f"Backends went away before answering (tried {MAX_ATTEMPTS} times)")

    async def _wait_for_slot(self, job: Job) -> Backend:
        if not any(b.state not in (BackendState.STOPPING, BackendState.STOPPED) for b in self.pool.backends):
            raise NoBackend("No backend is running", retry_after=self.config.backends.restart.backoff_max_s)
        try:
            future = self.dispatcher.submit(job)
        except QueueFullError as exc:
            raise QueueFull(f"The queue is full ({exc.size} requests waiting)",
                            retry_after=self._predicted_drain_s()) from None
        try:
            return await future
        except asyncio.CancelledError:
            # The client went away while queued: leave the queue; if a slot had just been
            # assigned, give it back.
            if not self.dispatcher.withdraw(job) and future.done() and not future.cancelled():
                self.dispatcher.release(future.result())
            raise

    def _predicted_drain_s(self) -> float:
        """Until the queue can take one more job: until the next busy slot is expected to free."""
        busy = max(1, self.dispatcher.in_service())
        return self.mean_service_s / busy

    async def _send(self, backend: Backend, job: Job, body: bytes,
                    headers: dict[str, str]) -> aiohttp.ClientResponse:
        """Forward the original bytes; shielded, because the backend cannot be cancelled anyway:
        if our client leaves, the slot stays busy until the backend answers (then it is freed)."""
        task = asyncio.ensure_future(self.client.open(
            "POST", backend.url + "/api/v1/tts", body=body, headers=headers,
            timeout=self.config.backends.request_timeout_s))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._orphan(task, backend, job)
            raise
        except BackendTimeout as exc:
            self.pool.report_failure(backend, str(exc))
            self.dispatcher.release(backend)
            raise BackendFailed(f"Backend {backend.id} did not answer within "
                                f"{self.config.backends.request_timeout_s:g} s") from exc

    def _orphan(self, task: asyncio.Future[aiohttp.ClientResponse], backend: Backend, job: Job) -> None:
        async def finish() -> None:
            try:
                resp = await task
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    await resp.read()
                resp.release()
            except (BackendUnavailable, BackendTimeout) as exc:
                self.pool.report_failure(backend, str(exc))
            finally:
                self.dispatcher.release(backend)
                log.info("request %s: client left; backend %s finished the orphaned work", job.id, backend.id)

        orphan = asyncio.ensure_future(finish())
        self._orphans.add(orphan)
        orphan.add_done_callback(self._orphans.discard)

    async def _stream_back(self, request: web.Request, job: Job, backend: Backend,
                           resp: aiohttp.ClientResponse, queued_s: float, started: float) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        for name in PASSED_HEADERS:
            if name in resp.headers:
                out.headers[name] = resp.headers[name]
        out.headers[REQUEST_ID] = job.id
        out.headers["X-Backend"] = backend.id
        out.headers["X-Queue-Wait"] = f"{queued_s:.3f}"
        # Service = until the backend's answer began: the synthesis itself.
        service_ms = (time.monotonic() - started) * 1000
        out.headers["Server-Timing"] = f"queue;dur={queued_s * 1000:.1f}, service;dur={service_ms:.1f}"
        if resp.content_length is not None:
            out.content_length = resp.content_length
        outcome = "ok"
        try:
            try:
                await out.prepare(request)
                async for chunk in resp.content.iter_chunked(STREAM_CHUNK):
                    await out.write(chunk)
                await out.write_eof()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # The backend died mid-answer: bytes already went out, so no retry; cut the client off.
                outcome = "backend_cut"
                self.pool.report_failure(backend, f"answer cut short: {exc}")
                if request.transport is not None:
                    request.transport.close()
            except (ConnectionResetError, asyncio.CancelledError):
                outcome = "client_gone"
                raise
        finally:
            resp.release()
            if resp.status == 200 and outcome == "ok":
                backend.model_key = job.model_key
            backend.served += 1
            self.dispatcher.release(backend)
            service_s = time.monotonic() - started
            if outcome == "ok":
                self.mean_service_s += 0.1 * (service_s - self.mean_service_s)
            access_log.info("%s POST /api/v1/tts %d chars=%d backend=%s queue=%.3fs service=%.3fs outcome=%s",
                            job.id, resp.status, job.chars, backend.id, queued_s, service_s, outcome)
        return out

    async def close(self) -> None:
        """Wait for orphaned backend work, so the process leaves no slot accounting dangling."""
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
