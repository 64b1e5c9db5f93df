"""An in-memory Transport: backends as Python async handlers, and the faults a network has.

``FakeTransport`` routes each request by its base URL (scheme, host and port) to a handler, an
``async def (FakeRequest) -> FakeAnswer``. A handler may sleep (a slow synthesis), raise
``Reset`` (the connection drops, before or after the backend got the request), or answer with a
body that streams slowly or is cut short. ``fail_next`` scripts resets for the next requests to a
backend without touching its handler. Errors come out as backend.transport maps them for the real
network: BackendUnavailable(sent=...) and BackendTimeout. An app built with it and
``backends.external`` URLs runs fully in memory: the pool's health probes and warm-ups, the
proxy's requests and the admin's all go through it. ``FakeBackend`` is a ready-made handler that
answers as GLM-TTS does.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from backend.transport import Answer, BackendTimeout, BackendUnavailable, Reply, exchange
from glmtts.loop import wait_for
from glmtts.responses import success_json
from glmtts.wav import write_wav

__all__ = ["FakeAnswer", "FakeBackend", "FakeRequest", "FakeTransport", "Handler", "Reset"]


@dataclass(frozen=True)
class FakeRequest:
    method: str
    url: str
    path: str  # with the query string
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(frozen=True, kw_only=True)
class FakeAnswer:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    reason: str | None = None
    chunk_bytes: int = 64 * 1024  # the pieces the body arrives in
    chunk_delay_s: float = 0.0  # a pause before each piece: a slow stream
    cut_after: int | None = None  # the connection drops once this many body bytes arrived


class Reset(Exception):
    """Raised by a handler: the connection drops; ``sent``: after the backend got the request."""

    def __init__(self, *, sent: bool) -> None:
        super().__init__("Connection reset by peer")
        self.sent = sent


Handler = Callable[[FakeRequest], Awaitable[FakeAnswer]]


class FakeReply:
    def __init__(self, request: FakeRequest, answer: FakeAnswer, on_release: Callable[[FakeReply], None]) -> None:
        self.request = request  # what it answers
        self._answer = answer
        self._headers = CIMultiDictProxy(CIMultiDict(answer.headers))
        self._on_release = on_release
        self._read = False
        self.released = False

    @property
    def status(self) -> int:
        return self._answer.status

    @property
    def reason(self) -> str | None:
        return self._answer.reason

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def content_length(self) -> int | None:
        return len(self._answer.body)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunked(len(self._answer.body) or 1)])

    async def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        if self._read:
            raise RuntimeError("the body of a reply is read once")
        self._read = True
        answer = self._answer
        body = answer.body if answer.cut_after is None else answer.body[:answer.cut_after]
        step = max(1, min(size, answer.chunk_bytes))
        for start in range(0, len(body), step):
            await asyncio.sleep(answer.chunk_delay_s)
            yield body[start:start + step]
        if answer.cut_after is not None:
            await asyncio.sleep(0)
            cause = ConnectionResetError("Response payload is not completed")
            raise BackendUnavailable(str(cause), sent=True) from cause

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release(self)


class FakeTransport:
    """Backends in memory. ``requests``: every request that reached a handler, in order."""

    def __init__(self) -> None:
        self._routes: dict[str, Handler] = {}
        self._resets: dict[str, deque[bool]] = {}
        self.requests: list[FakeRequest] = []
        self.open_replies: set[FakeReply] = set()  # handed out, not yet released
        self.started = False
        self.closed = False

    def unreleased(self, path: str = "/api/v1/tts") -> list[FakeRequest]:
        """The requests to ``path`` whose replies were handed out and not released yet."""
        return [reply.request for reply in self.open_replies if reply.request.path == path]

    def route(self, base_url: str, handler: Handler) -> None:
        self._routes[_base(base_url)] = handler

    def fail_next(self, base_url: str, *, sent: bool, times: int = 1) -> None:
        """The next ``times`` requests to the backend meet a reset: before it got them
        (``sent=False``: its handler never sees them), or after (its handler runs, its answer is lost)."""
        self._resets.setdefault(_base(base_url), deque()).extend([sent] * times)

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def open(self, method: str, url: str, *, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None,
                   fresh: bool = False) -> Reply:
        base = _base(url)
        handler = self._routes.get(base)
        if handler is None:
            refused = ConnectionRefusedError(f"Cannot connect to host {base}")
            raise BackendUnavailable(f"{url}: {refused}", sent=False) from refused
        resets = self._resets.get(base)
        reset = resets.popleft() if resets else None
        if reset is False:
            cause = ConnectionResetError("Connection reset by peer")
            raise BackendUnavailable(f"{url}: {cause}", sent=False) from cause
        parts = urlsplit(url)
        request = FakeRequest(method=method, url=url, path=parts.path + (f"?{parts.query}" if parts.query else ""),
                              headers=CIMultiDictProxy(CIMultiDict(headers or {})), body=body or b"")
        self.requests.append(request)
        try:
            answer = await wait_for(handler(request), timeout)
        except asyncio.TimeoutError as exc:
            raise BackendTimeout(f"{url}: no answer within {timeout} s") from exc
        except Reset as exc:
            raise BackendUnavailable(f"{url}: ServerDisconnectedError: {exc}", sent=exc.sent) from exc
        if reset is True:
            cause = ConnectionResetError("Server disconnected")
            raise BackendUnavailable(f"{url}: ServerDisconnectedError: {cause}", sent=True) from cause
        reply = FakeReply(request, answer, self.open_replies.discard)
        self.open_replies.add(reply)
        return reply

    async def exchange(self, method: str, url: str, *, body: bytes | None = None,
                       headers: Mapping[str, str] | None = None, timeout: float | None = 30.0) -> Answer:
        return await exchange(self, method, url, body=body, headers=headers, timeout=timeout)


def _base(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class FakeBackend:
    """A GLM-TTS backend in memory (a Handler): health, prompts, and TTS that takes ``delay_s``.

    ``gate``: when set, a TTS request waits until it is open (``gate.set()``). ``busy``: TTS
    requests being worked on now; ``tts_seen``: their bodies, in order of arrival. ``answer``:
    replaces the TTS answer (a 500, a body cut short, ...)."""

    def __init__(self, *, delay_s: float = 0.0, prompts: tuple[str, ...] = ("exampleA",),
                 answer: FakeAnswer | None = None) -> None:
        self.delay_s = delay_s
        self.prompts = prompts
        self.answer = answer
        self.gate: asyncio.Event | None = None
        self.busy = 0
        self.tts_seen: list[bytes] = []

    async def __call__(self, request: FakeRequest) -> FakeAnswer:
        path = request.path.split("?", 1)[0]
        if request.method == "GET" and path == "/api/v1/health":
            return _json({"status": "healthy", "model_loaded": True, "model_sample_rate": 24000,
                          "model_use_phoneme": False, "prompt_cache_count": len(self.prompts)})
        if request.method == "GET" and path == "/api/v1/prompts":
            return _json({"success": True, "prompts": [{"index": index} for index in self.prompts]})
        if request.method == "POST" and path == "/api/v1/tts":
            return await self._tts(request)
        return _json({"detail": "Not Found"}, 404)

    async def _tts(self, request: FakeRequest) -> FakeAnswer:
        self.tts_seen.append(request.body)
        self.busy += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay_s)
        finally:
            self.busy -= 1
        if self.answer is not None:
            return self.answer
        return success(seconds=0.1)


def success(*, seconds: float, sample_rate: int = 24000) -> FakeAnswer:
    """Upstream's success: a WAV of ``seconds`` of silence, base64 in JSON, serialised as FastAPI does."""
    wav = write_wav(b"\x00\x00" * int(sample_rate * seconds), sample_rate)
    return FakeAnswer(status=200, body=success_json(wav, sample_rate=sample_rate, generation_time=seconds))


def _json(payload: object, status: int = 200) -> FakeAnswer:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return FakeAnswer(status=status, body=body)
