"""The async task mode's endpoints: submit (202 and a task id), status, audio, cancel.

``POST /api/v1/tasks`` (and ``POST /api/v1/tts`` with ``Prefer: respond-async``) takes the same
request as /api/v1/tts; ``GET /api/v1/tasks/{id}`` says where it is, ``GET .../audio`` serves the
WAV of a success (Range requests too: a file from the SQLite store, bytes from Redis), ``DELETE``
cancels it. What a task is and how it runs is
scheduler.runtime.tasks; these handlers read headers, check them and answer.
"""

from __future__ import annotations

from aiohttp import web

from glmtts.responses import json_response
from scheduler.core.tenants import TenantError
from scheduler.errors import BadIdempotencyKey, CallbackNotAllowed, NonAsciiHeader, NotAttributed
from scheduler.http.intake import read_intake
from scheduler.runtime.context import Runtime
from scheduler.runtime.tasks import IDEMPOTENCY_KEY, TaskService
from scheduler.runtime.taskstore import Task

__all__ = ["ASCII_HEADERS", "CALLBACK_URL", "MAX_IDEMPOTENCY_KEY", "TaskHandlers"]

CALLBACK_URL = "X-Callback-URL"
MAX_IDEMPOTENCY_KEY = 200
# Headers a task stores or is attributed by: bytes that are not ASCII are refused, never stored.
ASCII_HEADERS = ("Content-Type", CALLBACK_URL, "Authorization")


class TaskHandlers:
    def __init__(self, runtime: Runtime, service: TaskService) -> None:
        self.runtime = runtime
        self.service = service

    async def submit(self, request: web.Request) -> web.StreamResponse:
        _require_ascii_headers(request)
        service = self.service
        service.require_open()
        key = request.headers.get(IDEMPOTENCY_KEY)
        callback = request.headers.get(CALLBACK_URL)
        if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable()):
            raise BadIdempotencyKey(f"{IDEMPOTENCY_KEY} must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters")
        if callback is not None and (refused := service.config.callbacks.refusal(callback)) is not None:
            raise CallbackNotAllowed(f"{CALLBACK_URL} {refused}")
        intake = await read_intake(self.runtime, request, budget_s=service.config.deadline_s)
        task, status = await service.accept(intake, key, callback)
        return json_response(await service.accepted_body(task, intake.job), status,
                             {"Location": f"/api/v1/tasks/{task.id}"})

    async def status(self, request: web.Request) -> web.Response:
        task = await self._owned(request)
        return json_response(await self.service.status_body(task))

    async def audio(self, request: web.Request) -> web.StreamResponse:
        task = await self._owned(request)
        audio = await self.service.audio(task)
        headers = {"Content-Type": "audio/wav", "Content-Disposition": f'inline; filename="{task.id}.wav"'}
        if isinstance(audio, bytes):
            return _ranged(request, audio, headers)
        # FileResponse answers Range requests (206 with Content-Range) itself.
        return web.FileResponse(audio, headers=headers)

    async def cancel(self, request: web.Request) -> web.Response:
        task = await self._owned(request)
        return json_response(await self.service.status_body(await self.service.cancel(task)))

    async def _owned(self, request: web.Request) -> Task:
        """The task the path names, if the caller's tenant owns it."""
        _require_ascii_headers(request)
        self.service.require_open()
        try:
            who = self.runtime.tenants.attribute(authorization=request.headers.get("Authorization"),
                                                 tenant_header=request.headers.get("X-Tenant"), priority_header=None)
        except TenantError as exc:
            raise NotAttributed(exc.status, exc.reason, exc.detail) from None
        return await self.service.owned(who.tenant.name, request.match_info["task_id"])


def _require_ascii_headers(request: web.Request) -> None:
    """400 for a header a task would store or be attributed by that is not ASCII (aiohttp hands
    bytes that are not UTF-8 over as lone surrogates, which can be neither stored nor compared)."""
    for name in ASCII_HEADERS:
        if not all(value.isascii() for value in request.headers.getall(name, ())):
            raise NonAsciiHeader(f"The {name} header must be ASCII", header=name)


def _ranged(request: web.Request, data: bytes, headers: dict[str, str]) -> web.Response:
    """``data`` whole (200), or the one range a ``Range`` header asks for (206 with
    Content-Range), or 416 for a range that is malformed or starts past the end, as
    web.FileResponse answers for a file."""
    size = len(data)
    headers = {**headers, "Accept-Ranges": "bytes"}
    if "Range" not in request.headers:
        return web.Response(body=data, headers=headers)
    try:
        wanted = request.http_range
    except ValueError:
        wanted = None
    if wanted is not None:
        start, stop, _ = wanted.indices(size)
        if wanted.start is not None and wanted.start >= size:  # bytes=N- with N past the end
            wanted = None
        elif start < stop:
            return web.Response(status=206, body=data[start:stop],
                                headers={**headers, "Content-Range": f"bytes {start}-{stop - 1}/{size}"})
    return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
