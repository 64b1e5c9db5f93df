"""The scheduler: admission, the queue, class caps and dispatch, as one pure state machine.

No I/O and no clock of its own: the async edge (scheduler.runtime.dispatcher) calls in with ``now`` and
a snapshot of the backends, and applies what comes back. Every admitted job ends in exactly one
of: taken back by ``cancel`` (client gone), returned by ``expire`` (deadline passed while
queued), or dispatched by ``schedule`` and later closed by ``finish``. A dispatched job holds its
backend slot until ``finish``, even when its client was already answered 408, because GLM-TTS
cannot cancel work: that orphaned time is counted.

Each job-out call names a job by id and acts only on a job in the place it expects (``cancel``:
queued; ``finish``, ``requeue``, ``answered_early``: running); for any other id (unknown, never
admitted, or already closed) it changes nothing and says so in its result. So a late or repeated
call is harmless, and a caller need not know whether another already closed the job.

A request fanned out into pieces (docs/scheduling.md, "Pieces of a fanned-out request") is
admitted as one (``offer_pieces``); its pieces then wait and run as jobs of their own.

The dispatch decision itself is scheduler.core.dispatch_step's; ``forecast`` and the other
predictions (scheduler.core.forecast) run that same decision forward in simulated time on a copy
of the queue (docs/scheduling.md, "Admission").
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler.core.admission import Outlook, Reason, Rejection, admit
from scheduler.core.classes import RATE_WINDOW_S, ClassShares, LengthClasses
from scheduler.core.cost import CostModel
from scheduler.core.deadlines import DeadlinePolicy
from scheduler.core.dispatch_step import Demand, DispatchStep, Pool
from scheduler.core.forecast import AdmittedWork, Forecast, Forecaster
from scheduler.core.queue import Job, JobQueue, ModelKey, QueueFullError
from scheduler.core.running import Assignment, BackendView, Running


@dataclass
class Tally:
    """Counters for status endpoints and metrics."""

    admitted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dispatched: int = 0
    reloads: int = 0
    cancelled: int = 0
    expired_queued: int = 0
    shed: int = 0  # queued jobs taken out at their latest start, before their deadline (``expires_at``)
    expired_running: int = 0
    completed: int = 0
    failed: int = 0
    orphaned_s: float = 0.0  # backend seconds spent on work whose client was already answered


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
        self._deadlines: list[tuple[float, int, str]] = []  # heap of queued jobs' expiries (``expires_at``)
        self._admitted = AdmittedWork()
        self.shares = ClassShares()
        self._pressed_until = -math.inf  # the pool fell short of capacity lately: until then (``pressure``)

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
            self._enqueue(job, now)
            self.tally.admitted += 1
            return None
        rejection = self._admit(job, now, backends, lambda: self.queue.push(job, now))
        if rejection is None:
            heapq.heappush(self._deadlines, (self.expires_at(job), job.seq, job.id))
        return rejection

    def _admit(self, job: Job, now: float, backends: Sequence[BackendView],
               enter: Callable[[], None]) -> Rejection | None:
        """Judge ``job`` for admission and, when admitted, ``enter`` it (which raises
        QueueFullError for a bound the outlook did not see); counted either way."""
        room = len(self.queue) < self.queue.max_size and self.queue.tenant_depth(job.tenant) < self._tenant_max(job)
        outlook = self.outlook(job, now, backends, wait=self.reject_unmeetable and room)
        rejection = admit(outlook, reject_unmeetable=self.reject_unmeetable)
        if rejection is None:
            try:
                enter()
            except QueueFullError:  # the outlook saw room; a bound it does not know of did not
                rejection = admit(replace(outlook, queued=self.queue.max_size), reject_unmeetable=False)
        if rejection is not None:
            self.tally.rejected[rejection.reason.value] += 1
            if rejection.reason in (Reason.QUEUE_FULL, Reason.DEADLINE_UNMEETABLE):
                self._pressed(job, now)  # turned away for want of capacity, not for a tenant's own bound
            return rejection
        self.tally.admitted += 1
        self._admitted.note(job, now)
        return None

    def _enqueue(self, job: Job, now: float) -> None:
        """Queue a job past the bounds (keeping its place if it had one), with its expiry."""
        self.queue.push(job, now, force=True)
        heapq.heappush(self._deadlines, (self.expires_at(job), job.seq, job.id))

    # --- pieces of a fanned-out request --------------------------------------------------------

    def free_slots(self, parent: Job, now: float, backends: Sequence[BackendView]) -> int:
        """How many jobs like ``parent`` could start right now without taking a slot from
        anything queued: what a new request may fan out over. 0 while any job is queued (a
        queue means the pool is not idle); else the free slots of the ready backends (their
        own: never a class's extra slots), within what ``parent``'s class may still start under
        its cap, and as many as ``schedule`` would start one after the other (model affinity, and
        deadlines on a backend that slows down with company, may keep a free slot from such a
        job)."""
        if len(self.queue):
            return 0
        ready = [b for b in backends if b.ready]
        in_flight = Counter(run.backend_id for run in self.running.values())
        free = sum(max(0, b.slots - in_flight[b.id]) for b in ready)
        cap = self.classes.cap(parent.cls, sum(b.slots for b in ready))
        if cap is not None:
            free = min(free, max(0, cap - sum(run.job.cls == parent.cls for run in self.running.values())))
        return self._would_start(parent, free, now, ready)

    def _would_start(self, parent: Job, most: int, now: float, ready: Sequence[BackendView]) -> int:
        """How many jobs like ``parent``, queued alone one after the other, ``schedule`` would start
        at ``now``, up to ``most`` (on copies: nothing here changes). Each is asked alone, as the
        head of the pieces is: one that may not start stops the count. A class's extra slots are
        not counted: they are for a short text next to long ones, not for pieces."""
        own_slots = LengthClasses([replace(rule, extra_slots=0) for rule in self.classes.rules])
        pool, step, shares = Pool(ready), DispatchStep(own_slots, self.cost), self.shares.copy()
        running = dict(self.running)
        loaded: dict[str, ModelKey | None] = {b.id: b.model_key for b in ready}
        started = 0
        while started < most:
            copy = replace(parent, id=f"{parent.id}/{started}", seq=0, continues=False)
            chosen = step.pick(now, pool, running, loaded, [copy], Demand([copy]), shares)
            if chosen is None:
                break
            shares.note(copy.cls, copy.predicted_s, own_slots, len(ready))
            running[copy.id] = step.run(chosen, now)
            loaded[chosen.backend_id] = copy.model_key
            started += 1
        return started

    def make_piece(self, parent: Job, *, id: str, chars: int, units: float) -> Job:
        """A piece of ``parent``'s text as a job of its own: the parent's tenant, weight, band,
        class (a long text's pieces never take a short text's fast lane or extra slots), model
        configuration, bound, arrival and deadline, with its own prediction (not yet queued)."""
        prediction = self.cost.predict(units, parent.model_key)
        return replace(parent, id=id, chars=chars, units=units, predicted_s=prediction.mean_s,
                       p95_s=prediction.p95_s, parent=parent.id, continues=False, seq=0)

    def offer_pieces(self, parent: Job, pieces: Sequence[Job], now: float,
                     backends: Sequence[BackendView]) -> Rejection | None:
        """Admit ``parent`` by queueing its first ``pieces`` in its place, or say why not. The
        request is judged and counted exactly as ``offer(parent)`` would judge and count it, but
        what enters the queue are the pieces (past the bounds: the parent's place is theirs),
        each with its own expiry."""
        if not pieces or any(piece.parent != parent.id for piece in pieces):
            raise ValueError(f"offer_pieces needs pieces made from {parent.id!r}")
        rejection = self._admit(parent, now, backends, lambda: self.queue.check(parent))
        if rejection is None:
            for piece in pieces:
                self._enqueue(piece, now)
        return rejection

    def add_piece(self, job: Job, now: float) -> None:
        """Queue a later piece of a request already admitted and started: past the bounds, with no
        admission and not counted again, as a continuation (before new work of its band)."""
        if job.parent is None:
            raise ValueError(f"{job.id!r} is not a piece of a request")
        job.continues = True
        self._enqueue(job, now)

    def pressure(self, now: float) -> bool:
        """Whether the pool fell short of capacity lately, so even slots free right now are not to
        be split over: a request was turned away for want of capacity (queue full, deadline
        unmeetable) or a queued one ran out of time, within the last RATE_WINDOW_S or the predicted
        service of that request, whichever is longer. A split takes every free slot for a while, so
        the next arrivals find none: in a calm pool they are few; in a pressed one they are the
        requests that then wait behind the pieces and miss their deadlines."""
        return now < self._pressed_until

    def _pressed(self, job: Job, now: float) -> None:
        self._pressed_until = max(self._pressed_until, now + max(RATE_WINDOW_S, job.predicted_s))

    def work_rate(self, now: float, *, above_band: int) -> float:
        """Predicted seconds of work admitted per second into bands higher than ``above_band``
        (0 = highest), averaged over about RATE_WINDOW_S: what will keep jumping ahead of a job
        of that band while it waits."""
        return self._admitted.rate(now, above_band=above_band)

    def _tenant_max(self, job: Job) -> int:
        """How many jobs of the job's tenant may wait: its own bound, else the queue's."""
        bound = job.tenant_bound if job.tenant_bound is not None else self.queue.max_per_tenant
        return bound if bound is not None else self.queue.max_size

    # --- dispatch ------------------------------------------------------------------------------

    def schedule(self, now: float, backends: Sequence[BackendView]) -> list[Assignment]:
        """Give waiting jobs to backends with free slots, best job first, within class caps."""
        assignments: list[Assignment] = []
        ready = [b for b in backends if b.ready]
        pool = Pool(ready)
        step = self._step()
        # What each backend will have loaded once this pass's assignments run.
        loaded: dict[str, ModelKey | None] = {b.id: b.model_key for b in ready}
        demand = Demand(self.queue.jobs())
        while (chosen := step.pick(now, pool, self.running, loaded, self.queue.candidates(now), demand,
                                   self.shares)) is not None:
            self.shares.note(chosen.job.cls, chosen.job.predicted_s, self.classes, len(ready))
            self.queue.take(chosen.job, now)
            demand.remove(chosen.job)
            self.running[chosen.job.id] = step.run(chosen, now)
            self.tally.dispatched += 1
            if chosen.reload and loaded[chosen.backend_id] is not None:
                self.tally.reloads += 1
            loaded[chosen.backend_id] = chosen.job.model_key
            assignments.append(chosen)
        return assignments

    def _step(self) -> DispatchStep:
        return DispatchStep(self.classes, self.cost)

    # --- jobs out ------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job | None:
        """The client left while queued: the job leaves the queue. Only a queued job: for any other
        id (unknown, running, already cancelled or expired) None, and nothing changes (a running
        job keeps its slot until ``finish``)."""
        job = self.queue.remove(job_id)
        if job is not None:
            self.tally.cancelled += 1
        return job

    def expires_at(self, job: Job) -> float:
        """When a queued job leaves the queue unserved: its latest start (deadline less predicted
        service), past which it would be predicted to finish late even on a free backend, so the
        backend time it would take goes to work that can still make its deadline. Only when
        deadlines are enforced and the job was predicted to fit when it arrived: one admitted
        against its prediction (an idle pool, a prior still far off) waits until its deadline."""
        if self.reject_unmeetable and job.arrived_at + job.predicted_s <= job.deadline_at:
            return job.deadline_at - job.predicted_s
        return job.deadline_at

    def expire(self, now: float) -> list[Job]:
        """Queued jobs past ``expires_at``, taken out of the queue: those whose deadline has
        not passed yet are counted as ``shed`` (they could no longer start in time)."""
        expired: list[Job] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job_id = heapq.heappop(self._deadlines)
            job = self.queue.remove(job_id)
            if job is not None:
                expired.append(job)
                self._pressed(job, now)
                if now < job.deadline_at:
                    self.tally.shed += 1
                else:
                    self.tally.expired_queued += 1
        return expired

    def next_deadline(self) -> float | None:
        """When the earliest queued job expires (stale entries are dropped lazily)."""
        queued = {job.id for job in self.queue.jobs()}
        while self._deadlines and self._deadlines[0][2] not in queued:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def answered_early(self, job_id: str) -> None:
        """A running job's client got 408; its backend slot stays busy until ``finish``. Counted
        once: for a job already answered early, or not running, nothing changes."""
        run = self.running.get(job_id)
        if run is not None and not run.answered_early:
            run.answered_early = True
            self.tally.expired_running += 1

    def finish(self, job_id: str, now: float, *, ok: bool) -> Running | None:
        """The backend is done with a dispatched job: free its slot and learn from it (not from a
        job that loaded its model configuration first: that time is not the text's).

        Only a running job, once: for any other id (unknown, finished already, requeued, or still
        queued: a queued job leaves only by ``cancel`` or ``expire``) None, and nothing changes --
        no count, nothing learned. A caller that gets None holds no slot to give back."""
        run = self.running.pop(job_id, None)
        if run is None:
            return None
        if ok:
            self.tally.completed += 1
            if run.reload_s is None:
                self.cost.observe(run.job.units, run.job.model_key, now - run.started_at, backend_id=run.backend_id)
        else:
            self.tally.failed += 1
        if run.answered_early:
            self.tally.orphaned_s += max(0.0, now - max(run.job.deadline_at, run.started_at))
        return run

    def requeue(self, job_id: str, now: float) -> bool:
        """A dispatched job whose backend failed before answering goes back in line where it was
        (it keeps its arrival time, place and deadline; a piece goes back as a continuation: its
        request has started). False, and nothing changes, for a job not running (unknown, queued,
        finished) and for one whose client was answered early: that one has nothing to redo and
        stays running until ``finish``."""
        run = self.running.get(job_id)
        if run is None or run.answered_early:  # its client already has its answer: nothing to redo
            return False
        del self.running[job_id]
        if run.job.parent is not None:
            run.job.continues = True
        self._enqueue(run.job, now)
        return True

    def adopt(self, old: Scheduler) -> None:
        """Take over everything an old scheduler holds (a configuration reload): queued jobs, in
        their order and with their deadlines, running jobs and the counters. Nothing is lost."""
        for job in sorted(old.queue.jobs(), key=lambda j: j.seq):
            self.queue.push(job, job.arrived_at, force=True)
        self.running.update(old.running)
        self._deadlines = [(self.expires_at(job), job.seq, job.id) for job in self.queue.jobs()]
        heapq.heapify(self._deadlines)
        self.tally = old.tally
        self._admitted = old._admitted.copy()
        self.shares = old.shares.copy()
        self._pressed_until = old._pressed_until

    # --- predictions (scheduler.core.forecast) -------------------------------------------------

    def outlook(self, job: Job, now: float, backends: Sequence[BackendView], *, wait: bool = True) -> Outlook:
        """What admission needs to know about ``job`` if it were admitted now (``Forecaster.outlook``)."""
        return self._forecaster().outlook(job, now, backends, wait=wait)

    def predicted_wait_s(self, job: Job, now: float, backends: Sequence[BackendView]) -> float:
        """Seconds until ``job`` (queued, or about to be offered) is predicted to begin its service
        (``Forecaster.predicted_wait_s``)."""
        return self._forecaster().predicted_wait_s(job, now, backends)

    def forecast(self, job: Job, now: float, backends: Sequence[BackendView]) -> Forecast:
        """When ``job`` (queued, or about to be offered) would be dispatched if nothing else arrived
        and every running job took exactly its predicted time (``Forecaster.forecast``)."""
        return self._forecaster().forecast(job, now, backends)

    def _forecaster(self) -> Forecaster:
        return Forecaster(queue=self.queue, running=self.running, shares=self.shares, admitted=self._admitted,
                          step=self._step(), expires_at=self.expires_at, tenant_max=self._tenant_max)

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
            "shed": tally.shed,
            "expired_running": tally.expired_running, "completed": tally.completed, "failed": tally.failed,
            "orphaned_backend_seconds": round(tally.orphaned_s, 3),
        }
