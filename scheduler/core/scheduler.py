"""The scheduler: admission, the queue, class caps and dispatch, as one pure state machine.

No I/O and no clock of its own: the async edge (scheduler.runtime.dispatcher) calls in with ``now`` and
a snapshot of the backends, and applies what comes back. Every admitted job ends in exactly one
of: taken back by ``cancel`` (client gone), returned by ``expire`` (deadline passed while
queued), or dispatched by ``schedule`` and later closed by ``finish``. A dispatched job holds its
backend slot until ``finish``, even when its client was already answered 408, because GLM-TTS
cannot cancel work: that orphaned time is counted.

``forecast`` predicts when a job would be dispatched by running the same dispatch step as
``schedule`` forward in simulated time on a copy of the queue (docs/scheduling.md, "Admission").
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler.core.admission import Outlook, Rejection, admit
from scheduler.core.cost import CostModel
from scheduler.core.deadlines import DeadlinePolicy
from scheduler.core.dispatch import Candidate, choose_backend
from scheduler.core.queue import FairQueue, Job, JobQueue, ModelKey, QueueFullError


@dataclass(frozen=True, kw_only=True)
class ClassRule:
    name: str
    max_chars: int | None  # None: no upper bound (the last class)
    max_in_service: int | None = None  # pool-wide cap on jobs of this class in service
    band: int | None = None  # its jobs queue in this band or a higher one (0 = highest); None: as asked
    extra_slots: int = 0  # its jobs may run on a backend this many beyond the backend's slots
    min_share: float = 0.0  # of recent backend time, kept while its jobs wait (they go first below it)


class LengthClasses:
    def __init__(self, rules: Sequence[ClassRule]) -> None:
        if not rules or rules[-1].max_chars is not None:
            raise ValueError("the last length class must have no max_chars")
        self.rules = tuple(rules)
        self._named = {r.name: r for r in self.rules}

    def of(self, chars: int) -> ClassRule:
        return next(r for r in self.rules if r.max_chars is None or chars <= r.max_chars)

    def extra_slots(self, name: str) -> int:
        rule = self._named.get(name)
        return 0 if rule is None else rule.extra_slots

    def min_share(self, name: str) -> float:
        rule = self._named.get(name)
        return 0.0 if rule is None else rule.min_share

    def cap(self, name: str, pool_slots: int) -> int | None:
        """The class's cap on jobs in service; a capped class never fills a pool of 2+ slots. A
        class the rules do not name (a job queued before a reload renamed it) has none."""
        rule = self._named.get(name)
        if rule is None or rule.max_in_service is None:
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
    # How many times its time alone a request takes with 1, 2, ... in flight (learned by slots:
    # auto); None: not known, nothing is checked (a fixed number of slots is the operator's).
    slowdown: tuple[float, ...] | None = None

    def slowdown_at(self, level: int) -> float:
        """The slowdown with ``level`` in flight: past what is known, processor sharing without gain."""
        curve = self.slowdown or ()
        return curve[level - 1] if 1 <= level <= len(curve) else float(max(1, level))


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
    reload_s: float | None = None  # predicted seconds its backend first spends loading its configuration
    answered_early: bool = False  # the client already got 408; the backend still works on it

    @property
    def ends_at(self) -> float:
        """When its backend is predicted to be done with it."""
        return self.started_at + (self.reload_s or 0.0) + self.job.predicted_s

    def left_s(self, now: float) -> float:
        return max(0.0, self.ends_at - now)


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


@dataclass(frozen=True, kw_only=True)
class Forecast:
    """When a job would be dispatched if nothing else arrived and service times were as predicted."""

    start_s: float  # seconds from now until it is dispatched
    at_once: bool  # ``schedule(now)`` would dispatch it: a slot it may use is free and nothing goes first
    reload: bool = False  # its backend loads its model configuration first
    bound: bool = False  # the forecast stopped early (FORECAST_VISITS): start_s is a lower bound


class _Pool:
    """The ready backends of one dispatch decision."""

    def __init__(self, ready: Sequence[BackendView]) -> None:
        self.ready = ready
        self.slots = sum(b.slots for b in ready)  # what class caps are relative to
        self.view = {b.id: b for b in ready}
        self.learned = any(b.slowdown is not None for b in ready)  # some backend's slowdown is known


class _Demand:
    """What is queued: work by model configuration (dispatch leaves a free backend to a
    configuration that still has some; exactly 0 once the last such job left, whatever the
    rounding of the sums), and jobs by length class."""

    def __init__(self, jobs: Iterable[Job]) -> None:
        self.work: dict[ModelKey, float] = {}
        self._count: Counter[ModelKey] = Counter()
        self._classes: Counter[str] = Counter()
        for job in jobs:
            self.work[job.model_key] = self.work.get(job.model_key, 0.0) + job.predicted_s
            self._count[job.model_key] += 1
            self._classes[job.cls] += 1

    def remove(self, job: Job) -> None:
        key = job.model_key
        self._count[key] -= 1
        self.work[key] = self.work[key] - job.predicted_s if self._count[key] else 0.0
        self._classes[job.cls] -= 1
        if not self._classes[job.cls]:
            del self._classes[job.cls]

    def classes(self) -> Iterable[str]:
        """The length classes with jobs queued."""
        return self._classes.keys()


class ClassShares:
    """Backend time each length class is owed: a class with jobs waiting earns ``min_share`` of
    the pool's backend-seconds as time passes, and pays the predicted seconds of each job of it that
    is dispatched. A class owed time (credit > 0) is starved: its jobs go first, whatever waits in
    higher bands, until it has been paid. Credit is bounded either way by RATE_WINDOW_S of its
    share (or by the job just given): a class is not paid back for more than that, nor held back
    for having had more."""

    def __init__(self) -> None:
        self.credit: dict[str, float] = {}
        self.at: float | None = None
        self._waiting: frozenset[str] = frozenset()  # the classes that waited since ``at``
        self._backends = 0

    def copy(self) -> ClassShares:
        shares = ClassShares()
        shares.credit, shares.at = dict(self.credit), self.at
        shares._waiting, shares._backends = self._waiting, self._backends
        return shares

    def advance(self, now: float, waiting: Iterable[str], classes: LengthClasses, backends: int) -> None:
        """Credit the classes that waited since the last call; ``waiting`` and ``backends`` (ready
        backends) hold from now on."""
        if self.at is not None and now > self.at:
            elapsed = now - self.at
            for cls in self._waiting:
                rate = classes.min_share(cls) * self._backends
                if rate > 0:
                    self.credit[cls] = min(self.credit.get(cls, 0.0) + rate * elapsed, rate * RATE_WINDOW_S)
        if self.at is None or now > self.at:
            self.at = now
        self._waiting, self._backends = frozenset(waiting), backends
        for cls, credit in list(self.credit.items()):
            if cls not in self._waiting and credit > 0:
                del self.credit[cls]  # nothing waits: time it was owed is not banked

    def note(self, cls: str, work_s: float, classes: LengthClasses, backends: int) -> None:
        """A job of ``cls`` predicted to take ``work_s`` was dispatched."""
        floor = -max(classes.min_share(cls) * max(1, backends) * RATE_WINDOW_S, work_s)  # a long job is paid whole
        self.credit[cls] = max(self.credit.get(cls, 0.0) - work_s, floor)

    def starved(self, waiting: Iterable[str]) -> set[str]:
        """The classes in ``waiting`` that are owed backend time."""
        return {cls for cls in waiting if self.credit.get(cls, 0.0) > 0}


def shared_finish_s(work_s: Sequence[float], slowdown_at: Callable[[int], float]) -> list[float]:
    """Seconds until each job finishes when they share one backend from now: processor sharing
    where, with ``k`` in flight, each progresses at ``1 / slowdown_at(k)`` solo-seconds per second."""
    order = sorted(range(len(work_s)), key=lambda i: work_s[i])
    finish = [0.0] * len(work_s)
    t = done = 0.0  # time so far, and solo work every job still running has done
    for position, i in enumerate(order):
        active = len(order) - position
        t += (work_s[i] - done) * slowdown_at(active)
        done = work_s[i]
        finish[i] = t
    return finish


# How many queued jobs a forecast may look at, over all its simulated dispatch decisions, before it
# stops: enough for queues of a few hundred jobs; past it, the wait reached so far is a lower bound.
FORECAST_VISITS = 5_000
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
        self._deadlines: list[tuple[float, int, str]] = []  # heap of queued jobs' expiries (``expires_at``)
        # Admitted work per band (predicted seconds), decayed over RATE_WINDOW_S, as of _work_at.
        self._work: dict[int, float] = {}
        self._work_at: float | None = None
        self._work_since: float | None = None
        self.shares = ClassShares()

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
            heapq.heappush(self._deadlines, (self.expires_at(job), job.seq, job.id))
            self.tally.admitted += 1
            return None
        room = len(self.queue) < self.queue.max_size and self.queue.tenant_depth(job.tenant) < self._tenant_max(job)
        outlook = self.outlook(job, now, backends, wait=self.reject_unmeetable and room)
        rejection = admit(outlook, reject_unmeetable=self.reject_unmeetable)
        if rejection is None:
            try:
                self.queue.push(job, now)
            except QueueFullError:  # the outlook saw room; a bound it does not know of did not
                rejection = admit(replace(outlook, queued=self.queue.max_size), reject_unmeetable=False)
        if rejection is not None:
            self.tally.rejected[rejection.reason.value] += 1
            return rejection
        heapq.heappush(self._deadlines, (self.expires_at(job), job.seq, job.id))
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
        if horizon <= 0:  # elapsed so small that the window underflows: no rate measured yet
            return 0.0
        return sum(work for band, work in self._work.items() if band < above_band) / horizon

    # --- dispatch ------------------------------------------------------------------------------

    def schedule(self, now: float, backends: Sequence[BackendView]) -> list[Assignment]:
        """Give waiting jobs to backends with free slots, best job first, within class caps."""
        assignments: list[Assignment] = []
        ready = [b for b in backends if b.ready]
        pool = _Pool(ready)
        # What each backend will have loaded once this pass's assignments run.
        loaded: dict[str, ModelKey | None] = {b.id: b.model_key for b in ready}
        demand = _Demand(self.queue.jobs())
        while (chosen := self._pick(now, pool, self.running, loaded, self.queue.candidates(now), demand,
                                    self.shares)) is not None:
            self.shares.note(chosen.job.cls, chosen.job.predicted_s, self.classes, len(ready))
            self.queue.take(chosen.job, now)
            demand.remove(chosen.job)
            self.running[chosen.job.id] = self._run(chosen, now)
            self.tally.dispatched += 1
            if chosen.reload and loaded[chosen.backend_id] is not None:
                self.tally.reloads += 1
            loaded[chosen.backend_id] = chosen.job.model_key
            assignments.append(chosen)
        return assignments

    def _run(self, chosen: Assignment, now: float) -> Running:
        return Running(job=chosen.job, backend_id=chosen.backend_id, started_at=now,
                       reload_s=self.cost.reload_s if chosen.reload else None)

    def _pick(self, now: float, pool: _Pool, running: Mapping[str, Running], loaded: Mapping[str, ModelKey | None],
              jobs: Iterable[Job], demand: _Demand, shares: ClassShares) -> Assignment | None:
        """The next dispatch at ``now``: the first of ``jobs`` (best first, the queue's order; the
        jobs of a starved class, ``ClassShares``, before the others) that a backend takes within its
        class's cap, or None. ``schedule`` and ``forecast`` both decide here. ``demand`` counts the
        queued jobs by configuration and by class."""
        shares.advance(now, demand.classes(), self.classes, len(pool.ready))
        in_flight, remaining = self._load(now, running)
        in_service = Counter(r.job.cls for r in running.values())
        # For each length class with jobs waiting and below its cap: its extra slots, or None when
        # no backend has a slot free for it even with them.
        room: dict[int, bool] = {}
        extra_of: dict[str, int | None] = {}
        for cls in demand.classes():
            if self._capped(cls, in_service, pool):
                continue
            extra = self.classes.extra_slots(cls)
            if extra not in room:
                room[extra] = any(in_flight[b.id] < b.slots + extra for b in pool.ready)
            extra_of[cls] = extra if room[extra] else None
        if all(extra is None for extra in extra_of.values()):
            return None  # every class with jobs waiting is at its cap or finds no slot
        starved = shares.starved(cls for cls, extra in extra_of.items() if extra is not None)
        if starved:
            listed = list(jobs)
            jobs = [job for job in listed if job.cls in starved] + [job for job in listed if job.cls not in starved]
        seen_by: dict[int, list[Candidate]] = {}  # the backends as a job with this many extra slots sees them
        waiting: dict[ModelKey, float] = {}  # work already waiting for a backend of a configuration
        on: dict[str, list[Running]] | None = None  # running jobs by backend, when a slowdown is known
        for job in jobs:
            if job.cls not in extra_of:  # at its cap
                continue
            slack = extra_of[job.cls]
            choice = None  # also when no backend has a slot for it: what choose_backend would say
            if slack is not None:
                if slack not in seen_by:
                    seen_by[slack] = [Candidate(id=b.id, slots=b.slots + slack, in_flight=in_flight[b.id],
                                                model_key=loaded[b.id], remaining_s=remaining.get(b.id, 0.0))
                                      for b in pool.ready]
                seen = seen_by[slack]
                if pool.learned:  # a backend that slows down with company takes the job only in time
                    if on is None:
                        on = {}
                        for run in running.values():
                            on.setdefault(run.backend_id, []).append(run)
                    seen = [c if self._shares_in_time(job, pool.view[c.id], on.get(c.id, ()), now)
                            else replace(c, slots=c.in_flight) for c in seen]
                choice = choose_backend(job.model_key, seen, reload_s=self.cost.reload_s,
                                        waiting_s=waiting.get(job.model_key, 0.0), demand=demand.work)
            if choice is not None:
                return Assignment(job=job, backend_id=choice.backend_id, reload=choice.reload)
            waiting[job.model_key] = waiting.get(job.model_key, 0.0) + job.predicted_s
        return None

    @staticmethod
    def _shares_in_time(job: Job, backend: BackendView, mine: Sequence[Running], now: float) -> bool:
        """Whether ``job`` may join ``mine``, the jobs ``backend`` runs: with one more in flight
        each runs slower (``BackendView.slowdown``) while they overlap: joining must not make a
        running job that would have made its deadline miss it, nor the job itself miss its own
        when waiting for a request here to end would have it finish sooner. An idle backend always
        may. (A short job next to a long one delays it by its own short overlap only, not by the
        long job's whole remainder.)"""
        if not mine or backend.slowdown is None:
            return True
        before = backend.slowdown_at(len(mine))
        # Each running job's work left, in solo seconds, from the time it ran at ``before`` (a
        # reload under way counts as work).
        left = [max(0.0, run.ends_at - run.started_at - (now - run.started_at) / before) for run in mine]
        without = shared_finish_s(left, backend.slowdown_at)
        with_job = shared_finish_s([*left, job.predicted_s], backend.slowdown_at)
        # Late even so: it waits only if waiting for a request here to end would do better.
        if now + with_job[-1] > job.deadline_at and with_job[-1] > min(without) + job.predicted_s * before:
            return False
        return not any(now + alone <= run.job.deadline_at < now + shared
                       for run, alone, shared in zip(mine, without, with_job, strict=False))

    def _capped(self, cls: str, in_service: Counter[str], pool: _Pool) -> bool:
        cap = self.classes.cap(cls, pool.slots)
        return cap is not None and in_service[cls] >= cap

    def _load(self, now: float, running: Mapping[str, Running]) -> tuple[Counter[str], dict[str, float]]:
        """Jobs in flight and predicted seconds of service left, per backend. (What dispatch
        weighs; a reload under way is not counted in it: counting it makes affinity switch more
        backends, each switch a reload. A forecast's slots do free at ``Running.ends_at``.)"""
        in_flight: Counter[str] = Counter()
        remaining: dict[str, float] = {}
        for run in running.values():
            in_flight[run.backend_id] += 1
            left = max(0.0, run.job.predicted_s - (now - run.started_at))
            remaining[run.backend_id] = remaining.get(run.backend_id, 0.0) + left
        return in_flight, remaining

    # --- jobs out ------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job | None:
        """The client left while queued: the job leaves the queue (None if it was not queued)."""
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
        """A running job's client got 408; its backend slot stays busy until ``finish``."""
        run = self.running.get(job_id)
        if run is not None and not run.answered_early:
            run.answered_early = True
            self.tally.expired_running += 1

    def finish(self, job_id: str, now: float, *, ok: bool) -> Running | None:
        """The backend is done with a dispatched job: free its slot and learn from it (not from a
        job that loaded its model configuration first: that time is not the text's)."""
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
        (it keeps its arrival time, place and deadline); False if it was not running."""
        run = self.running.get(job_id)
        if run is None or run.answered_early:  # its client already has its answer: nothing to redo
            return False
        del self.running[job_id]
        self.queue.push(run.job, now, force=True)
        heapq.heappush(self._deadlines, (self.expires_at(run.job), run.job.seq, run.job.id))
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
        self._work, self._work_at, self._work_since = dict(old._work), old._work_at, old._work_since
        self.shares = old.shares.copy()

    # --- predictions ---------------------------------------------------------------------------

    def outlook(self, job: Job, now: float, backends: Sequence[BackendView], *, wait: bool = True) -> Outlook:
        """What admission needs to know about ``job`` if it were admitted now. ``wait`` False
        skips its forecast (``wait_s`` 0, ``starts_now`` False) where admission will not read
        them: deadlines are not enforced, or a bound of the queue is reached."""
        ready = [b for b in backends if b.ready]
        tenant_max = self._tenant_max(job)
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
            confirmed=self.cost.confirmed(job.model_key),
            service_s=job.predicted_s,
            budget_s=job.deadline_at - now,
            next_free_s=next_free,
            tenant_next_s=tenant_next,
        )

    def _tenant_max(self, job: Job) -> int:
        """How many jobs of the job's tenant may wait: its own bound, else the queue's."""
        bound = job.tenant_bound if job.tenant_bound is not None else self.queue.max_per_tenant
        return bound if bound is not None else self.queue.max_size

    def _next_free_s(self, ready: Sequence[BackendView], now: float) -> float:
        """Predicted seconds until the queue can move: a slot is free and nothing waits for one,
        else the earliest predicted end of running work (a free slot that queued jobs cannot use,
        because of a class cap or affinity, does not count)."""
        in_flight, _ = self._load(now, self.running)
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
        reload = self.cost.reload_s if forecast.reload else 0.0
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
        higher = self.work_rate(now, above_band=band)
        return slots / max(slots - higher, slots * MIN_BAND_SHARE)

    def forecast(self, job: Job, now: float, backends: Sequence[BackendView]) -> Forecast:
        """When ``job`` (queued, or about to be offered) would be dispatched if nothing else arrived
        and every running job took exactly its predicted time.

        ``schedule``'s own decisions (``_pick``) run over simulated time on a copy of the queue:
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
        pool = _Pool(ready)
        queue = self.queue.copy()
        target = job
        if job.id not in {q.id for q in queue.jobs()}:
            target = replace(job, seq=0)
            queue.push(target, now, force=True)  # numbered as the real queue will number it
        running = dict(self.running)
        loaded: dict[str, ModelKey | None] = {b.id: b.model_key for b in ready}
        demand = _Demand(queue.jobs())
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

        t = now
        while True:
            while (chosen := self._pick(t, pool, running, loaded, counted(queue.candidates(t)), demand,
                                        shares)) is not None:
                if chosen.job is target:
                    return Forecast(start_s=t - now, at_once=at_once, reload=chosen.reload)
                if visits > FORECAST_VISITS:  # a queue of thousands: stop at a lower bound
                    return Forecast(start_s=t - now, at_once=False, bound=True)
                queue.take(chosen.job, t)
                demand.remove(chosen.job)
                shares.note(chosen.job.cls, chosen.job.predicted_s, self.classes, len(ready))
                run = running[chosen.job.id] = self._run(chosen, t)
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
