"""The client-facing TTS path: ``POST /api/v1/tts``, validated, attributed, admitted, forwarded, streamed back.

The request is read and validated at the edge (scheduler.http.intake), admitted or turned away
with a reason, queued until the scheduler gives it a backend slot, and forwarded with the client's
original body bytes (scheduler.runtime.exchange); the backend's answer streams back without being
held whole. With ``cache.enabled`` the answer comes through the result cache instead
(scheduler.http.cached: a hit takes no queue place or backend slot; identical requests in flight
share one synthesis), marked ``X-Cache: hit|miss|shared``. ``Prefer: respond-async`` hands the
request to the async task mode instead (uncached). The other upstream endpoints are in
scheduler.http.admin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from backend.transport import BackendTimeout, BackendUnavailable
from glmtts.responses import succeeded
from scheduler.http.cached import CachedTTS
from scheduler.http.intake import read_intake
from scheduler.http.middleware import REQUEST_ID
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import PASSED_HEADERS, Answered, Exchange, Outcome, Whole
from scheduler.runtime.fanout import decide, synthesize

__all__ = ["PIECES_HEADER", "STREAM_CHUNK", "TTSHandler", "sendable", "timing"]

STREAM_CHUNK = 64 * 1024
PIECES_HEADER = "X-Fanout-Pieces"  # how many pieces the answer was synthesized in (scheduler.runtime.fanout)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sendable(value: str) -> str:
    """A received header value as it can be sent on: a byte that was not UTF-8 (a lone surrogate
    from aiohttp's parser) cannot be encoded again, so it is left out."""
    return value if value.isascii() else value.encode("utf-8", "ignore").decode("utf-8")


class TTSHandler:
    """``submit_task``: the async task mode's submit, for ``Prefer: respond-async`` (None: disabled)."""

    def __init__(self, runtime: Runtime, exchange: Exchange, *, submit_task: Handler | None = None) -> None:
        self.runtime = runtime
        self.exchange = exchange
        self.submit_task = submit_task
        self.cached = CachedTTS(runtime, exchange)

    async def tts(self, request: web.Request) -> web.StreamResponse:
        if self.submit_task is not None and "respond-async" in request.headers.get("Prefer", "").lower():
            return await self.submit_task(request)
        intake = await read_intake(self.runtime, request)
        if self.runtime.config.cache.enabled:
            whole, how = await self.cached.answer(intake)
            return whole_response(whole, intake.request_id, cache=how)
        job, rid = intake.job, intake.request_id
        record = Outcome(request_id=rid)
        headers = {"Content-Type": sendable(intake.content_type), REQUEST_ID: rid}
        with self.exchange.reporting(job, record, intake.arrived):
            plan = decide(self.runtime, intake, choice=intake.fanout)
            if plan is not None:  # split: the pieces' joined answer, whole
                whole = await synthesize(self.runtime, self.exchange, intake, record, {REQUEST_ID: rid}, plan)
                record.status = whole.status
                return whole_response(whole, rid)
            future = self.exchange.admit(job)
            async with await self.exchange.forward(job, future, intake.body, headers, record) as answered:
                return await self._stream_back(request, answered)

    async def _stream_back(self, request: web.Request, answered: Answered) -> web.StreamResponse:
        reply, record, backend = answered.reply, answered.record, answered.backend
        out = web.StreamResponse(status=reply.status, reason=reply.reason)
        for name in PASSED_HEADERS:
            if name in reply.headers:
                out.headers[name] = reply.headers[name]
        out.headers[REQUEST_ID] = record.request_id
        out.headers["X-Backend"] = backend.id
        out.headers["X-Queue-Wait"] = f"{record.queue_s:.3f}"
        # Service = until the backend's answer began: the synthesis itself.
        out.headers["Server-Timing"] = timing(record.queue_s, record.service_s)
        if reply.content_length is not None:
            out.content_length = reply.content_length
        record.status = reply.status
        try:
            await out.prepare(request)
            async for chunk in reply.iter_chunked(STREAM_CHUNK):
                if not answered.finished:
                    # GLM-TTS answers once synthesis is over, the whole body at once: the backend
                    # is free now, so a client reading slowly holds a connection, never a slot.
                    answered.finish(succeeded(reply.status, chunk))
                await out.write(chunk)
            await out.write_eof()
        except (BackendUnavailable, BackendTimeout) as exc:
            # The backend died mid-answer: bytes already went out, so no retry; cut the client off.
            record.outcome = "backend_cut"
            self.runtime.pool.report_failure(backend, f"answer cut short: {exc}")
            if request.transport is not None:
                request.transport.close()
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError, asyncio.CancelledError):
            # The client went away (aiohttp's write error is a ClientError too).
            record.outcome = "client_gone"
            raise
        return out


def timing(queue_s: float, service_s: float | None) -> str:
    """Server-Timing: the queue wait, and the synthesis until the backend's answer began."""
    return f"queue;dur={queue_s * 1000:.1f}, service;dur={(service_s or 0.0) * 1000:.1f}"


def whole_response(whole: Whole, request_id: str, *, cache: str | None = None) -> web.Response:
    """An answer read whole (through the cache, or joined from pieces): the backend's status, body
    and headers, where it came from (``cache``: X-Cache) and how it was made."""
    out = web.Response(status=whole.status, body=whole.body)
    for name, value in whole.headers.items():
        out.headers[name] = sendable(value)
    out.headers[REQUEST_ID] = request_id
    if cache is not None:
        out.headers["X-Cache"] = cache
    if whole.backend is not None:  # the backend(s) that made it (for a shared one: the first request's)
        out.headers["X-Backend"] = whole.backend
        out.headers["X-Queue-Wait"] = f"{whole.queue_s:.3f}"
        out.headers["Server-Timing"] = timing(whole.queue_s, whole.service_s)
    if whole.pieces > 1:
        out.headers[PIECES_HEADER] = str(whole.pieces)
    return out
