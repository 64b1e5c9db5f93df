"""TTS through the result cache, shared by /api/v1/tts and /v1/audio/speech (when ``cache.enabled``).

After intake (validation, tenant attribution, limits: a hit goes through it too), the request's
key is looked up (scheduler.runtime.cache.request_key). A hit is answered from the cache without a
queue place or a backend slot. Otherwise the request joins the synthesis of an identical request
in flight, or starts one: admitted, queued and forwarded as any request, in a task of its own that
the client leaving does not cancel, the backend's answer read whole and, when it is upstream's
success, stored. Every request is counted and logged once, as its own: the one that ran the
synthesis by that task, the others (hits, shared) here, with the answer they got. A request
sharing a synthesis keeps its own deadline: past it, it gets upstream's 408 as an expired request
does, while the synthesis goes on for the others.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from backend.transport import BackendTimeout, BackendUnavailable
from glmtts.responses import succeeded
from scheduler.errors import BackendFailed, SidecarError
from scheduler.http.middleware import REQUEST_ID
from scheduler.runtime.cache import CachedAnswer, StoppedWaiting, request_key
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import Exchange, Intake, Outcome, expired

__all__ = ["HIT", "MISS", "SHARED", "CachedTTS", "Synthesis"]

HIT, MISS, SHARED = "hit", "miss", "shared"  # X-Cache, and the cache metric's result label
PASSED_HEADERS = ("Content-Type", "Allow", "Retry-After")  # as scheduler.http.tts passes them on


@dataclass(frozen=True, kw_only=True)
class Synthesis:
    """A backend's whole answer (or the cache's copy of one), and how it was got."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    ok: bool = True
    outcome: str = "ok"  # the access log's outcome of the request that ran it
    backend: str | None = None  # None: from the cache
    queue_s: float = 0.0
    service_s: float | None = None


class CachedTTS:
    def __init__(self, runtime: Runtime, exchange: Exchange) -> None:
        self.runtime = runtime
        self.exchange = exchange

    async def answer(self, intake: Intake) -> tuple[Synthesis, str]:
        """The answer to ``intake``'s request and where it came from (HIT, MISS, SHARED); or the
        SidecarError of the synthesis (every request sharing it gets the same)."""
        runtime, job = self.runtime, intake.job
        tts = intake.tts
        cache = runtime.cache
        index = tts.index or None
        generation = cache.generation(index)
        tenant = None if runtime.config.cache.shared else job.tenant
        # The prompt as the backends last reported it: one changed past the sidecar misses once seen.
        prompt_config = runtime.prompts.digest(index) if index else None
        key = (request_key(tts, tenant=tenant, generation=generation, prompt_config=prompt_config)
               if tts.prompt_audio is None else await asyncio.to_thread(
                   request_key, tts, tenant=tenant, generation=generation, prompt_config=prompt_config))
        stored = cache.get(key)
        if stored is not None:
            runtime.metrics.cache_request(HIT)
            synthesis = Synthesis(status=stored.status, body=stored.body,
                                  headers={"Content-Type": stored.content_type})
            self._report(intake, synthesis, HIT)
            return synthesis, HIT
        flight, leads = cache.flight(key, lambda: self._synthesise(intake, key, index, generation))
        runtime.metrics.cache_request(MISS if leads else SHARED)
        if leads:
            return await flight.result(), MISS  # the flight reports its own request
        record = Outcome(request_id=intake.request_id, reason="cache_shared")
        left = job.deadline_at - runtime.dispatcher.clock()
        try:
            # Its own deadline, not the first request's: past it, its 408; the synthesis goes on.
            synthesis = await flight.result(within=None if math.isinf(left) else left)
        except StoppedWaiting:
            error = expired(job)
            record.status, record.outcome, record.reason = error.status, "rejected", error.reason
            self.exchange.report(job, record, intake.arrived)
            raise error from None
        except SidecarError as exc:  # the synthesis' own failure, answered to each request sharing it
            record.status, record.outcome = exc.status, "rejected"
            self.exchange.report(job, record, intake.arrived)
            raise
        except asyncio.CancelledError:  # this client left; the synthesis goes on for the others
            record.outcome = "client_gone"
            self.exchange.report(job, record, intake.arrived)
            raise
        self._report(intake, synthesis, SHARED)
        return synthesis, SHARED

    def _report(self, intake: Intake, synthesis: Synthesis, how: str) -> None:
        record = Outcome(request_id=intake.request_id, status=synthesis.status, outcome=synthesis.outcome,
                         reason=f"cache_{how}", backend=synthesis.backend)
        self.exchange.report(intake.job, record, intake.arrived)

    async def _synthesise(self, intake: Intake, key: str, index: str | None, generation: tuple[int, int]) -> Synthesis:
        """One synthesis, as an uncached request runs it but read whole; stored when it succeeds."""
        runtime, job = self.runtime, intake.job
        record = Outcome(request_id=intake.request_id)
        headers = {"Content-Type": intake.content_type, REQUEST_ID: intake.request_id}
        try:
            future = self.exchange.admit(job)
            async with await self.exchange.forward(job, future, intake.body, headers, record) as answered:
                reply = answered.reply
                record.status = reply.status
                try:
                    body = await reply.read()
                except (BackendUnavailable, BackendTimeout) as exc:
                    record.outcome = "backend_cut"
                    runtime.pool.report_failure(answered.backend, f"answer cut short: {exc}")
                    raise BackendFailed(f"The backend's answer was cut short: {exc}") from None
                ok = succeeded(reply.status, body)
                answered.finish(ok)
                passed = {name: reply.headers[name] for name in PASSED_HEADERS if name in reply.headers}
                synthesis = Synthesis(status=reply.status, body=body, headers=passed, ok=ok, outcome=record.outcome,
                                      backend=answered.backend.id, queue_s=record.queue_s, service_s=record.service_s)
        except SidecarError as exc:
            if record.outcome == "ok":
                record.status, record.outcome, record.reason = exc.status, "rejected", exc.reason
            raise
        except asyncio.CancelledError:  # only at exit: a client leaving does not cancel a flight
            record.outcome, record.reason = "client_gone", "shutdown"
            raise
        finally:
            self.exchange.report(job, record, intake.arrived)
        if ok:
            answer = CachedAnswer(status=reply.status, content_type=passed.get("Content-Type", "application/json"),
                                  body=body)
            runtime.cache.put(key, answer, index=index, generation=generation)
        return synthesis
