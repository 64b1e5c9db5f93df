"""The scheduler: admission, the queue, class caps and dispatch, as one pure state machine.

No I/O and no clock of its own: the async edge (scheduler.dispatcher) calls in with ``now`` and
a snapshot of the backends, and applies what comes back. Every admitted job ends in exactly one
of: taken back by ``cancel`` (client gone), returned by ``expire`` (deadline passed while
queued), or dispatched by ``schedule`` and later closed by ``finish``. A dispatched job holds its
backend slot until ``finish``, even when its client was already answered 408, because GLM-TTS
cannot cancel work: that orphaned time is counted.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler.admission import Outlook, Rejection, admit
from scheduler.cost import CostModel
from scheduler.deadlines import DeadlinePolicy
from scheduler.dispatch import Candidate, choose_backend
from scheduler.queue import FairQueue, Job, JobQueue, ModelKey, QueueFullError, WithinTenant


@dataclass(frozen=True, kw_only=True)
class ClassRule:
    name: str
    max_chars: int | None  # None: no upper bound (the last class)
    max_in_service: int | None = None  # pool-wide cap on jobs of this class in service
    band: int | None = None  # its jobs queue in this band or a higher one (0 = highest); None: as asked
    extra_slots: int = 0  # its jobs may run on a backend this many beyond the backend's slots


class LengthClasses:
    def __init__(self, rules: Sequence[ClassRule]) -> None:
        if not rules or rules[-1].max_chars is not None:
            raise ValueError("the last length class must have no max_chars")
        self.rules = tuple(rules)

    def of(self, chars: int) -> ClassRule:
        return next(r for r in self.rules if r.max_chars is None or chars <= r.max_chars)

    def extra_slots(self, name: str) -> int:
        return next((r.extra_slots for r in self.rules if r.name == name), 0)

    def cap(self, name: str, pool_slots: int) -> int | None:
        """The class's cap on jobs in service; a capped class never fills a pool of 2+ slots."""
        rule = next(r for r in self.rules if r.name == name)
        if rule.max_in_service is None:
            return None
        cap = rule.max_in_service
        return min(cap, pool_slots - 1) if pool_slots > 1 else min(cap, 1)


@dataclass(frozen=True, kw_only=True)
class BackendView:
    """A backend as the scheduler needs to see it."""

    id: str
    ready: bool  # may take traffic now
    alive: bool  # ready, or starting/restarting: will serve
    slots: int
    model_key: ModelKey | None


@dataclass(frozen=True, kw_only=True)
class Assignment:
    job: Job
    backend_id: str
    reload: bool  # the backend will switch model configuration for this job


@dataclass(kw_only=True)
class Running:
    job: Job
    backend_id: str
    started_at: float
    answered_early: bool = False  # the client already got 408; the backend still works on it


@dataclass
class Tally:
    """Counters for status endpoints and metrics."""

    admitted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dispatched: int = 0
    reloads: int = 0
    cancelled: int = 0
    expired_queued: int = 0
    expired_running: int = 0
    completed: int = 0
    failed: int = 0
    orphaned_s: float = 0.0  # backend seconds spent on work whose client was already answered


# Seconds over which the rate of admitted work per band is averaged (exponential decay): long
# enough to smooth Poisson arrivals, short enough to follow a change of load within a minute.
RATE_WINDOW_S = 30.0
# A band never counts on less than this share of the pool: the rest may go to higher bands.
MIN_BAND_SHARE = 0.1


class Scheduler:
    def __init__(self, *, queue: JobQueue, cost: CostModel, classes: LengthClasses, deadlines: DeadlinePolicy,
                 reject_unmeetable: bool = True) -> None:
        self.queue = queue
        self.cost = cost
        self.classes = classes
        self.deadlines = deadlines
        self.reject_unmeetable = reject_unmeetable
        self.running: dict[str, Running] = {}
        self.tally = Tally()
        self._deadlines: list[tuple[float, int, str]] = []  # heap of queued jobs' deadlines
        # Admitted work per band (predicted seconds), decayed over RATE_WINDOW_S, as of _work_at.
        self._work: dict[int, float] = {}
        self._work_at: float | None = None
        self._work_since: float | None = None

    # --- jobs in -------------------------------------------------------------------------------

    def make_job(self, *, id: str, chars: int, units: float, model_key: ModelKey, now: float,
                 tenant: str = "default", weight: float = 1.0, band: int = 0, tenant_bound: int | None = None,
                 client_budget_s: float | None = None, budget_s: float | None = None) -> Job:
        """A job with its class, prediction and deadline filled in (not yet admitted).
        ``budget_s`` replaces the deadline policy (async tasks have their own, longer one)."""
        prediction = self.cost.predict(units, model_key)
        budget = self.deadlines.budget_s(chars=chars, prediction=prediction) if budget_s is None else budget_s
        if client_budget_s is not None:
            budget = min(budget, client_budget_s)
        rule = self.classes.of(chars)
        if rule.band is not None:  # a class may lift its requests to a higher band, never lower them
            band = min(band, rule.band)
        return Job(id=id, chars=chars, units=units, model_key=model_key, arrived_at=now, deadline_at=now + budget,
                   tenant=tenant, weight=weight, band=band, cls=rule.name,
                   predicted_s=prediction.mean_s, p95_s=prediction.p95_s, tenant_bound=tenant_bound)

    def offer(self, job: Job, now: float, backends: Sequence[BackendView], *, force: bool = False) -> Rejection | None:
        """Admit the job into the queue, or say why not. ``force``: no admission and no bounds (a
        job that was admitted before, e.g. an async task re-queued after a restart)."""
        if force:
            self.queue.push(job, now, force=True)
            heapq.heappush(self._deadlines, (job.deadline_at, job.seq, job.id))
            self.tally.admitted += 1
            return None
        rejection = admit(self.outlook(job, now, backends), reject_unmeetable=self.reject_unmeetable)
        if rejection is None:
            try:
                self.queue.push(job, now)
            except QueueFullError:  # the outlook saw room; a bound it does not know of did not
                rejection = admit(self.outlook(job, now, backends, force_full=True), reject_unmeetable=False)
        if rejection is not None:
            self.tally.rejected[rejection.reason.value] += 1
            return rejection
        heapq.heappush(self._deadlines, (job.deadline_at, job.seq, job.id))
        self.tally.admitted += 1
        self._note_work(job, now)
        return None

    def _decay_work(self, now: float) -> None:
        if self._work_at is None:
            self._work_at = self._work_since = now
            return
        if now > self._work_at:
            factor = math.exp(-(now - self._work_at) / RATE_WINDOW_S)
            self._work = {band: work * factor for band, work in self._work.items()}
            self._work_at = now

    def _note_work(self, job: Job, now: float) -> None:
        self._decay_work(now)
        self._work[job.band] = self._work.get(job.band, 0.0) + job.predicted_s

    def work_rate(self, now: float, *, above_band: int) -> float:
        """Predicted seconds of work admitted per second into bands higher than ``above_band``
        (0 = highest), averaged over about RATE_WINDOW_S: what will keep jumping ahead of a job
        of that band while it waits."""
        self._decay_work(now)
        if self._work_since is None:
            return 0.0
        elapsed = now - self._work_since
        if elapsed <= 0:
            return 0.0
        # The decayed sum of a steady rate r is r * window * (1 - exp(-elapsed / window)).
        horizon = RATE_WINDOW_S * -math.expm1(-elapsed / RATE_WINDOW_S)
        return sum(work for band, work in self._work.items() if band < above_band) / horizon

    # --- dispatch ------------------------------------------------------------------------------

    def schedule(self, now: float, backends: Sequence[BackendView]) -> list[Assignment]:
        """Give waiting jobs to backends with free slots, best job first, within class caps."""
        assignments: list[Assignment] = []
        ready = [b for b in backends if b.ready]
        pool_slots = sum(b.slots for b in ready)
        # What each backend will have loaded once this pass's assignments run.
        loaded: dict[str, ModelKey | None] = {b.id: b.model_key for b in ready}
        demand: dict[ModelKey, float] = {}  # queued work by model configuration
        for queued in self.queue.jobs():
            demand[queued.model_key] = demand.get(queued.model_key, 0.0) + queued.predicted_s
        most_extra = max((r.extra_slots for r in self.classes.rules), default=0)
        while True:
            candidates = self._candidates(ready, now, loaded)
            if not any(c.in_flight < c.slots + most_extra for c in candidates):
                break
            in_service = Counter(r.job.cls for r in self.running.values())
            waiting: dict[ModelKey, float] = {}  # work already waiting for a backend of a configuration
            chosen: Assignment | None = None
            for job in self.queue.candidates(now):
                cap = self.classes.cap(job.cls, pool_slots)
                if cap is not None and in_service[job.cls] >= cap:
                    continue
                extra = self.classes.extra_slots(job.cls)
                seen = [replace(c, slots=c.slots + extra) for c in candidates] if extra else candidates
                choice = choose_backend(job.model_key, seen, reload_s=self.cost.reload_s,
                                        waiting_s=waiting.get(job.model_key, 0.0), demand=demand)
                if choice is not None:
                    chosen = Assignment(job=job, backend_id=choice.backend_id, reload=choice.reload)
                    break
                waiting[job.model_key] = waiting.get(job.model_key, 0.0) + job.predicted_s
            if chosen is None:
                break
            self.queue.take(chosen.job, now)
            demand[chosen.job.model_key] -= chosen.job.predicted_s
            self.running[chosen.job.id] = Running(job=chosen.job, backend_id=chosen.backend_id, started_at=now)
            self.tally.dispatched += 1
            if chosen.reload and loaded[chosen.backend_id] is not None:
                self.tally.reloads += 1
            loaded[chosen.backend_id] = chosen.job.model_key
            assignments.append(chosen)
        return assignments

    def _candidates(self, ready: Sequence[BackendView], now: float,
                    loaded: dict[str, ModelKey | None] | None = None) -> list[Candidate]:
        in_flight: Counter[str] = Counter()
        remaining: dict[str, float] = {}
        for run in self.running.values():
            in_flight[run.backend_id] += 1
            left = max(0.0, run.job.predicted_s - (now - run.started_at))
            remaining[run.backend_id] = remaining.get(run.backend_id, 0.0) + left
        keys = loaded if loaded is not None else {b.id: b.model_key for b in ready}
        return [Candidate(id=b.id, slots=b.slots, in_flight=in_flight[b.id], model_key=keys[b.id],
                          remaining_s=remaining.get(b.id, 0.0)) for b in ready]

    # --- jobs out ------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job | None:
        """The client left while queued: the job leaves the queue (None if it was not queued)."""
        job = self.queue.remove(job_id)
        if job is not None:
            self.tally.cancelled += 1
        return job

    def expire(self, now: float) -> list[Job]:
        """Queued jobs whose deadline has passed, taken out of the queue."""
        expired: list[Job] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job_id = heapq.heappop(self._deadlines)
            job = self.queue.remove(job_id)
            if job is not None:
                expired.append(job)
        self.tally.expired_queued += len(expired)
        return expired

    def next_deadline(self) -> float | None:
        """When the earliest queued job expires (stale entries are dropped lazily)."""
        queued = {job.id for job in self.queue.jobs()}
        while self._deadlines and self._deadlines[0][2] not in queued:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def answered_early(self, job_id: str) -> None:
        """A running job's client got 408; its backend slot stays busy until ``finish``."""
        run = self.running.get(job_id)
        if run is not None and not run.answered_early:
            run.answered_early = True
            self.tally.expired_running += 1

    def finish(self, job_id: str, now: float, *, ok: bool) -> Running | None:
        """The backend is done with a dispatched job: free its slot and learn from it."""
        run = self.running.pop(job_id, None)
        if run is None:
            return None
        took = now - run.started_at
        if ok:
            self.tally.completed += 1
            self.cost.observe(run.job.units, run.job.model_key, took, backend_id=run.backend_id)
        else:
            self.tally.failed += 1
        if run.answered_early:
            self.tally.orphaned_s += max(0.0, now - max(run.job.deadline_at, run.started_at))
        return run

    def requeue(self, job_id: str, now: float) -> bool:
        """A dispatched job whose backend failed before answering goes back in line where it was
        (it keeps its arrival time, place and deadline); False if it was not running."""
        run = self.running.get(job_id)
        if run is None or run.answered_early:  # its client already has its answer: nothing to redo
            return False
        del self.running[job_id]
        self.queue.push(run.job, now, force=True)
        heapq.heappush(self._deadlines, (run.job.deadline_at, run.job.seq, run.job.id))
        return True

    def adopt(self, old: Scheduler) -> None:
        """Take over everything an old scheduler holds (a configuration reload): queued jobs, in
        their order and with their deadlines, running jobs and the counters. Nothing is lost."""
        for job in sorted(old.queue.jobs(), key=lambda j: j.seq):
            self.queue.push(job, job.arrived_at, force=True)
        self.running.update(old.running)
        self._deadlines = list(old._deadlines)
        heapq.heapify(self._deadlines)
        self.tally = old.tally
        self._work, self._work_at, self._work_since = dict(old._work), old._work_at, old._work_since

    # --- predictions ---------------------------------------------------------------------------

    def outlook(self, job: Job, now: float, backends: Sequence[BackendView], *, force_full: bool = False) -> Outlook:
        ready = [b for b in backends if b.ready]
        slots = max(1, sum(b.slots for b in ready))
        tenant_bound = job.tenant_bound if job.tenant_bound is not None else self.queue.max_per_tenant
        tenant_queued = self.queue.tenant_depth(job.tenant)
        next_free = self._next_free_s(ready, now)
        return Outlook(
            can_serve=any(b.alive for b in backends),
            queued=self.queue.max_size if force_full else len(self.queue),
            max_queued=self.queue.max_size,
            tenant_queued=tenant_queued,
            tenant_max=tenant_bound if tenant_bound is not None else self.queue.max_size,
            wait_s=self.predicted_wait_s(job, now, slots),
            service_s=job.predicted_s,
            budget_s=job.deadline_at - now,
            next_free_s=next_free,
            tenant_next_s=max(next_free, self._tenant_head_wait_s(job.tenant, now, slots)),
        )

    def _next_free_s(self, ready: Sequence[BackendView], now: float) -> float:
        """Predicted seconds until the queue can move: a slot is free and nothing waits for one,
        else the earliest predicted end of running work (a free slot that queued jobs cannot use,
        because of a class cap or affinity, does not count)."""
        candidates = self._candidates(ready, now)
        if any(c.free_slots for c in candidates) and not len(self.queue):
            return 0.0
        left = [max(0.0, r.job.predicted_s - (now - r.started_at)) for r in self.running.values()]
        return min(left) if left else 1.0

    def _in_service_remaining_s(self, now: float) -> float:
        return sum(max(0.0, r.job.predicted_s - (now - r.started_at)) for r in self.running.values())

    def predicted_wait_s(self, job: Job, now: float, slots: int) -> float:
        """Work ahead of ``job`` divided among the slots: what is in service, every queued job in
        a higher band, and -- inside its band -- each other tenant's backlog up to what fair
        queueing would serve of it while this tenant's own backlog (and the job) goes."""
        ahead = self._in_service_remaining_s(now)
        queued = [q for q in self.queue.jobs() if q.id != job.id]
        if not isinstance(self.queue, FairQueue):
            return (ahead + sum(q.predicted_s for q in queued)) / slots
        band = self.queue.effective_band(job, now)
        own = job.predicted_s
        others: dict[str, float] = {}
        weights: dict[str, float] = {}
        for q in queued:
            qband = self.queue.effective_band(q, now)
            if qband < band:
                ahead += q.predicted_s
            elif qband == band:
                if q.tenant == job.tenant:
                    own += q.predicted_s if self._goes_before(q, job, now) else 0.0
                else:
                    others[q.tenant] = others.get(q.tenant, 0.0) + q.predicted_s
                    weights[q.tenant] = q.weight
        for tenant, backlog in others.items():
            ahead += min(backlog, own * weights[tenant] / job.weight)
        ahead += own - job.predicted_s
        # Work arriving in higher bands while the job waits goes first too: with it coming in at
        # rate r, the backlog drains at (slots - r) seconds of work per second.
        higher = self.work_rate(now, above_band=band) if band > 0 else 0.0
        return ahead / max(slots - higher, slots * MIN_BAND_SHARE)

    def _goes_before(self, queued: Job, job: Job, now: float) -> bool:
        """Whether a queued job of the same tenant and band will be served before ``job``."""
        if isinstance(self.queue, FairQueue) and self.queue.within_tenant is WithinTenant.SHORTEST_FIRST:
            return self.queue.aged(queued, now) or queued.predicted_s <= job.predicted_s
        return job.seq == 0 or queued.seq < job.seq

    def _tenant_head_wait_s(self, tenant: str, now: float, slots: int) -> float:
        heads = [q for q in self.queue.jobs() if q.tenant == tenant]
        if not heads:
            return 0.0
        head = min(heads, key=lambda q: q.seq)
        return self.predicted_wait_s(head, now, slots)

    def status(self, now: float) -> dict[str, Any]:
        by_band: Counter[int] = Counter()
        by_tenant: Counter[str] = Counter()
        by_class: Counter[str] = Counter()
        oldest = 0.0
        for job in self.queue.jobs():
            by_band[job.band] += 1
            by_tenant[job.tenant] += 1
            by_class[job.cls] += 1
            oldest = max(oldest, now - job.arrived_at)
        tally = self.tally
        return {
            "depth": len(self.queue), "max_size": self.queue.max_size, "oldest_wait_s": round(oldest, 3),
            "by_band": dict(by_band), "by_tenant": dict(by_tenant), "by_class": dict(by_class),
            "in_service": len(self.running),
            "in_service_by_class": dict(Counter(r.job.cls for r in self.running.values())),
            "admitted": tally.admitted, "rejected": dict(tally.rejected), "dispatched": tally.dispatched,
            "reloads": tally.reloads, "cancelled": tally.cancelled, "expired_queued": tally.expired_queued,
            "expired_running": tally.expired_running, "completed": tally.completed, "failed": tally.failed,
            "orphaned_backend_seconds": round(tally.orphaned_s, 3),
        }
