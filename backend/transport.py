"""Talking HTTP to backends: one seam, ``Transport``, for every request the sidecar sends them.

The proxy's forwarded TTS requests, the admin reads and writes, health probes and warm-ups all
go through one ``Transport``: ``AiohttpTransport`` over the network, or backend.fake's
``FakeTransport`` in memory. Connection errors are mapped in exactly one place to
BackendUnavailable, which says whether the request may have reached the backend (it matters for
what a retry costs, not whether one is allowed: a TTS request is idempotent), and BackendTimeout.
Reading an answer's body fails the same way: BackendUnavailable (cut short) or BackendTimeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

__all__ = ["CLIENT_KEEPALIVE_S", "AiohttpTransport", "Answer", "BackendTimeout", "BackendUnavailable", "Reply",
           "Transport", "exchange"]

# uvicorn closes idle keep-alive connections after 5 s; ours close first, so we never send a
# request on a connection the backend is closing at that moment.
CLIENT_KEEPALIVE_S = 3.0


class BackendUnavailable(Exception):
    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent  # the request may have reached the backend


class BackendTimeout(Exception):
    pass


@dataclass(frozen=True, kw_only=True)
class Answer:
    """A whole answer, read: for small ones (admin, prompts)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Reply(Protocol):
    """An answer whose headers arrived; its body is read once, whole or in chunks. The holder
    calls ``release`` (no await: a caller being cancelled can still give the connection back)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> Mapping[str, str]: ...  # case-insensitive

    @property
    def content_length(self) -> int | None: ...

    async def read(self) -> bytes: ...

    def iter_chunked(self, size: int) -> AsyncIterator[bytes]: ...

    def release(self) -> None: ...


class Transport(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def open(self, method: str, url: str, *, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None,
                   fresh: bool = False) -> Reply:
        """Send a request and return once the answer's headers arrived; the caller releases it.
        ``timeout``: for the headers (None: no limit). ``fresh``: on a new connection, closed after
        (health probes: a pooled connection may lead to a process that has since died)."""
        ...

    async def exchange(self, method: str, url: str, *, body: bytes | None = None,
                       headers: Mapping[str, str] | None = None, timeout: float | None = 30.0) -> Answer:
        """A whole exchange for small answers (admin, prompts)."""
        ...


async def exchange(transport: Transport, method: str, url: str, *, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None, timeout: float | None = 30.0) -> Answer:
    """``Transport.exchange`` in terms of ``open``: what every transport does."""
    reply = await transport.open(method, url, body=body, headers=headers, timeout=timeout)
    try:
        data = await reply.read()
    except (BackendUnavailable, BackendTimeout) as exc:
        raise BackendUnavailable(f"{url}: answer cut short: {exc}", sent=True) from exc
    finally:
        reply.release()
    return Answer(status=reply.status, headers=dict(reply.headers), body=data)


class AiohttpReply:
    """aiohttp's ClientResponse as a Reply: body errors mapped as the transport maps them."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def reason(self) -> str | None:
        return self._response.reason

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def content_length(self) -> int | None:
        return self._response.content_length

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise _body_error(exc) from exc

    async def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        chunks = self._response.content.iter_chunked(size)
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
                raise _body_error(exc) from exc
            yield chunk

    def release(self) -> None:
        self._response.release()


def _body_error(exc: BaseException) -> Exception:
    """A failure while reading a body, mapped; its text stays the underlying error's."""
    if isinstance(exc, asyncio.TimeoutError):
        return BackendTimeout(str(exc))
    return BackendUnavailable(str(exc), sent=True)


class AiohttpTransport:
    """The network transport: one pooled session (kept alive shorter than uvicorn keeps it) and
    one that opens a new connection per request (``fresh``)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE_S)
        # Bodies are passed through untouched: no automatic decompression.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None))
        self._fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0))

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("AiohttpTransport used before start()")
        return self._session

    async def open(self, method: str, url: str, *, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None,
                   fresh: bool = False) -> Reply:
        session = self.session if not fresh or self._fresh is None else self._fresh
        try:
            response = await session.request(
                method, url, data=body, headers=dict(headers or {}), allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout, sock_read=None))
        except (aiohttp.ClientConnectorError, aiohttp.ClientConnectionResetError) as exc:
            raise BackendUnavailable(f"{url}: {exc}", sent=False) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise BackendUnavailable(f"{url}: {exc.__class__.__name__}: {exc}", sent=True) from exc
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout(f"{url}: no answer within {timeout} s") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"{url}: {exc.__class__.__name__}: {exc}", sent=True) from exc
        return AiohttpReply(response)

    async def exchange(self, method: str, url: str, *, body: bytes | None = None,
                       headers: Mapping[str, str] | None = None, timeout: float | None = 30.0) -> Answer:
        return await exchange(self, method, url, body=body, headers=headers, timeout=timeout)
