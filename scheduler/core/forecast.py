"""When a job would start: what admission weighs (``outlook``) and what status shows.

``Forecaster.forecast`` runs the dispatch step (scheduler.core.dispatch_step) forward in simulated
time on a copy of the scheduler's queue (docs/scheduling.md, "Admission"); the predicted wait
stretches that by the work that keeps arriving in higher bands (``AdmittedWork``). A forecaster
reads what the scheduler holds and changes none of it, except that reading a rate brings the
decay of ``AdmittedWork`` up to date (which changes no rate).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from scheduler.core.admission import Outlook
from scheduler.core.classes import RATE_WINDOW_S, ClassShares
from scheduler.core.dispatch_step import Demand, DispatchStep, Pool, load
from scheduler.core.queue import FairQueue, Job, JobQueue, ModelKey
from scheduler.core.running import BackendView, Running

# How many queued jobs a forecast may look at, over all its simulated dispatch decisions, before it
# stops: enough for queues of a few hundred jobs; past it, the wait reached so far is a lower bound.
FORECAST_VISITS = 5_000
# A band never counts on less than this share of the pool: the rest may go to higher bands.
MIN_BAND_SHARE = 0.1


@dataclass(frozen=True, kw_only=True)
class Forecast:
    """When a job would be dispatched if nothing else arrived and service times were as predicted."""

    start_s: float  # seconds from now until it is dispatched
    at_once: bool  # ``schedule(now)`` would dispatch it: a slot it may use is free and nothing goes first
    reload: bool = False  # its backend loads its model configuration first
    bound: bool = False  # the forecast stopped early (FORECAST_VISITS): start_s is a lower bound


class AdmittedWork:
    """Admitted work per band (predicted seconds), decayed over RATE_WINDOW_S: how fast work
    arrives that goes ahead of a job of a lower band while it waits."""

    def __init__(self) -> None:
        self._work: dict[int, float] = {}
        self._at: float | None = None  # what ``_work`` is decayed to
        self._since: float | None = None  # the first admission: how long rates have been measured

    def copy(self) -> AdmittedWork:
        admitted = AdmittedWork()
        admitted._work, admitted._at, admitted._since = dict(self._work), self._at, self._since
        return admitted

    def note(self, job: Job, now: float) -> None:
        """``job`` was admitted at ``now``."""
        self._decay(now)
        self._work[job.band] = self._work.get(job.band, 0.0) + job.predicted_s

    def rate(self, now: float, *, above_band: int) -> float:
        """Predicted seconds of work admitted per second into bands higher than ``above_band``
        (0 = highest), averaged over about RATE_WINDOW_S."""
        self._decay(now)
        if self._since is None:
            return 0.0
        elapsed = now - self._since
        if elapsed <= 0:
            return 0.0
        # The decayed sum of a steady rate r is r * window * (1 - exp(-elapsed / window)).
        horizon = RATE_WINDOW_S * -math.expm1(-elapsed / RATE_WINDOW_S)
        if horizon <= 0:  # elapsed so small that the window underflows: no rate measured yet
            return 0.0
        return sum(work for band, work in self._work.items() if band < above_band) / horizon

    def _decay(self, now: float) -> None:
        if self._at is None:
            self._at = self._since = now
            return
        if now > self._at:
            factor = math.exp(-(now - self._at) / RATE_WINDOW_S)
            self._work = {band: work * factor for band, work in self._work.items()}
            self._at = now


@dataclass(frozen=True, kw_only=True)
class Forecaster:
    """Predictions over what a scheduler holds: its queue, its running jobs, its class shares and
    admitted work; ``step`` decides as the scheduler does, ``expires_at`` is when a queued job
    leaves unserved, ``tenant_max`` how many of a job's tenant may wait."""

    queue: JobQueue
    running: Mapping[str, Running]
    shares: ClassShares
    admitted: AdmittedWork
    step: DispatchStep
    expires_at: Callable[[Job], float]
    tenant_max: Callable[[Job], int]

    def outlook(self, job: Job, now: float, backends: Sequence[BackendView], *, wait: bool = True) -> Outlook:
        """What admission needs to know about ``job`` if it were admitted now. ``wait`` False
        skips its forecast (``wait_s`` 0, ``starts_now`` False) where admission will not read
        them: deadlines are not enforced, or a bound of the queue is reached."""
        ready = [b for b in backends if b.ready]
        tenant_max = self.tenant_max(job)
        tenant_queued = self.queue.tenant_depth(job.tenant)
        next_free = self._next_free_s(ready, now)
        forecast = self.forecast(job, now, backends) if wait else Forecast(start_s=0.0, at_once=False)
        tenant_next = next_free
        if tenant_queued >= tenant_max:  # only a full tenant's answer needs when its head leaves
            tenant_next = max(next_free, self._tenant_head_wait_s(job.tenant, now, backends))
        return Outlook(
            can_serve=any(b.alive for b in backends),
            queued=len(self.queue),
            max_queued=self.queue.max_size,
            tenant_queued=tenant_queued,
            tenant_max=tenant_max,
            wait_s=self._wait_s(forecast, job, now, ready),
            starts_now=forecast.at_once,
            idle=not self.running and not len(self.queue),
            confirmed=self.step.cost.confirmed(job.model_key),
            service_s=job.predicted_s,
            budget_s=job.deadline_at - now,
            next_free_s=next_free,
            tenant_next_s=tenant_next,
        )

    def _next_free_s(self, ready: Sequence[BackendView], now: float) -> float:
        """Predicted seconds until the queue can move: a slot is free and nothing waits for one,
        else the earliest predicted end of running work (a free slot that queued jobs cannot use,
        because of a class cap or affinity, does not count)."""
        in_flight, _ = load(now, self.running)
        if any(in_flight[b.id] < b.slots for b in ready) and not len(self.queue):
            return 0.0
        left = [r.left_s(now) for r in self.running.values()]
        return min(left) if left else 1.0

    def predicted_wait_s(self, job: Job, now: float, backends: Sequence[BackendView]) -> float:
        """Seconds until ``job`` (queued, or about to be offered) is predicted to begin its service:
        its ``forecast``, stretched by the work that keeps arriving in higher bands meanwhile, plus
        a model reload when its backend needs one."""
        ready = [b for b in backends if b.ready]
        return self._wait_s(self.forecast(job, now, backends), job, now, ready)

    def _wait_s(self, forecast: Forecast, job: Job, now: float, ready: Sequence[BackendView]) -> float:
        reload = self.step.cost.reload_s if forecast.reload else 0.0
        return forecast.start_s * self._arrivals_factor(job, now, ready) + reload

    def _arrivals_factor(self, job: Job, now: float, ready: Sequence[BackendView]) -> float:
        """The forecast knows only the work there is now. Work admitted later into higher bands
        goes first too: arriving at ``r`` predicted seconds per second into a pool of ``S`` slots,
        it leaves ``S - r`` for the work ahead of the job, which therefore takes ``S / (S - r)``
        times as long to drain (``S - r`` never counted below a tenth of ``S``)."""
        if not isinstance(self.queue, FairQueue):
            return 1.0
        band = self.queue.effective_band(job, now)
        if band == 0:
            return 1.0
        slots = max(1, sum(b.slots for b in ready))
        higher = self.admitted.rate(now, above_band=band)
        return slots / max(slots - higher, slots * MIN_BAND_SHARE)

    def forecast(self, job: Job, now: float, backends: Sequence[BackendView]) -> Forecast:
        """When ``job`` (queued, or about to be offered) would be dispatched if nothing else arrived
        and every running job took exactly its predicted time.

        The dispatch step (``DispatchStep.pick``) runs over simulated time on a copy of the queue:
        each running job frees its slot at its predicted end, each dispatched one holds its slot
        for its prediction, queued jobs leave at ``expires_at``; the jobs dispatched before it,
        in the order and onto the slots the dispatcher would use (bands, fair queueing, class
        caps and extra slots, model-configuration affinity and reloads), decide when it starts.
        Completions and deadlines at the same instant all happen before that instant's dispatch.
        With no ready backend, the ones starting are taken as ready now (their start-up time is
        not known); with none alive, one slot loaded for the job stands in."""
        ready = [b for b in backends if b.ready]
        at_once = bool(ready)  # with stand-ins, nothing starts at once
        if not ready:
            ready = [replace(b, ready=True) for b in backends if b.alive]
        if not ready:
            ready = [BackendView(id="", ready=True, alive=True, slots=1, model_key=job.model_key)]
        pool = Pool(ready)
        queue = self.queue.copy()
        target = job
        if job.id not in {q.id for q in queue.jobs()}:
            target = replace(job, seq=0)
            queue.push(target, now, force=True)  # numbered as the real queue will number it
        running = dict(self.running)
        loaded: dict[str, ModelKey | None] = {b.id: b.model_key for b in ready}
        demand = Demand(queue.jobs())
        shares = self.shares.copy()
        ends = [(r.ends_at, r.job.id) for r in running.values()]
        heapq.heapify(ends)
        expiries = [(self.expires_at(q), q.seq, q.id) for q in queue.jobs() if q is not target]
        heapq.heapify(expiries)
        visits = 0

        def counted(jobs: Iterable[Job]) -> Iterator[Job]:
            nonlocal visits
            for queued in jobs:
                visits += 1
                yield queued

        step = self.step
        t = now
        while True:
            while (chosen := step.pick(t, pool, running, loaded, counted(queue.candidates(t)), demand,
                                       shares)) is not None:
                if chosen.job is target:
                    return Forecast(start_s=t - now, at_once=at_once, reload=chosen.reload)
                if visits > FORECAST_VISITS:  # a queue of thousands: stop at a lower bound
                    return Forecast(start_s=t - now, at_once=False, bound=True)
                queue.take(chosen.job, t)
                demand.remove(chosen.job)
                shares.note(chosen.job.cls, chosen.job.predicted_s, step.classes, len(ready))
                run = running[chosen.job.id] = step.run(chosen, t)
                heapq.heappush(ends, (run.ends_at, chosen.job.id))
                loaded[chosen.backend_id] = chosen.job.model_key
            at_once = False
            following = min(ends[0][0] if ends else math.inf, expiries[0][0] if expiries else math.inf)
            if math.isinf(following):
                # Nothing runs, nothing is dispatched: no backend has a slot (a limit of 0). A finite
                # answer still: everything queued ahead of it, one job after the other.
                return Forecast(start_s=t - now + sum(q.predicted_s for q in queue.jobs() if q is not target),
                                at_once=False)
            t = max(t, following)
            while ends and ends[0][0] <= t:
                running.pop(heapq.heappop(ends)[1], None)
            while expiries and expiries[0][0] <= t:
                gone = queue.remove(heapq.heappop(expiries)[2])
                if gone is not None:
                    demand.remove(gone)

    def _tenant_head_wait_s(self, tenant: str, now: float, backends: Sequence[BackendView]) -> float:
        heads = [q for q in self.queue.jobs() if q.tenant == tenant]
        if not heads:
            return 0.0
        head = min(heads, key=lambda q: q.seq)
        return self.predicted_wait_s(head, now, backends)
