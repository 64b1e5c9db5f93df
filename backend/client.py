"""Talking HTTP to backends: forward a request's bytes, stream or read the answer.

Connection errors are mapped in exactly one place to BackendUnavailable, which says whether
the request may have reached the backend (it matters for what a retry costs, not whether one is
allowed: a TTS request is idempotent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

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
    status: int
    headers: Mapping[str, str]
    body: bytes


class BackendClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE_S)
        # Bodies are passed through untouched: no automatic decompression.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("BackendClient used before start()")
        return self._session

    async def open(self, method: str, url: str, *, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None, timeout: float | None = None
                   ) -> aiohttp.ClientResponse:
        """Send a request and return once the answer's headers arrived; the caller releases it."""
        try:
            return await self.session.request(
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

    async def exchange(self, method: str, url: str, *, body: bytes | None = None,
                       headers: Mapping[str, str] | None = None, timeout: float | None = 30.0) -> Answer:
        """A whole exchange for small answers (admin, prompts, health)."""
        resp = await self.open(method, url, body=body, headers=headers, timeout=timeout)
        try:
            data = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BackendUnavailable(f"{url}: answer cut short: {exc}", sent=True) from exc
        finally:
            resp.release()
        return Answer(status=resp.status, headers=dict(resp.headers), body=data)
