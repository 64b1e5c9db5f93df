"""Everything before a TTS request is queued, shared by /api/v1/tts, /api/v1/tasks and /v1/audio/speech.

The body is read (bounded in size and time) and validated at the edge -- upstream's exact error,
no backend touched -- then attributed to a tenant and a priority band and given its job. A
request refused here raises the error to answer, counted in the metrics as refused at the edge.

A route whose clients send another body (the OpenAI API's JSON) passes a ``translate`` that turns
the bytes read into upstream's form; the form is then validated, attributed and limited exactly as
a client's own form would be, so both APIs share admission, queueing, deadlines and metrics.

An attributed request over its tenant's request rate (``tenants.*.rate``; scheduler.runtime.ratelimit)
is refused last, with 429 ``rate_limited`` and the seconds until the tenant may send again: a
request refused for anything else takes none of its tenant's rate.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from glmtts.contract import TTSRequest, check_tts, parse_tts_form
from glmtts.errors import HTTPDetailError
from glmtts.form import parse_form
from glmtts.loop import wait_for
from glmtts.text import units
from scheduler.core.deadlines import client_budget
from scheduler.core.tenants import DEFAULT_TENANT, TenantError
from scheduler.errors import (
    BadHeader,
    BadTimeout,
    BodyTimeout,
    Draining,
    NotAttributed,
    PayloadTooLarge,
    RateLimited,
    SidecarError,
)
from scheduler.http.middleware import request_id_of, too_large_body
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import Intake
from scheduler.runtime.metrics import UNKNOWN_CLASS, classify
from scheduler.runtime.ratelimit import rate_of

__all__ = ["FANOUT_HEADER", "INLINE_PARSE_BYTES", "Translate", "fanout_choice", "read_intake"]

FANOUT_HEADER = "X-Fanout"  # on|off: split this request's text over free backends, or never (docs/fanout.md)

INLINE_PARSE_BYTES = 256 * 1024  # bodies up to this size are parsed on the event loop

# The body a client sent -> (upstream's form body, its Content-Type); raises the SidecarError refusing it.
Translate = Callable[[bytes], Awaitable[tuple[bytes, str]]]


async def read_intake(runtime: Runtime, request: web.Request, *, budget_s: float | None = None,
                      translate: Translate | None = None, unknown_key_is_default: bool = False) -> Intake:
    """Read and validate the body, attribute it, and make its job; or raise the error that refuses
    it (counted). ``budget_s``: the deadline budget instead of the policy's (async tasks).
    ``translate``: how the body read becomes upstream's form (None: it is one).
    ``unknown_key_is_default``: scheduler.core.tenants' leniency for APIs whose clients always send a key."""
    arrived = runtime.dispatcher.clock()
    cls = UNKNOWN_CLASS  # known once the text is
    tenant = DEFAULT_TENANT  # the metrics name a refused request's tenant only when its rate refused it
    try:
        body, content_type, tts = await _read_valid(runtime, request, translate)
        limits = runtime.config.limits
        cls = runtime.scheduler.classes.of(tts.chars).name
        if tts.chars > limits.max_text_chars:
            raise PayloadTooLarge(f"input_text is {tts.chars} characters; the limit is {limits.max_text_chars}",
                                  limit=limits.max_text_chars)
        try:
            who = runtime.tenants.attribute(authorization=request.headers.get("Authorization"),
                                            tenant_header=request.headers.get("X-Tenant"),
                                            priority_header=request.headers.get("X-Priority"),
                                            unknown_key_is_default=unknown_key_is_default)
            client = _client_budget(runtime, request)
            choice = fanout_choice(request)
        except TenantError as exc:
            raise NotAttributed(exc.status, exc.reason, exc.detail) from None
        except ValueError as exc:
            raise BadTimeout(str(exc)) from None
        tenant = who.tenant.name
        await _within_rate(runtime, tenant)
    except (SidecarError, HTTPDetailError) as exc:
        # Answered at the edge, before the request became a job.
        runtime.metrics.request_finished(cls=cls, tenant=tenant, outcome=classify(exc.status, "refused"),
                                         total_s=runtime.dispatcher.clock() - arrived)
        raise
    # Job ids are ours: clients may reuse an X-Request-ID, the scheduler needs unique keys.
    job = runtime.scheduler.make_job(
        id=uuid.uuid4().hex, chars=tts.chars, units=units(tts.input_text), model_key=tts.model_key, now=arrived,
        tenant=who.tenant.name, weight=who.tenant.weight, band=who.band, tenant_bound=who.tenant.max_queued,
        client_budget_s=client, budget_s=budget_s)
    return Intake(request_id=request_id_of(request), arrived=arrived, body=body, content_type=content_type,
                  tts=tts, job=job, fanout=choice)


async def _read_valid(runtime: Runtime, request: web.Request,
                      translate: Translate | None) -> tuple[bytes, str, TTSRequest]:
    """(upstream's form body, its Content-Type, the parsed TTS request), or the error that refuses them."""
    if runtime.draining:
        runtime.metrics.draining_rejection()
        raise Draining("The sidecar is shutting down; send new requests elsewhere",
                       retry_after=runtime.config.shutdown.drain_timeout_s)
    limits = runtime.config.limits
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise too_large_body(limits.max_body_bytes)
    try:
        body = await wait_for(_read_body(request, limits.max_body_bytes), limits.body_timeout_s)
    except web.HTTPRequestEntityTooLarge:
        raise too_large_body(limits.max_body_bytes) from None
    except asyncio.TimeoutError:
        raise BodyTimeout(f"The request body did not arrive within {limits.body_timeout_s:g} s") from None
    content_type = request.headers.get("Content-Type")
    if translate is not None:
        body, content_type = await translate(body)
    # A big body is parsed off the event loop: hostile multipart must not stall other requests.
    form = (parse_form(content_type, body) if len(body) <= INLINE_PARSE_BYTES
            else await asyncio.to_thread(parse_form, content_type, body))
    tts = parse_tts_form(form)
    check_tts(tts, prompts=None)
    if tts.index and not await runtime.prompts.has(tts.index):
        check_tts(tts, prompts={})  # upstream's 404 for an index no backend knows
    return body, content_type or "", tts


async def _within_rate(runtime: Runtime, tenant: str) -> None:
    """Take one of the tenant's requests from its rate, cluster-wide when tasks are in Redis; or
    raise RateLimited with the seconds until it may send again."""
    rate = rate_of(runtime.config.tenants, tenant)
    if rate is None:
        return
    wait = await runtime.rates.take(tenant, rate, link=runtime.redis, cluster=runtime.config.tasks.redis.cluster)
    if wait is not None:
        runtime.metrics.rate_limited_rejection()
        raise RateLimited(f"Tenant {tenant!r} is over its request rate ({rate.per_s:g} per second, bursts of "
                          f"{rate.burst}); retry in {wait:.2f} s", retry_after=wait)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, holding at most the limit plus one chunk (aiohttp's ``read`` lets its
    buffer grow to the limit on top); HTTPRequestEntityTooLarge as soon as it is over."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(limit, size)
        chunks.append(chunk)
    return b"".join(chunks)


def _client_budget(runtime: Runtime, request: web.Request) -> float | None:
    header = request.headers.get("X-Request-Timeout")
    if header is None or not runtime.config.deadlines.client_header:
        return None
    return client_budget(float("inf"), header)


def fanout_choice(request: web.Request) -> bool | None:
    """The client's ``X-Fanout``: True (on), False (off), None (absent: the configuration decides);
    any other value is a 400 naming the header."""
    value = request.headers.get(FANOUT_HEADER)
    if value is None:
        return None
    choice = {"on": True, "off": False}.get(value.strip().lower())
    if choice is None:
        raise BadHeader(f"{FANOUT_HEADER} must be 'on' or 'off'; got {value[:40]!r}")
    return choice
