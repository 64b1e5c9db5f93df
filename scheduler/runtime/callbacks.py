"""Callbacks: announcing a finished async task to the URL its client named in X-Callback-URL.

A callback is a request the sidecar makes on a client's behalf, so it must never reach what the
sidecar can reach and the client cannot (server-side request forgery). The rules:

1. **Strict URLs** (`parse_url`, in scheduler.config.callback_urls with the other pure rules): http
   or https; a host name (ASCII, internationalised names in their ``xn--`` form) or a literal IP
   address (IPv4 as a canonical dotted quad, IPv6 in brackets without a zone); an optional port; a
   path without dot segments, empty segments or encoded slashes; no user information, no fragment,
   no character outside RFC 3986 and at most `MAX_URL_CHARS`. The same parser reads the
   ``tasks.callbacks.allow`` entries at config load.
2. **Allow-list match** (`matches`): scheme, host and port (explicit or the scheme's default)
   equal, and the path under the entry's path on a segment boundary (``/tts`` covers ``/tts`` and
   ``/tts/x``, never ``/ttsx``).
3. **Global addresses only** (`classify`, `checked_addresses`): every address a host name resolves
   to must be global; loopback, private and every other non-global address is reachable only
   through an allow entry that names that address literally. The connection goes to exactly the
   addresses that were checked (`PinnedResolver`): there is no second lookup, so a DNS answer that
   changes between the check and the connection (rebinding) cannot redirect it, while the URL's
   host still names the server for the Host header, TLS SNI and certificate verification.
4. **No redirects**: a 3xx answer is a failed attempt, and the answer's body is never read.

Bodies are signed with ``tasks.callbacks.secret`` (`sign`): HMAC-SHA256 over
``timestamp + "." + body``, sent in `TIMESTAMP_HEADER` and `SIGNATURE_HEADER`.

`deliver` makes one callback, with retries and backoff, and says only whether it was delivered:
why an attempt failed (status, DNS answer, connection error) goes to the log, never to the
client, so a task's callback state cannot be used to probe what the sidecar can reach.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from glmtts.loop import wait_for
from scheduler.config.callback_urls import (
    MAX_URL_CHARS,
    AddressKind,
    CallbackURL,
    CallbackURLError,
    IPAddress,
    allowed_target,
    classify,
    entry_problem,
    matches,
    parse_url,
)

if TYPE_CHECKING:
    from scheduler.config import CallbacksConfig

__all__ = [
    "MAX_URL_CHARS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AddressKind",
    "AddressRefused",
    "CallbackURL",
    "CallbackURLError",
    "IPAddress",
    "Lookup",
    "PinnedResolver",
    "Sender",
    "allowed_target",
    "checked_addresses",
    "classify",
    "deliver",
    "entry_problem",
    "matches",
    "parse_url",
    "post_pinned",
    "sign",
    "system_lookup",
]

log = logging.getLogger("glmtts_sidecar.callbacks")

Lookup = Callable[[str, int], Awaitable[Sequence[IPAddress]]]
Sender = Callable[["CallbackURL", Sequence[IPAddress], bytes, Mapping[str, str], float], Awaitable[int]]

TIMESTAMP_HEADER = "X-GLMTTS-Timestamp"
SIGNATURE_HEADER = "X-GLMTTS-Signature"


class AddressRefused(Exception):
    """The callback URL's host name resolves to no address, or to one the sidecar must not reach."""


# --- addresses -----------------------------------------------------------------------------------


async def system_lookup(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for `host` (as aiohttp's own resolver asks for them)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_ADDRCONFIG)
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = ipaddress.ip_address(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
    return addresses


async def checked_addresses(target: CallbackURL, lookup: Lookup = system_lookup) -> list[IPAddress]:
    """The addresses a callback to `target` (already matched to an allow entry) may connect to.

    A literal address is its own answer: the entry it matched names it. A host name must resolve,
    and to global addresses only; AddressRefused says why not."""
    if target.address is not None:
        return [target.address]
    try:
        addresses = list(await lookup(target.host, target.port))
    except OSError as exc:
        raise AddressRefused(f"{target.host} does not resolve ({exc})") from None
    if not addresses:
        raise AddressRefused(f"{target.host} resolves to no address")
    for address in addresses:
        kind = classify(address)
        if kind is not AddressKind.GLOBAL:
            raise AddressRefused(f"{target.host} resolves to {address} ({kind.value}); a non-global address "
                                 "is reached only through an allow entry that names it literally")
    return addresses


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one callback: answers for `host` with exactly the addresses that were
    checked, never looks anything up, and answers nothing for any other name."""

    def __init__(self, host: str, addresses: Sequence[IPAddress]) -> None:
        self.host = host
        self.addresses = tuple(addresses)

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"no checked address for {host!r}")
        results: list[ResolveResult] = []
        for address in self.addresses:
            af = socket.AF_INET6 if isinstance(address, ipaddress.IPv6Address) else socket.AF_INET
            if family in (socket.AF_UNSPEC, af):
                results.append(ResolveResult(hostname=host, host=str(address), port=port, family=af, proto=0,
                                             flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not results:
            raise OSError(f"no checked address of family {family!r} for {host!r}")
        return results

    async def close(self) -> None:
        return None


# --- signing and delivery ------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``timestamp.body``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


async def post_pinned(target: CallbackURL, addresses: Sequence[IPAddress], body: bytes,
                      headers: Mapping[str, str], timeout_s: float) -> int:
    """POST `body` to `target` over a connection to one of `addresses`; the answer's status.

    Never follows a redirect, never reads the answer's body, ignores proxy settings in the
    environment and keeps no cookies."""
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(target.host, addresses), use_dns_cache=False,
                                     force_close=True, limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     trust_env=False, cookie_jar=aiohttp.DummyCookieJar()) as session, \
            session.post(URL(str(target), encoded=True), data=body, headers=dict(headers),
                         allow_redirects=False) as resp:
        return resp.status


async def deliver(config: CallbacksConfig, url: str, payload: Mapping[str, Any], *, label: str = "callback",
                  lookup: Lookup = system_lookup, send: Sender = post_pinned,
                  clock: Callable[[], float] = time.time,
                  sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> bool:
    """POST `payload` as signed JSON to `url`, retrying with backoff; True once an attempt got a 2xx.

    `url` is checked against ``config.allow`` again (the configuration may have changed since the
    task was submitted): a URL it refuses gets no attempt. An attempt fails on a host name that
    does not resolve or resolves to a non-global address, a connection or TLS error, a timeout
    (``config.timeout_s`` for lookup, connection and answer together) or any status outside 2xx,
    3xx included. Each failure is logged with `label`; the caller learns only the outcome."""
    try:
        target = allowed_target(config.allow, url)
    except CallbackURLError as exc:
        log.warning("%s: callback not attempted: its URL %s", label, exc)
        return False
    if config.secret is None:  # the config refuses allow entries without a secret
        log.warning("%s: callback not attempted: tasks.callbacks.secret is not set", label)
        return False
    secret = config.secret.get_secret_value()
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    delay = config.backoff_s
    for attempt in range(1, config.attempts + 1):
        try:
            why = await wait_for(_attempt(target, body, secret, config.timeout_s, lookup, send, clock),
                                 config.timeout_s)
        except AddressRefused as exc:
            why = str(exc)
        except asyncio.TimeoutError:
            why = f"no answer within {config.timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            why = str(exc) or exc.__class__.__name__
        if why is None:
            return True
        log.warning("%s: callback attempt %d of %d to %s failed (%s)", label, attempt, config.attempts,
                    target.for_log(), why)
        if attempt < config.attempts:
            await sleep(delay)
            delay *= 2
    return False


async def _attempt(target: CallbackURL, body: bytes, secret: str, timeout_s: float, lookup: Lookup,
                   send: Sender, clock: Callable[[], float]) -> str | None:
    """None when the receiver answered 2xx, else why not."""
    addresses = await checked_addresses(target, lookup)
    timestamp = int(clock())
    headers = {"Content-Type": "application/json", "User-Agent": "glmtts-sidecar",
               TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}
    status = await send(target, addresses, body, headers, timeout_s)
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status}; redirects are not followed"
    return f"HTTP {status}"
