"""Admission (scheduler.core.admission) and the outlook the scheduler builds for it (scheduler.core.scheduler)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.admission import LEARN_FACTOR, STATUS, Outlook, Reason, admit
from scheduler.core.classes import ClassRule, LengthClasses
from scheduler.core.cost import CostModel
from scheduler.core.deadlines import Tier, TiersPolicy
from scheduler.core.queue import ModelKey, make_queue
from scheduler.core.running import BackendView
from scheduler.core.scheduler import Scheduler

K24: ModelKey = (24000, False)

OPEN = Outlook(can_serve=True, queued=3, max_queued=10, tenant_queued=1, tenant_max=5, wait_s=10.0, starts_now=False,
               idle=False, confirmed=True, service_s=3.5, budget_s=60.0, next_free_s=2.0, tenant_next_s=7.0)


def outlook(**changes: Any) -> Outlook:
    return dataclasses.replace(OPEN, **changes)


# --- admit(): each reason, its status and Retry-After -----------------------------------------------


def test_room_and_time_admit() -> None:
    assert admit(OPEN, reject_unmeetable=True) is None


@pytest.mark.parametrize(("changes", "reason", "status", "retry_after_s"), [
    ({"can_serve": False, "next_free_s": 0.0}, Reason.NO_BACKEND, 503, 1.0),  # never "retry now"
    ({"can_serve": False, "next_free_s": 12.0}, Reason.NO_BACKEND, 503, 12.0),
    ({"queued": 10}, Reason.QUEUE_FULL, 429, 2.0),  # when the next slot frees
    ({"tenant_queued": 5}, Reason.TENANT_QUEUE_FULL, 429, 7.0),  # when the tenant's head leaves the queue
    ({"wait_s": 58.0}, Reason.DEADLINE_UNMEETABLE, 429, 1.5),  # once the backlog drained by the excess
])
def test_each_reason_has_its_status_and_retry_after(changes: dict[str, Any], reason: Reason,
                                                    status: int, retry_after_s: float) -> None:
    rejection = admit(outlook(**changes), reject_unmeetable=True)
    assert rejection is not None
    assert (rejection.reason, rejection.status, rejection.retry_after_s) == (reason, status, retry_after_s)
    assert STATUS[reason] == status
    assert rejection.detail


def test_reasons_are_checked_in_order() -> None:
    everything = outlook(can_serve=False, queued=10, tenant_queued=5, wait_s=1e6)
    order: list[Reason] = []
    fixes: list[dict[str, Any]] = [{}, {"can_serve": True}, {"queued": 0}, {"tenant_queued": 0}]
    for fix in fixes:
        everything = dataclasses.replace(everything, **fix)
        rejection = admit(everything, reject_unmeetable=True)
        assert rejection is not None
        order.append(rejection.reason)
    assert order == [Reason.NO_BACKEND, Reason.QUEUE_FULL, Reason.TENANT_QUEUE_FULL, Reason.DEADLINE_UNMEETABLE]


def test_reject_unmeetable_off_admits_what_cannot_make_it() -> None:
    late = outlook(wait_s=100.0)
    assert admit(late, reject_unmeetable=False) is None
    rejection = admit(late, reject_unmeetable=True)
    assert rejection is not None and rejection.reason is Reason.DEADLINE_UNMEETABLE


def test_exactly_meeting_the_deadline_is_admitted() -> None:
    assert admit(outlook(wait_s=56.5), reject_unmeetable=True) is None  # 56.5 + 3.5 == 60


def test_a_job_that_starts_now_is_not_refused_for_its_wait() -> None:
    assert admit(outlook(wait_s=1e6, starts_now=True), reject_unmeetable=True) is None


def test_with_nothing_running_or_queued_an_unconfirmed_prediction_does_not_refuse_a_job() -> None:
    """Predicted service over the deadline, but no completion backs the prediction: with nothing
    running or waiting the job is admitted, since its completion is how the model learns. Once
    completions confirm the prediction, or while other work runs or waits, it is refused."""
    too_long = outlook(service_s=90.0, budget_s=60.0, wait_s=0.0, confirmed=False)
    assert admit(dataclasses.replace(too_long, starts_now=True, idle=True), reject_unmeetable=True) is None
    hopeless = dataclasses.replace(too_long, budget_s=90.0 / LEARN_FACTOR * 0.99)  # 20x too slow would not do
    for starts_now, idle, confirmed in ((True, True, True), (True, False, False), (False, True, False)):
        changed = dataclasses.replace(too_long, starts_now=starts_now, idle=idle, confirmed=confirmed)
        for refused in (changed, dataclasses.replace(hopeless, starts_now=True, idle=True)):
            rejection = admit(refused, reject_unmeetable=True)
            assert rejection is not None and rejection.reason is Reason.DEADLINE_UNMEETABLE
            assert rejection.retry_after_s is None


@settings(max_examples=300, deadline=None, database=None)
@given(can_serve=st.booleans(), queued=st.integers(0, 20), tenant_queued=st.integers(0, 20),
       wait_s=st.floats(0.0, 1e4), service_s=st.floats(0.0, 1e3), budget_s=st.floats(0.001, 1e4),
       next_free_s=st.floats(0.0, 1e3), tenant_next_s=st.floats(0.0, 1e3), reject_unmeetable=st.booleans(),
       starts_now=st.booleans(), idle=st.booleans(), confirmed=st.booleans())
def test_admission_is_exactly_the_four_rules(can_serve: bool, queued: int, tenant_queued: int, wait_s: float,
                                             service_s: float, budget_s: float, next_free_s: float,
                                             tenant_next_s: float, reject_unmeetable: bool, starts_now: bool,
                                             idle: bool, confirmed: bool) -> None:
    """Admitted iff every rule passes; a deadline rejection's Retry-After is > 0 (the excess). A job
    that starts now has no wait; one that starts now with nothing else running or queued is
    admitted whatever its prediction until completions confirm that."""
    o = Outlook(can_serve=can_serve, queued=queued, max_queued=10, tenant_queued=tenant_queued, tenant_max=5,
                wait_s=wait_s, starts_now=starts_now, idle=idle, confirmed=confirmed, service_s=service_s,
                budget_s=budget_s, next_free_s=next_free_s, tenant_next_s=tenant_next_s)
    rejection = admit(o, reject_unmeetable=reject_unmeetable)
    learns = starts_now and idle and not confirmed and service_s <= budget_s * LEARN_FACTOR
    fits = not reject_unmeetable or learns or (0.0 if starts_now else wait_s) + service_s <= budget_s
    assert (rejection is None) == (can_serve and queued < 10 and tenant_queued < 5 and fits)
    if rejection is not None:
        if rejection.reason is Reason.DEADLINE_UNMEETABLE and service_s > budget_s:
            assert rejection.retry_after_s is None  # no wait would make it fit: no Retry-After
            return
        assert rejection.retry_after_s is not None and rejection.retry_after_s >= 0
        if rejection.reason is Reason.NO_BACKEND:
            assert rejection.retry_after_s >= 1.0
        if rejection.reason is Reason.DEADLINE_UNMEETABLE:
            assert rejection.retry_after_s == pytest.approx(wait_s + service_s - budget_s)
            assert rejection.retry_after_s > 0


# --- through Scheduler.offer: Retry-After from the predicted drain ---------------------------------------

ONE = [BackendView(id="b", ready=True, alive=True, slots=1, model_key=K24)]


def make_scheduler(*, max_size: int = 3, max_per_tenant: int | None = None, reject_unmeetable: bool = False,
                   rules: list[ClassRule] | None = None) -> Scheduler:
    return Scheduler(queue=make_queue("fifo", max_size=max_size, max_per_tenant=max_per_tenant), cost=CostModel(),
                     classes=LengthClasses(rules or [ClassRule(name="all", max_chars=None)]),
                     deadlines=TiersPolicy([Tier(max_chars=None, timeout_s=1e6)]), reject_unmeetable=reject_unmeetable)


def start_one(scheduler: Scheduler, units: float, now: float = 0.0, views: list[BackendView] = ONE) -> float:
    """Dispatch one job of ``units``; its predicted service seconds."""
    job = scheduler.make_job(id=f"run{units}", chars=int(units), units=units, model_key=K24, now=now)
    assert scheduler.offer(job, now, views) is None
    assert [a.job.id for a in scheduler.schedule(now, views)] == [job.id]
    return job.predicted_s


def fill(scheduler: Scheduler, n: int, *, now: float, tenant: str = "t", units: float = 10.0) -> None:
    for i in range(n):
        job = scheduler.make_job(id=f"{tenant}{i}", chars=10, units=units, model_key=K24, now=now, tenant=tenant)
        assert scheduler.offer(job, now, ONE) is None


def test_no_backend_alive_is_503() -> None:
    scheduler = make_scheduler()
    down = [BackendView(id="b", ready=False, alive=False, slots=1, model_key=None)]
    rejection = scheduler.offer(scheduler.make_job(id="j", chars=10, units=10.0, model_key=K24, now=0.0), 0.0, down)
    assert rejection is not None
    assert (rejection.reason, rejection.status) == (Reason.NO_BACKEND, 503)
    assert rejection.retry_after_s >= 1.0
    assert scheduler.tally.rejected == {"no_backend": 1}
    starting = [BackendView(id="b", ready=False, alive=True, slots=1, model_key=None)]
    assert scheduler.offer(scheduler.make_job(id="k", chars=10, units=10.0, model_key=K24, now=0.0), 0.0,
                           starting) is None


@settings(max_examples=50, deadline=None, database=None)
@given(units=st.floats(20.0, 500.0), elapsed=st.floats(0.0, 0.9))
def test_a_full_queue_says_when_the_running_job_should_finish(units: float, elapsed: float) -> None:
    """429 queue_full with Retry-After = the running job's predicted remaining time (> 0)."""
    scheduler = make_scheduler(max_size=3)
    service = start_one(scheduler, units)
    fill(scheduler, 3, now=0.0)
    now = elapsed * service
    rejection = scheduler.offer(scheduler.make_job(id="x", chars=10, units=10.0, model_key=K24, now=now), now, ONE)
    assert rejection is not None
    assert (rejection.reason, rejection.status) == (Reason.QUEUE_FULL, 429)
    assert rejection.retry_after_s == pytest.approx(service - now)
    assert rejection.retry_after_s > 0
    assert "x" not in {j.id for j in scheduler.queue.jobs()}
    assert scheduler.tally.rejected == {"queue_full": 1}


def test_a_full_tenant_says_when_its_head_should_leave_the_queue() -> None:
    """429 tenant_queue_full; Retry-After = the predicted wait of the tenant's oldest queued job
    (the running job's remainder plus the other tenant's job queued ahead of it)."""
    scheduler = make_scheduler(max_size=10, max_per_tenant=1)
    service = start_one(scheduler, 100.0)
    fill(scheduler, 1, now=0.0, tenant="other", units=50.0)
    fill(scheduler, 1, now=0.0, tenant="t")
    ahead = scheduler.cost.predict(50.0, K24).mean_s
    now = 4.0
    rejection = scheduler.offer(scheduler.make_job(id="x", chars=10, units=10.0, model_key=K24, now=now, tenant="t"),
                                now, ONE)
    assert rejection is not None
    assert (rejection.reason, rejection.status) == (Reason.TENANT_QUEUE_FULL, 429)
    assert rejection.retry_after_s == pytest.approx(service - now + ahead)
    # The job's own bound wins over the queue's.
    roomy = scheduler.make_job(id="y", chars=10, units=10.0, model_key=K24, now=now, tenant="t", tenant_bound=2)
    assert scheduler.offer(roomy, now, ONE) is None


@pytest.mark.parametrize("reject_unmeetable", [True, False])
def test_an_unmeetable_deadline(reject_unmeetable: bool) -> None:
    scheduler = make_scheduler(max_size=10, reject_unmeetable=reject_unmeetable)
    service = start_one(scheduler, 500.0)  # ~80 s in service
    job = scheduler.make_job(id="x", chars=10, units=10.0, model_key=K24, now=0.0, client_budget_s=30.0)
    rejection = scheduler.offer(job, 0.0, ONE)
    if not reject_unmeetable:
        assert rejection is None
        return
    assert rejection is not None
    assert (rejection.reason, rejection.status) == (Reason.DEADLINE_UNMEETABLE, 429)
    assert rejection.retry_after_s == pytest.approx(service + job.predicted_s - 30.0)
    assert scheduler.tally.rejected == {"deadline_unmeetable": 1}
    assert scheduler.tally.admitted == 1  # only the running job


def test_a_full_queue_blocked_by_a_class_cap_does_not_say_retry_now() -> None:
    views = [BackendView(id=b, ready=True, alive=True, slots=1, model_key=K24) for b in ("a", "b")]
    scheduler = make_scheduler(max_size=2, rules=[ClassRule(name="short", max_chars=50),
                                                  ClassRule(name="long", max_chars=None, max_in_service=1)])
    service = start_one(scheduler, 500.0, views=views)  # the one long job the cap allows
    for i in range(2):
        job = scheduler.make_job(id=f"l{i}", chars=500, units=500.0, model_key=K24, now=0.0)
        assert scheduler.offer(job, 0.0, views) is None
    assert scheduler.schedule(1.0, views) == []  # b is free, but the queue cannot drain into it
    rejection = scheduler.offer(scheduler.make_job(id="x", chars=10, units=10.0, model_key=K24, now=1.0), 1.0, views)
    assert rejection is not None and rejection.reason is Reason.QUEUE_FULL
    assert rejection.retry_after_s >= service - 1.0  # today: 0.0


def test_a_prior_twenty_times_too_slow_does_not_lock_admission() -> None:
    """GPU-scale priors (3.5 s for a short text) in front of two backends 20x faster, deadlines of
    2 s: every request looked unmeetable and nothing was ever learned. The first is admitted
    (nothing runs or waits), its completion teaches the cost model, and requests arriving while
    others run are admitted as soon as the model has learned."""
    s = Scheduler(queue=make_queue("fifo", max_size=100), cost=CostModel(),
                  classes=LengthClasses([ClassRule(name="all", max_chars=None)]),
                  deadlines=TiersPolicy([Tier(max_chars=None, timeout_s=2.0)]), reject_unmeetable=True)
    views = [BackendView(id=b, ready=True, alive=True, slots=1, model_key=K24) for b in ("a", "b")]
    truth = CostModel().predict(20.0, K24).mean_s / 20  # 0.175 s
    ends: dict[str, float] = {}
    admitted: list[int] = []
    for i in range(30):  # one every 0.1 s: most arrive while another runs
        now = i * 0.1
        for job_id, end in sorted(ends.items(), key=lambda item: item[1]):
            if end <= now:
                s.finish(job_id, end, ok=True)
                del ends[job_id]
        job = s.make_job(id=f"j{i}", chars=20, units=20.0, model_key=K24, now=now)
        if s.offer(job, now, views) is None:
            admitted.append(i)
        for a in s.schedule(now, views):
            ends[a.job.id] = now + truth
    assert admitted[0] == 0
    assert admitted[-20:] == list(range(10, 30))
    assert s.cost.predict(20.0, K24).mean_s == pytest.approx(truth, rel=0.1)
    assert s.cost.confirmed(K24)


def test_a_confirmed_prediction_refuses_a_hopeless_deadline_even_when_idle() -> None:
    s = make_scheduler(reject_unmeetable=True)
    service = start_one(s, 20.0)
    s.finish("run20.0", service, ok=True)  # as predicted
    assert s.cost.confirmed(K24)
    job = s.make_job(id="x", chars=20, units=20.0, model_key=K24, now=service, client_budget_s=0.001)
    rejection = s.offer(job, service, ONE)
    assert rejection is not None and rejection.reason is Reason.DEADLINE_UNMEETABLE
    fresh = make_scheduler(reject_unmeetable=True)  # nothing measured yet: a plausible one is let through
    assert fresh.offer(fresh.make_job(id="x", chars=20, units=20.0, model_key=K24, now=0.0, client_budget_s=1.0),
                       0.0, ONE) is None
    hopeless = fresh.make_job(id="y", chars=20, units=20.0, model_key=K24, now=0.0, client_budget_s=0.001)
    assert make_scheduler(reject_unmeetable=True).offer(hopeless, 0.0, ONE) is not None
