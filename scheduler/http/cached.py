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

from scheduler.errors import SidecarError
from scheduler.http.middleware import REQUEST_ID
from scheduler.runtime.cache import CachedAnswer, StoppedWaiting, request_key
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import Exchange, Intake, Outcome, Whole, expired
from scheduler.runtime.fanout import decide, synthesize

__all__ = ["HIT", "MISS", "SHARED", "CachedTTS"]

HIT, MISS, SHARED = "hit", "miss", "shared"  # X-Cache, and the cache metric's result label


class CachedTTS:
    def __init__(self, runtime: Runtime, exchange: Exchange) -> None:
        self.runtime = runtime
        self.exchange = exchange

    async def answer(self, intake: Intake) -> tuple[Whole, str]:
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
        # A request that may be split may be answered with joined pieces: those are keyed apart
        # from whole answers, by how they are joined (one that may not is never answered with them).
        fanout = runtime.config.fanout
        split = intake.fanout if intake.fanout is not None else fanout.enabled
        fan_out = {"crossfade_s": fanout.crossfade_s, "pause_s": fanout.pause_s} if split else None
        key = (request_key(tts, tenant=tenant, generation=generation, prompt_config=prompt_config, fan_out=fan_out)
               if tts.prompt_audio is None else await asyncio.to_thread(
                   request_key, tts, tenant=tenant, generation=generation, prompt_config=prompt_config,
                   fan_out=fan_out))
        stored = cache.get(key)
        if stored is not None:
            runtime.metrics.cache_request(HIT)
            whole = Whole(status=stored.status, body=stored.body, headers={"Content-Type": stored.content_type})
            self._report(intake, whole, HIT)
            return whole, HIT
        flight, leads = cache.flight(key, lambda: self._synthesise(intake, key, index, generation))
        runtime.metrics.cache_request(MISS if leads else SHARED)
        if leads:
            return await flight.result(), MISS  # the flight reports its own request
        record = Outcome(request_id=intake.request_id, reason="cache_shared")
        left = job.deadline_at - runtime.dispatcher.clock()
        try:
            # Its own deadline, not the first request's: past it, its 408; the synthesis goes on.
            whole = await flight.result(within=None if math.isinf(left) else left)
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
        self._report(intake, whole, SHARED)
        return whole, SHARED

    def _report(self, intake: Intake, whole: Whole, how: str) -> None:
        record = Outcome(request_id=intake.request_id, status=whole.status, outcome=whole.outcome,
                         reason=f"cache_{how}", backend=whole.backend)
        self.exchange.report(intake.job, record, intake.arrived)

    async def _synthesise(self, intake: Intake, key: str, index: str | None, generation: tuple[int, int]) -> Whole:
        """One synthesis, as an uncached request runs it (whole, or split: scheduler.runtime.fanout) but
        read whole; stored when it succeeds."""
        runtime, job = self.runtime, intake.job
        record = Outcome(request_id=intake.request_id)
        # Cancelled only at exit: a client leaving does not cancel a flight.
        with self.exchange.reporting(job, record, intake.arrived, gone="shutdown"):
            plan = decide(runtime, intake, choice=intake.fanout)
            whole = await synthesize(runtime, self.exchange, intake, record, {REQUEST_ID: intake.request_id}, plan)
            record.status = whole.status
        if whole.ok:
            answer = CachedAnswer(status=whole.status,
                                  content_type=whole.headers.get("Content-Type", "application/json"), body=whole.body)
            runtime.cache.put(key, answer, index=index, generation=generation)
        return whole
