"""The scheduler as one pure state machine (scheduler.core.scheduler), driven with a hand-advanced clock.

Shown here: no admitted job is lost or answered twice (a hypothesis state machine, both queue
policies); a class cap is never exceeded; a queued deadline fires at exactly its time.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler.core.classes import ClassRule, LengthClasses
from scheduler.core.cost import CostModel
from scheduler.core.deadlines import Tier, TiersPolicy
from scheduler.core.queue import Job, ModelKey, make_queue
from scheduler.core.running import BackendView
from scheduler.core.scheduler import Scheduler

K24: ModelKey = (24000, False)
KEYS: tuple[ModelKey, ...] = (K24, (32000, False), (24000, True))
TENANTS = ("a", "b", "c")
TIERS = TiersPolicy([Tier(max_chars=50, timeout_s=30.0), Tier(max_chars=200, timeout_s=60.0),
                     Tier(max_chars=None, timeout_s=120.0)])


def make_scheduler(*, order: str = "fifo", rules: list[ClassRule] | None = None, reject_unmeetable: bool = False,
                   max_size: int = 100, timeout_s: float = 1e6) -> Scheduler:
    return Scheduler(queue=make_queue(order, max_size=max_size), cost=CostModel(),
                     classes=LengthClasses(rules or [ClassRule(name="all", max_chars=None)]),
                     deadlines=TiersPolicy([Tier(max_chars=None, timeout_s=timeout_s)]),
                     reject_unmeetable=reject_unmeetable)


def view(id: str, *, ready: bool = True, alive: bool = True, slots: int = 1, key: ModelKey | None = K24) -> BackendView:
    return BackendView(id=id, ready=ready, alive=alive, slots=slots, model_key=key)


def expected_cap(max_in_service: int, pool_slots: int) -> int:
    """The documented cap: a capped class never fills a pool of 2+ slots."""
    return min(max_in_service, pool_slots - 1) if pool_slots > 1 else min(max_in_service, 1)


# --- 1 and 2: the state machine ---------------------------------------------------------------------

TERMINAL = ("cancelled", "expired", "finished")


@dataclass
class Track:
    """What the test knows of one admitted job."""

    job: Job
    where: str = "queued"  # queued | running | cancelled | expired | finished
    backend: str | None = None
    dispatches: int = 0
    requeues: int = 0
    answers: int = 0  # client answers: 408 from expire or answered_early, or the backend's answer
    early: bool = False  # answered_early was called while it ran
    shed: bool = False  # expired at its latest start, before its deadline
    ok: bool = False


class SchedulerMachine(RuleBasedStateMachine):
    """Random traffic against a Scheduler over 1-4 backends of 1-2 slots that flip between ready,
    starting and down. Bounds checked after every step: each admitted job is in exactly one place
    or has exactly one terminal event, gets at most one client answer, is dispatched once per time
    it was queued; no backend runs more than its slots; a capped class is never dispatched past
    min(max_in_service, pool_slots - 1) (pool_slots > 1); the tally adds up."""

    order = "fifo"

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.tracks: dict[str, Track] = {}
        self.dispatch_events = 0
        self.rejections = 0
        self.next_id = 0
        self.offers = 0
        self.peak_running = 0

    @initialize(backends=st.lists(st.tuples(st.integers(1, 2), st.sampled_from([*KEYS, None])), min_size=1,
                                  max_size=4),
                max_size=st.integers(1, 20), max_per_tenant=st.none() | st.integers(1, 6),
                within=st.sampled_from(["fifo", "shortest_first"]),
                weights=st.tuples(*[st.sampled_from([0.5, 1.0, 2.0, 3.0])] * 3),
                medium_cap=st.none() | st.integers(1, 3), long_cap=st.none() | st.integers(1, 2),
                reject_unmeetable=st.booleans(), aging_s=st.floats(1.0, 100.0), band_aging_s=st.floats(1.0, 100.0))
    def setup(self, backends: list[tuple[int, ModelKey | None]], max_size: int, max_per_tenant: int | None,
              within: str, weights: tuple[float, float, float], medium_cap: int | None, long_cap: int | None,
              reject_unmeetable: bool, aging_s: float, band_aging_s: float) -> None:
        self.slots = {f"b{i}": slots for i, (slots, _) in enumerate(backends)}
        self.loaded = {f"b{i}": key for i, (_, key) in enumerate(backends)}
        self.state = dict.fromkeys(self.slots, "ready")
        self.weights = dict(zip(TENANTS, weights, strict=True))
        self.caps = {"short": None, "medium": medium_cap, "long": long_cap}
        rules = [ClassRule(name="short", max_chars=50),
                 ClassRule(name="medium", max_chars=200, max_in_service=medium_cap),
                 ClassRule(name="long", max_chars=None, max_in_service=long_cap)]
        queue = make_queue(self.order, max_size=max_size, max_per_tenant=max_per_tenant, within_tenant=within,
                           aging_s=aging_s, band_aging_s=band_aging_s)
        self.max_size = max_size
        self.scheduler = Scheduler(queue=queue, cost=CostModel(), classes=LengthClasses(rules), deadlines=TIERS,
                                   reject_unmeetable=reject_unmeetable)

    def views(self) -> list[BackendView]:
        return [BackendView(id=b, ready=self.state[b] == "ready", alive=self.state[b] != "down",
                            slots=self.slots[b], model_key=self.loaded[b]) for b in self.slots]

    def where(self, *places: str) -> list[Track]:
        return [t for t in self.tracks.values() if t.where in places]

    # --- rules ---

    @rule(n=st.integers(1, 3), tenant=st.sampled_from(TENANTS), band=st.integers(0, 2), chars=st.integers(1, 400),
          key=st.sampled_from(KEYS))
    def offer_burst(self, n: int, tenant: str, band: int, chars: int, key: ModelKey) -> None:
        for _ in range(n):
            self.offer(tenant=tenant, band=band, chars=chars, key=key, budget=None, bound=None)

    @rule(tenant=st.sampled_from(TENANTS), band=st.integers(0, 2), chars=st.integers(1, 400),
          key=st.sampled_from(KEYS), budget=st.none() | st.floats(0.5, 200.0), bound=st.none() | st.integers(1, 4))
    def offer(self, tenant: str, band: int, chars: int, key: ModelKey, budget: float | None,
              bound: int | None) -> None:
        self.next_id += 1
        job = self.scheduler.make_job(id=f"j{self.next_id}", chars=chars, units=float(chars), model_key=key,
                                      now=self.now, tenant=tenant, weight=self.weights[tenant], band=band,
                                      tenant_bound=bound, client_budget_s=budget)
        assert job.deadline_at <= self.now + TIERS.budget_s(chars=chars, prediction=self.scheduler.cost.predict(
            job.units, key)) + 1e-9
        rejection = self.scheduler.offer(job, self.now, self.views())
        self.offers += 1
        if rejection is None:
            self.tracks[job.id] = Track(job=job)
        else:
            self.rejections += 1
            assert rejection.status in (429, 503)
            assert rejection.retry_after_s is None or rejection.retry_after_s >= 0
            assert job.id not in {j.id for j in self.scheduler.queue.jobs()}

    @rule(dt=st.floats(0.0, 5.0))
    def schedule(self, dt: float) -> None:
        self.now += dt
        self._schedule()

    @rule(dt=st.floats(0.0, 5.0), finish=st.booleans())
    def pump(self, dt: float, finish: bool) -> None:
        """What the async edge does on each event: the oldest running job may finish, queued
        deadlines fire, the scheduler runs."""
        self.now += dt
        running = self.where("running")
        if finish and running:
            self.finish(pick=0, ok=True, dt=0.0)
        self._expire()
        self._schedule()

    def _schedule(self) -> None:
        views = self.views()
        ready = {v.id for v in views if v.ready}
        pool_slots = sum(self.slots[b] for b in ready)
        before = Counter(t.job.cls for t in self.where("running"))
        assignments = self.scheduler.schedule(self.now, views)
        assert len({a.job.id for a in assignments}) == len(assignments)
        for a in assignments:
            track = self.tracks[a.job.id]
            assert track.where == "queued", f"{a.job.id} dispatched while {track.where}"
            assert a.backend_id in ready
            track.where, track.backend = "running", a.backend_id
            track.dispatches += 1
            self.dispatch_events += 1
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        for a in assignments:  # the backend now holds the job's configuration
            self.loaded[a.backend_id] = a.job.model_key
        after = Counter(t.job.cls for t in self.where("running"))
        for cls in {a.job.cls for a in assignments}:
            cap = self.caps[cls]
            if cap is not None:
                assert before[cls] < expected_cap(cap, pool_slots)
                assert after[cls] <= expected_cap(cap, pool_slots)

    @precondition(lambda self: bool(self.where("running")))
    @rule(pick=st.integers(0, 10**6), ok=st.booleans(), dt=st.floats(0.0, 5.0))
    def finish(self, pick: int, ok: bool, dt: float) -> None:
        self.now += dt
        running = self.where("running")
        track = running[pick % len(running)]
        done = self.scheduler.finish(track.job.id, self.now, ok=ok)
        assert done is not None and done.job is track.job and done.backend_id == track.backend
        track.where, track.ok = "finished", ok
        track.answers += 0 if track.early else 1
        assert self.scheduler.finish(track.job.id, self.now, ok=ok) is None  # a second finish changes nothing

    @precondition(lambda self: bool(self.tracks))
    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        tracks = list(self.tracks.values())
        track = tracks[pick % len(tracks)]
        got = self.scheduler.cancel(track.job.id)
        if track.where == "queued":
            assert got is track.job
            track.where = "cancelled"
        else:
            assert got is None

    @rule(dt=st.floats(0.0, 10.0))
    def expire(self, dt: float) -> None:
        self.now += dt
        self._expire()

    @precondition(lambda self: bool(self.where("queued")))
    @rule()
    def expire_at_the_next_deadline(self) -> None:
        at = self.scheduler.next_deadline()
        assert at is not None
        self.now = max(self.now, at)
        assert self._expire() or at < self.now

    def _expire(self) -> int:
        expiry = self.expiry
        due = {t.job.id for t in self.where("queued") if expiry(t.job) <= self.now}
        got = self.scheduler.expire(self.now)
        in_order = sorted(due, key=lambda i: (expiry(self.tracks[i].job), self.tracks[i].job.seq))
        assert [j.id for j in got] == in_order
        for job in got:
            track = self.tracks[job.id]
            track.where = "expired"
            track.shed = self.now < job.deadline_at
            track.answers += 1
        return len(got)

    def expiry(self, job: Job) -> float:
        """The model of ``Scheduler.expires_at``: with deadlines enforced, a job predicted to fit
        when it arrived leaves at its latest start; any other at its deadline."""
        if self.scheduler.reject_unmeetable and job.arrived_at + job.predicted_s <= job.deadline_at:
            return job.deadline_at - job.predicted_s
        return job.deadline_at

    @precondition(lambda self: bool(self.tracks))
    @rule(pick=st.integers(0, 10**6))
    def answered_early(self, pick: int) -> None:
        tracks = list(self.tracks.values())
        track = tracks[pick % len(tracks)]
        counted = self.scheduler.tally.expired_running
        self.scheduler.answered_early(track.job.id)
        if track.where == "running" and not track.early:
            track.early = True
            track.answers += 1
            assert self.scheduler.tally.expired_running == counted + 1
        else:  # not running, or already answered: nothing happens
            assert self.scheduler.tally.expired_running == counted

    @precondition(lambda self: bool(self.tracks))
    @rule(pick=st.integers(0, 10**6), dt=st.floats(0.0, 10.0))
    def requeue(self, pick: int, dt: float) -> None:
        self.now += dt
        tracks = list(self.tracks.values())
        track = tracks[pick % len(tracks)]
        # The contract: only a job whose backend failed before answering, so not one answered early.
        if track.where == "running" and not track.early:
            assert self.scheduler.requeue(track.job.id, self.now)
            track.where, track.backend = "queued", None
            track.requeues += 1
        elif track.where != "running":
            assert not self.scheduler.requeue(track.job.id, self.now)

    @rule(pick=st.integers(0, 3), state=st.sampled_from(["ready", "ready", "starting", "down"]))
    def flip_backend(self, pick: int, state: str) -> None:
        backends = sorted(self.state)
        self.state[backends[pick % len(backends)]] = state

    # --- invariants ---

    @invariant()
    def every_job_in_exactly_one_place(self) -> None:
        queued = {j.id for j in self.scheduler.queue.jobs()}
        running = set(self.scheduler.running)
        assert not queued & running
        assert len(self.scheduler.queue) == len(queued)
        assert queued == {t.job.id for t in self.where("queued")}
        assert running == {t.job.id for t in self.where("running")}
        for t in self.tracks.values():
            assert t.answers <= 1, f"{t.job.id} answered twice"
            if t.where in ("expired", "finished"):
                assert t.answers == 1
            elif t.where == "running":
                assert t.answers == int(t.early)
                assert self.scheduler.running[t.job.id].backend_id == t.backend
            else:  # queued, or cancelled (the client is gone: nobody to answer)
                assert t.answers == 0
            in_service = t.where in ("running", "finished")
            assert t.dispatches == t.requeues + in_service, f"{t.job.id} dispatched twice"

    @invariant()
    def backends_never_run_more_than_their_slots(self) -> None:
        per_backend = Counter(r.backend_id for r in self.scheduler.running.values())
        for backend, n in per_backend.items():
            assert n <= self.slots[backend]

    @invariant()
    def queue_bound_holds_except_for_requeued_jobs(self) -> None:
        requeued = sum(1 for t in self.where("queued") if t.requeues)
        assert len(self.scheduler.queue) <= self.max_size + requeued

    @invariant()
    def tally_adds_up(self) -> None:
        tally = self.scheduler.tally
        count = Counter(t.where for t in self.tracks.values())
        assert tally.admitted == len(self.tracks)
        assert tally.admitted == (len(self.scheduler.queue) + len(self.scheduler.running) + tally.cancelled
                                  + tally.expired_queued + tally.shed + tally.completed + tally.failed)
        assert tally.cancelled == count["cancelled"]
        assert tally.expired_queued == sum(1 for t in self.where("expired") if not t.shed)
        assert tally.shed == sum(1 for t in self.where("expired") if t.shed)
        assert tally.completed == sum(1 for t in self.where("finished") if t.ok)
        assert tally.failed == sum(1 for t in self.where("finished") if not t.ok)
        assert tally.expired_running == sum(1 for t in self.tracks.values() if t.early)
        assert tally.dispatched == self.dispatch_events
        assert sum(tally.rejected.values()) == self.rejections
        assert tally.orphaned_s >= 0

    @invariant()
    def next_deadline_is_the_earliest_queued_one(self) -> None:
        deadlines = [self.expiry(t.job) for t in self.where("queued")]
        assert self.scheduler.next_deadline() == (min(deadlines) if deadlines else None)

    @invariant()
    def status_agrees(self) -> None:
        status: dict[str, Any] = self.scheduler.status(self.now)
        assert status["depth"] == len(self.where("queued"))
        assert status["in_service"] == len(self.where("running"))
        assert sum(status["by_tenant"].values()) == status["depth"]
        assert status["admitted"] == len(self.tracks)


class FifoSchedulerMachine(SchedulerMachine):
    order = "fifo"


class FairSchedulerMachine(SchedulerMachine):
    order = "fair"


MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None, database=None)
TestFifoScheduler = FifoSchedulerMachine.TestCase
TestFifoScheduler.settings = MACHINE_SETTINGS
TestFairScheduler = FairSchedulerMachine.TestCase
TestFairScheduler.settings = MACHINE_SETTINGS


# --- 2: class caps, directly ------------------------------------------------------------------------


CAPPED = [ClassRule(name="short", max_chars=50), ClassRule(name="long", max_chars=None, max_in_service=3)]


@settings(max_examples=80, deadline=None, database=None)
@given(n_backends=st.integers(1, 4), slots=st.integers(1, 3), cap=st.integers(1, 5), n_long=st.integers(0, 12),
       n_short=st.integers(0, 12), long_first=st.booleans())
def test_a_class_cap_is_never_exceeded(n_backends: int, slots: int, cap: int, n_long: int, n_short: int,
                                       long_first: bool) -> None:
    """Long jobs in service <= min(max_in_service, pool_slots - 1) for a pool of 2+ slots (<= 1 for
    a one-slot pool), through a full drain; slots left over go to the uncapped class."""
    rules = [ClassRule(name="short", max_chars=50), ClassRule(name="long", max_chars=None, max_in_service=cap)]
    scheduler = make_scheduler(rules=rules)
    views = [view(f"b{i}", slots=slots) for i in range(n_backends)]
    pool_slots = n_backends * slots
    limit = expected_cap(cap, pool_slots)
    assert scheduler.classes.cap("long", pool_slots) == limit
    assert scheduler.classes.cap("short", pool_slots) is None
    chars = [300] * n_long + [10] * n_short
    for i, c in enumerate(chars if long_first else chars[::-1]):
        job = scheduler.make_job(id=f"j{i}", chars=c, units=float(c), model_key=K24, now=0.0)
        assert scheduler.offer(job, 0.0, views) is None
    first = scheduler.schedule(0.0, views)
    longs = sum(1 for a in first if a.job.cls == "long")
    assert longs <= limit
    if long_first:
        assert longs == min(n_long, limit)
    assert len(first) == min(pool_slots, longs + n_short)  # the cap leaves room for short jobs
    now = 0.0
    while scheduler.running:  # drain, one finish at a time
        now += 1.0
        scheduler.finish(next(iter(scheduler.running)), now, ok=True)
        scheduler.schedule(now, views)
        assert sum(1 for r in scheduler.running.values() if r.job.cls == "long") <= limit
    assert len(scheduler.queue) == 0
    assert scheduler.tally.completed == n_long + n_short


def test_a_capped_class_never_fills_a_pool_of_two_or_more_slots() -> None:
    scheduler = make_scheduler(rules=CAPPED)
    views = [view("a"), view("b")]
    for i in range(5):
        assert scheduler.offer(scheduler.make_job(id=f"l{i}", chars=500, units=500.0, model_key=K24, now=0.0), 0.0,
                               views) is None
    assert len(scheduler.schedule(0.0, views)) == 1  # cap 3, but one of the 2 slots stays for shorter texts
    scheduler.offer(scheduler.make_job(id="s", chars=10, units=10.0, model_key=K24, now=1.0), 1.0, views)
    assert [a.job.id for a in scheduler.schedule(1.0, views)] == ["s"]


def test_length_classes() -> None:
    classes = LengthClasses([ClassRule(name="short", max_chars=50), ClassRule(name="medium", max_chars=200),
                             ClassRule(name="long", max_chars=None, max_in_service=2)])
    assert [classes.of(n).name for n in (0, 50, 51, 200, 201, 10**6)] == ["short", "short", "medium", "medium",
                                                                          "long", "long"]
    assert [classes.cap("long", n) for n in (0, 1, 2, 3, 10)] == [1, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        LengthClasses([ClassRule(name="short", max_chars=50)])
    with pytest.raises(ValueError):
        LengthClasses([])


# --- 4: deadlines -------------------------------------------------------------------------------------

STARTING = [view("s", ready=False, alive=True)]  # admits (a backend will serve) but dispatches nothing


@settings(max_examples=100, deadline=None, database=None)
@given(arrived=st.floats(0.0, 1e5), budget=st.floats(0.001, 1000.0))
def test_a_queued_deadline_fires_at_exactly_its_time(arrived: float, budget: float) -> None:
    """``next_deadline()`` is the job's deadline_at, so a timer armed with it fires within one
    tick; ``expire`` returns the job at deadline_at and not 1 ns before."""
    scheduler = make_scheduler()
    job = scheduler.make_job(id="j", chars=10, units=10.0, model_key=K24, now=arrived, client_budget_s=budget)
    assert job.deadline_at == arrived + budget
    assert scheduler.offer(job, arrived, STARTING) is None
    assert scheduler.next_deadline() == job.deadline_at
    before = job.deadline_at - 1e-9
    assert before < job.deadline_at
    assert scheduler.expire(before) == []
    assert scheduler.next_deadline() == job.deadline_at
    assert scheduler.expire(job.deadline_at) == [job]
    assert scheduler.next_deadline() is None
    assert scheduler.expire(math.inf) == []
    assert scheduler.tally.expired_queued == 1


def test_cancelled_and_dispatched_jobs_do_not_expire_and_next_deadline_skips_them() -> None:
    scheduler = make_scheduler()
    jobs = [scheduler.make_job(id=f"j{d}", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=float(d))
            for d in (10, 20, 30, 40)]
    for job in jobs:
        assert scheduler.offer(job, 0.0, STARTING) is None
    assert scheduler.next_deadline() == 10.0
    assert scheduler.cancel("j10") is jobs[0]
    assert scheduler.next_deadline() == 20.0
    assert [a.job.id for a in scheduler.schedule(1.0, [view("b")])] == ["j20"]
    assert scheduler.next_deadline() == 30.0
    assert scheduler.expire(35.0) == [jobs[2]]  # not the cancelled j10, not the running j20
    assert scheduler.next_deadline() == 40.0
    # The running job's backend fails after its deadline: back in line, it expires at once.
    assert scheduler.requeue("j20", 36.0)
    assert scheduler.next_deadline() == 20.0
    assert scheduler.expire(36.0) == [jobs[1]]
    assert scheduler.expire(100.0) == [jobs[3]]
    assert scheduler.next_deadline() is None
    assert scheduler.tally.expired_queued == 3
    assert scheduler.tally.cancelled == 1


def test_with_deadlines_enforced_a_queued_job_leaves_at_its_latest_start() -> None:
    """Its deadline less its predicted service: started any later it would be predicted to finish
    late even alone, so it is shed then (counted apart) and the slot goes to work that can make it."""
    scheduler = make_scheduler(reject_unmeetable=True)
    busy = scheduler.make_job(id="busy", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=100.0)
    assert scheduler.offer(busy, 0.0, [view("b")]) is None
    assert [a.job.id for a in scheduler.schedule(0.0, [view("b")])] == ["busy"]
    job = scheduler.make_job(id="j", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=10.0)
    assert 2 * job.predicted_s < 10.0  # fits after the running one: admitted
    assert scheduler.offer(job, 0.0, [view("b")]) is None
    latest = job.deadline_at - job.predicted_s
    assert scheduler.expires_at(job) == latest == scheduler.next_deadline()
    assert scheduler.expire(math.nextafter(latest, 0.0)) == []
    assert scheduler.expire(latest) == [job]
    assert (scheduler.tally.shed, scheduler.tally.expired_queued) == (1, 0)
    assert scheduler.status(latest)["shed"] == 1
    assert scheduler.next_deadline() is None


def test_a_job_admitted_against_its_prediction_waits_until_its_deadline() -> None:
    """Admitted although its prediction exceeds its budget (here: forced back in, as a task after a
    restart; also a first request on an idle pool while a prior is still far off, admission's
    ``_learns``): that prediction does not shed it. Nor is any job shed when deadlines are not
    enforced."""
    scheduler = make_scheduler(reject_unmeetable=True)
    job = scheduler.make_job(id="j", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=1.0)
    assert job.predicted_s > 1.0
    assert scheduler.offer(job, 0.0, STARTING, force=True) is None
    assert scheduler.next_deadline() == job.deadline_at == 1.0
    assert scheduler.expire(1.0) == [job] and scheduler.tally.expired_queued == 1
    lenient = make_scheduler(reject_unmeetable=False)
    fits = lenient.make_job(id="k", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=100.0)
    assert lenient.offer(fits, 0.0, STARTING) is None
    assert lenient.next_deadline() == fits.deadline_at
    assert lenient.expire(fits.deadline_at - fits.predicted_s) == []


def test_a_reload_recomputes_expiries_under_the_new_rule() -> None:
    old = make_scheduler(reject_unmeetable=False)
    job = old.make_job(id="j", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=100.0)
    assert old.offer(job, 0.0, STARTING) is None
    new = make_scheduler(reject_unmeetable=True)
    new.adopt(old)
    assert new.next_deadline() == job.deadline_at - job.predicted_s


def test_the_client_budget_only_shortens_the_policy_deadline() -> None:
    scheduler = make_scheduler(timeout_s=60.0)
    assert scheduler.make_job(id="a", chars=1, units=1.0, model_key=K24, now=5.0).deadline_at == 65.0
    assert scheduler.make_job(id="b", chars=1, units=1.0, model_key=K24, now=5.0, client_budget_s=10.0
                              ).deadline_at == 15.0
    assert scheduler.make_job(id="c", chars=1, units=1.0, model_key=K24, now=5.0, client_budget_s=1e4
                              ).deadline_at == 65.0


# --- the rest of the contract -------------------------------------------------------------------------


def test_a_requeued_job_keeps_its_place_and_deadline() -> None:
    scheduler = make_scheduler()
    first = scheduler.make_job(id="first", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=50.0)
    assert scheduler.offer(first, 0.0, [view("b")]) is None
    assert [a.job.id for a in scheduler.schedule(0.0, [view("b")])] == ["first"]
    later = scheduler.make_job(id="later", chars=10, units=10.0, model_key=K24, now=1.0)
    assert scheduler.offer(later, 1.0, [view("b")]) is None
    assert scheduler.requeue("first", 2.0)
    assert not scheduler.requeue("first", 2.0)  # it is queued, not running
    assert [a.job.id for a in scheduler.schedule(3.0, [view("b")])] == ["first"]
    assert first.deadline_at == 50.0
    assert scheduler.tally.dispatched == 2


def test_finish_learns_only_from_successes_and_counts_orphaned_time() -> None:
    scheduler = make_scheduler()
    views = [view("b")]
    for i in range(2):
        job = scheduler.make_job(id=f"j{i}", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=5.0)
        assert scheduler.offer(job, 0.0, views) is None
    scheduler.schedule(0.0, views)
    scheduler.answered_early("j0")  # its client got 408 at 5.0; the backend works on until 12.0
    run = scheduler.finish("j0", 12.0, ok=True)
    assert run is not None and run.answered_early
    assert scheduler.tally.orphaned_s == pytest.approx(7.0)
    assert scheduler.cost.samples(K24) == 1
    scheduler.schedule(12.0, views)
    scheduler.finish("j1", 13.0, ok=False)
    assert scheduler.cost.samples(K24) == 1
    assert (scheduler.tally.completed, scheduler.tally.failed, scheduler.tally.expired_running) == (1, 1, 1)



# Every job-out call names its job by id and acts only on a job where it expects it; any other id
# (unknown, or already closed, or elsewhere) changes nothing: a late or repeated call is harmless.


def busy_scheduler() -> tuple[Scheduler, Job, Job]:
    """One backend of one slot running ``r``; ``q`` waiting behind it."""
    scheduler = make_scheduler()
    running, queued = (scheduler.make_job(id=i, chars=10, units=10.0, model_key=K24, now=0.0) for i in "rq")
    for job in (running, queued):
        assert scheduler.offer(job, 0.0, [view("b")]) is None
    assert [a.job.id for a in scheduler.schedule(0.0, [view("b")])] == ["r"]
    return scheduler, running, queued


def held(scheduler: Scheduler) -> tuple[Any, ...]:
    """Everything a job-out call could change: the queue, the running jobs, the counters, the cost model."""
    return ([j.id for j in scheduler.queue.jobs()], {i: replace(r) for i, r in scheduler.running.items()},
            scheduler.status(1.0), scheduler.cost.samples(K24), scheduler.next_deadline())


def test_finish_closes_a_running_job_once_and_ignores_any_other_id() -> None:
    scheduler, running, queued = busy_scheduler()
    before = held(scheduler)
    for job_id in ("nobody", queued.id):  # never admitted; still queued (it leaves only by cancel or expire)
        for ok in (True, False):
            assert scheduler.finish(job_id, 1.0, ok=ok) is None
    assert held(scheduler) == before
    done = scheduler.finish(running.id, 1.0, ok=True)
    assert done is not None and done.job is running
    after = held(scheduler)
    assert after[2]["completed"] == 1 and after[3] == 1 and running.id not in scheduler.running
    for ok in (True, False):  # a second finish, either way: nothing more is counted or learned
        assert scheduler.finish(running.id, 2.0, ok=ok) is None
    assert held(scheduler) == after


def test_requeue_takes_back_only_a_running_job_not_answered_early() -> None:
    scheduler, running, queued = busy_scheduler()
    before = held(scheduler)
    for job_id in ("nobody", queued.id):
        assert not scheduler.requeue(job_id, 1.0)
    assert held(scheduler) == before
    scheduler.answered_early(running.id)  # its client has its 408: nothing to redo, its slot stays busy
    answered = held(scheduler)
    assert not scheduler.requeue(running.id, 1.0)
    assert held(scheduler) == answered and scheduler.schedule(1.0, [view("b")]) == []
    assert scheduler.finish(running.id, 2.0, ok=False) is not None
    finished = held(scheduler)
    assert not scheduler.requeue(running.id, 2.0)  # finished: it does not come back
    assert held(scheduler) == finished


def test_cancel_takes_out_only_a_queued_job() -> None:
    scheduler, running, queued = busy_scheduler()
    before = held(scheduler)
    for job_id in ("nobody", running.id):  # never admitted; running (it holds its slot until finish)
        assert scheduler.cancel(job_id) is None
    assert held(scheduler) == before
    assert scheduler.cancel(queued.id) is queued
    after = held(scheduler)
    assert after[2]["cancelled"] == 1 and after[0] == []
    assert scheduler.cancel(queued.id) is None  # a second cancel
    assert held(scheduler) == after


def test_answered_early_counts_a_running_job_once_and_ignores_any_other_id() -> None:
    scheduler, running, queued = busy_scheduler()
    before = held(scheduler)
    for job_id in ("nobody", queued.id):
        scheduler.answered_early(job_id)
    assert held(scheduler) == before and not scheduler.running[running.id].answered_early
    for _ in range(2):
        scheduler.answered_early(running.id)
    assert scheduler.tally.expired_running == 1

def test_a_job_whose_class_a_reload_renamed_is_still_dispatched() -> None:
    old = make_scheduler(rules=[ClassRule(name="huge", max_chars=None, max_in_service=1)])
    assert old.offer(old.make_job(id="j", chars=500, units=500.0, model_key=K24, now=0.0), 0.0, STARTING) is None
    new = make_scheduler(rules=CAPPED)
    new.adopt(old)
    assert [a.job.id for a in new.schedule(1.0, [view("b")])] == ["j"]


def test_nothing_is_dispatched_to_a_backend_that_is_not_ready() -> None:
    scheduler = make_scheduler()
    assert scheduler.offer(scheduler.make_job(id="j", chars=10, units=10.0, model_key=K24, now=0.0), 0.0,
                           STARTING) is None
    assert scheduler.schedule(0.0, STARTING) == []
    assert scheduler.schedule(0.0, [view("s", ready=False), view("r")])[0].backend_id == "r"


# --- class bands, and waits that count work arriving in higher bands ---------------------------------


def test_a_class_band_lifts_its_jobs_but_never_lowers_them() -> None:
    s = Scheduler(queue=make_queue("fair", max_size=100), cost=CostModel(),
                  classes=LengthClasses([ClassRule(name="short", max_chars=50, band=0),
                                         ClassRule(name="long", max_chars=None)]),
                  deadlines=TIERS)
    short = s.make_job(id="s", chars=20, units=20, model_key=K24, now=0.0, band=2)
    long = s.make_job(id="l", chars=300, units=300, model_key=K24, now=0.0, band=2)
    assert (short.band, long.band) == (0, 2)
    assert s.make_job(id="s0", chars=20, units=20, model_key=K24, now=0.0, band=0).band == 0


def test_a_short_lifted_to_a_higher_band_goes_before_earlier_long_jobs() -> None:
    s = Scheduler(queue=make_queue("fair", max_size=100), cost=CostModel(),
                  classes=LengthClasses([ClassRule(name="short", max_chars=50, band=0),
                                         ClassRule(name="long", max_chars=None)]),
                  deadlines=TIERS, reject_unmeetable=False)
    backends = [view("b0")]
    for i in range(3):
        assert s.offer(s.make_job(id=f"l{i}", chars=300, units=300, model_key=K24, now=0.0, band=1), 0.0,
                       backends) is None
    assert [a.job.id for a in s.schedule(0.0, backends)] == ["l0"]
    assert s.offer(s.make_job(id="s", chars=20, units=20, model_key=K24, now=1.0, band=1), 1.0, backends) is None
    s.finish("l0", 50.0, ok=True)
    assert [a.job.id for a in s.schedule(50.0, backends)] == ["s"]


def test_work_rate_measures_admitted_work_per_second_in_higher_bands() -> None:
    s = make_scheduler(order="fair")
    backends = [view("b0", slots=4)]
    # 2 s of predicted work every second into band 0 for 120 s (well past the averaging window).
    now = 0.0
    for i in range(120):
        now = float(i)
        job = s.make_job(id=f"h{i}", chars=20, units=20, model_key=K24, now=now, band=0)
        job.predicted_s = 2.0
        assert s.offer(job, now, backends) is None
        s.queue.remove(job.id)  # keep the queue empty: only the arrival rate matters here
    assert s.work_rate(now, above_band=1) == pytest.approx(2.0, rel=0.05)
    assert s.work_rate(now, above_band=0) == 0.0  # nothing is above the highest band


def test_work_rate_right_after_the_first_admission_is_zero_not_a_division_by_zero() -> None:
    s = make_scheduler(order="fair")
    backends = [view("b0")]
    assert s.offer(s.make_job(id="h", chars=20, units=20, model_key=K24, now=0.0, band=0), 0.0, backends) is None
    assert s.work_rate(5e-324, above_band=1) == 0.0  # the window underflows: nothing measured yet
    late = s.make_job(id="l", chars=20, units=20, model_key=K24, now=5e-324, band=1)
    assert s.offer(late, 5e-324, backends) is None


def test_the_wait_of_a_lower_band_job_grows_with_the_work_arriving_above_it() -> None:
    backends = [view("b0", slots=2)]

    def wait_with(rate_per_s: float) -> float:
        s = make_scheduler(order="fair")
        for i in range(60):
            if rate_per_s:
                job = s.make_job(id=f"h{i}", chars=20, units=20, model_key=K24, now=float(i), band=0)
                job.predicted_s = rate_per_s
                assert s.offer(job, float(i), backends) is None
                s.queue.remove(job.id)
        for i in range(4):  # 4 queued long jobs of band 1 ahead of the probe
            queued = s.make_job(id=f"q{i}", chars=300, units=300, model_key=K24, now=60.0, band=1)
            assert s.offer(queued, 60.0, backends) is None
        probe = s.make_job(id="p", chars=300, units=300, model_key=K24, now=60.0, band=1)
        return s.predicted_wait_s(probe, 60.0, backends)

    alone, busy = wait_with(0.0), wait_with(1.0)
    # One slot's worth of work arrives above it each second: half the pool is left, so twice the wait.
    assert busy == pytest.approx(2 * alone, rel=0.1)
    # Work above that would take the whole pool still leaves the band its minimum share.
    assert wait_with(5.0) == pytest.approx(alone / 0.1, rel=0.01)
