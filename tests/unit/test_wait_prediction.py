"""Each job's own predicted wait (Scheduler.forecast / predicted_wait_s), checked against a
discrete-event simulation of the dispatcher (tests/simulation.py) that runs the real ``schedule``.

The bound, stated once: with nothing arriving after the job and every service taking exactly its
prediction, the forecast start equals the simulated dispatch time to within 1e-9 s (float
rounding), and says correctly whether it starts at once and whether its backend reloads first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtts.text import units
from scheduler.config import TierConfig, load_config
from scheduler.core import forecast as forecasting
from scheduler.core.admission import Reason
from scheduler.core.classes import ClassRule, LengthClasses
from scheduler.core.cost import CostModel, CostPriors
from scheduler.core.deadlines import Tier, TiersPolicy
from scheduler.core.queue import ModelKey, make_queue
from scheduler.core.running import BackendView
from scheduler.core.scheduler import Scheduler
from scheduler.runtime.build import build_scheduler
from tests.simulation import DispatchSimulation

K24: ModelKey = (24000, False)
K32: ModelKey = (32000, False)
KP: ModelKey = (24000, True)
TOLERANCE_S = 1e-9
TIERS = TiersPolicy([Tier(max_chars=50, timeout_s=30.0), Tier(max_chars=200, timeout_s=60.0),
                     Tier(max_chars=None, timeout_s=120.0)])
LONG_TEXT = "语音合成服务把文字变成自然流畅的声音。" * 24  # 456 characters, 444 units


def view(id: str, *, slots: int = 1, key: ModelKey | None = K24, ready: bool = True) -> BackendView:
    return BackendView(id=id, ready=ready, alive=True, slots=slots, model_key=key)


def scheduler(*, rules: list[ClassRule] | None = None, order: str = "fair", reload_s: float = 20.0,
              reject_unmeetable: bool = True, **queue: Any) -> Scheduler:
    return Scheduler(queue=make_queue(order, max_size=1000, **queue), cost=CostModel(CostPriors(reload_s=reload_s)),
                     classes=LengthClasses(rules or [ClassRule(name="all", max_chars=None)]), deadlines=TIERS,
                     reject_unmeetable=reject_unmeetable)


# --- the reproduction: an idle backend, and a short text refused for a wait it would not have ---------


def test_a_short_text_next_to_one_long_one_is_admitted_when_the_other_backend_is_idle() -> None:
    """Default configuration, short texts given 0.85 s: one long text (3.55 s) runs on one of the
    two backends, the other is idle. The short text starts at once; its wait is 0, not the ~1.8 s
    of the long text's remaining work spread over both slots."""
    config = load_config()
    tiers = (TierConfig(max_chars=50, timeout_s=0.85), *config.deadlines.tiers[1:])
    config = config.model_copy(update={"deadlines": config.deadlines.model_copy(update={"tiers": tiers})})
    s = build_scheduler(config)
    backends = [view(spec.id) for spec in config.backends.layout()]
    assert len(backends) == 2 and config.deadlines.reject_unmeetable
    long = s.make_job(id="long", chars=len(LONG_TEXT), units=units(LONG_TEXT), model_key=K24, now=0.0)
    assert long.predicted_s == pytest.approx(3.55, abs=0.01)
    assert s.offer(long, 0.0, backends) is None
    assert [a.job.id for a in s.schedule(0.0, backends)] == ["long"]
    text = "你好，欢迎使用语音合成服务。今天天气很好。"
    short = s.make_job(id="short", chars=len(text), units=units(text), model_key=K24, now=0.1)
    assert short.deadline_at - 0.1 == pytest.approx(0.85)
    assert s.offer(short, 0.1, backends) is None
    assert [(a.job.id, a.backend_id) for a in s.schedule(0.1, backends)] == [("short", backends[1].id)]


# --- slot-level waits, case by case --------------------------------------------------------------------


def start_running(s: Scheduler, job_id: str, chars: int, backends: list[BackendView], *, now: float = 0.0,
                  key: ModelKey = K24, **job: Any) -> float:
    """Offer and dispatch one job at ``now``; its predicted service seconds."""
    j = s.make_job(id=job_id, chars=chars, units=float(chars), model_key=key, now=now, **job)
    assert s.offer(j, now, backends) is None
    assert job_id in [a.job.id for a in s.schedule(now, backends)]
    return j.predicted_s


def test_an_express_slot_is_free_next_to_a_long_job() -> None:
    s = scheduler(rules=[ClassRule(name="short", max_chars=50, extra_slots=1), ClassRule(name="long", max_chars=None)])
    backends = [view("b0")]
    start_running(s, "long", 500, backends)
    short = s.make_job(id="s", chars=20, units=20.0, model_key=K24, now=1.0)
    forecast = s.forecast(short, 1.0, backends)
    assert (forecast.start_s, forecast.at_once) == (0.0, True)
    medium = s.make_job(id="m", chars=100, units=100.0, model_key=K24, now=1.0)  # no extra slot for it
    assert s.forecast(medium, 1.0, backends).start_s == pytest.approx(80.0 - 1.0)


def test_a_class_at_its_cap_waits_for_its_own_kind_to_finish_even_with_a_free_slot() -> None:
    s = scheduler(rules=[ClassRule(name="short", max_chars=50), ClassRule(name="long", max_chars=None,
                                                                          max_in_service=1)])
    backends = [view("b0"), view("b1"), view("b2")]
    first = start_running(s, "l0", 500, backends)
    second = s.make_job(id="l1", chars=300, units=300.0, model_key=K24, now=2.0)
    forecast = s.forecast(second, 2.0, backends)
    assert forecast.start_s == pytest.approx(first - 2.0) and not forecast.at_once
    short = s.make_job(id="s", chars=20, units=20.0, model_key=K24, now=2.0)
    assert s.forecast(short, 2.0, backends).at_once


def test_affinity_waits_for_a_busy_backend_when_that_beats_a_reload() -> None:
    s = scheduler(reload_s=20.0)
    backends = [view("b0", key=K24), view("b1", key=K32)]
    running = start_running(s, "r", 30, backends)  # 5.1 s on b0, the only 24 kHz backend
    job = s.make_job(id="j", chars=20, units=20.0, model_key=K24, now=1.0)
    forecast = s.forecast(job, 1.0, backends)
    assert forecast.start_s == pytest.approx(running - 1.0) and not forecast.reload
    # A reload that costs less than the wait: it switches the idle backend at once.
    cheap = scheduler(reload_s=0.5)
    start_running(cheap, "r", 30, backends)
    forecast = cheap.forecast(cheap.make_job(id="j", chars=20, units=20.0, model_key=K24, now=1.0), 1.0, backends)
    assert (forecast.start_s, forecast.at_once, forecast.reload) == (0.0, True, True)
    assert cheap.predicted_wait_s(cheap.make_job(id="k", chars=20, units=20.0, model_key=K24, now=1.0), 1.0,
                                  backends) == 0.5  # its service begins after the reload


def test_a_reloading_job_holds_its_slot_for_the_reload_too() -> None:
    s = scheduler(reload_s=3.0)
    backends = [view("b0", key=K32)]
    service = start_running(s, "r", 20, backends)  # switches b0 from 32 kHz: 3 s, then 3.5 s
    job = s.make_job(id="j", chars=20, units=20.0, model_key=K24, now=0.0)
    assert s.forecast(job, 0.0, backends).start_s == pytest.approx(3.0 + service)


def test_fair_queueing_puts_a_new_tenant_ahead_of_anothers_backlog() -> None:
    s = scheduler(order="fair")
    backends = [view("b0")]
    running = start_running(s, "r", 20, backends, tenant="a")
    for i in range(5):
        job = s.make_job(id=f"a{i}", chars=20, units=20.0, model_key=K24, now=0.0, tenant="a")
        assert s.offer(job, 0.0, backends) is None
    newcomer = s.make_job(id="b", chars=20, units=20.0, model_key=K24, now=0.0, tenant="b")
    # Tenant a was charged for the running job: b goes right after it, before a's backlog.
    assert s.forecast(newcomer, 0.0, backends).start_s == pytest.approx(running)
    fifo = scheduler(order="fifo")
    start_running(fifo, "r", 20, backends, tenant="a")
    for i in range(5):
        assert fifo.offer(fifo.make_job(id=f"a{i}", chars=20, units=20.0, model_key=K24, now=0.0, tenant="a"), 0.0,
                          backends) is None
    newcomer = fifo.make_job(id="b", chars=20, units=20.0, model_key=K24, now=0.0, tenant="b")
    assert fifo.forecast(newcomer, 0.0, backends).start_s == pytest.approx(6 * running)


def test_a_queued_job_that_expires_first_does_not_delay_the_ones_behind_it() -> None:
    s = scheduler(order="fifo", reject_unmeetable=False)
    backends = [view("b0")]
    running = start_running(s, "r", 100, backends)  # 16.25 s
    doomed = s.make_job(id="d", chars=20, units=20.0, model_key=K24, now=0.0, client_budget_s=5.0)
    assert s.offer(doomed, 0.0, backends) is None
    job = s.make_job(id="j", chars=20, units=20.0, model_key=K24, now=0.0)
    assert s.forecast(job, 0.0, backends).start_s == pytest.approx(running)


def test_without_a_ready_backend_the_starting_ones_stand_in() -> None:
    s = scheduler()
    starting = [view("b0", ready=False), view("b1", ready=False)]
    for i in range(2):
        assert s.offer(s.make_job(id=f"q{i}", chars=20, units=20.0, model_key=K24, now=0.0), 0.0, starting) is None
    job = s.make_job(id="j", chars=20, units=20.0, model_key=K24, now=0.0)
    forecast = s.forecast(job, 0.0, starting)
    assert forecast.start_s == pytest.approx(3.5) and not forecast.at_once
    assert not s.forecast(job, 0.0, [view("b2", ready=False)]).at_once  # a free slot, but not ready yet
    nothing_alive = [dataclasses.replace(v, alive=False) for v in starting]
    assert s.forecast(job, 0.0, nothing_alive).start_s == pytest.approx(7.0)  # one slot stands in


def test_a_pool_without_any_slot_still_gives_a_finite_wait() -> None:
    s = scheduler(order="fifo", reject_unmeetable=False)
    closed = [view("b0", slots=0)]
    for i in range(3):
        assert s.offer(s.make_job(id=f"q{i}", chars=20, units=20.0, model_key=K24, now=0.0, budget_s=math.inf), 0.0,
                       closed) is None
    job = s.make_job(id="j", chars=20, units=20.0, model_key=K24, now=0.0)
    assert s.forecast(job, 0.0, closed).start_s == pytest.approx(3 * 3.5)  # all of it ahead, one after the other


def test_the_wait_of_a_lower_band_job_is_stretched_by_work_arriving_above_it_but_zero_stays_zero() -> None:
    s = scheduler(order="fair")
    backends = [view("b0", slots=2)]
    for i in range(60):  # one slot's worth of work per second into band 0
        job = s.make_job(id=f"h{i}", chars=20, units=20.0, model_key=K24, now=float(i), band=0)
        job.predicted_s = 1.0
        assert s.offer(job, float(i), backends) is None
        s.queue.remove(job.id)
    running = start_running(s, "r", 100, backends, now=60.0, band=1)
    start_running(s, "r2", 100, backends, now=60.0, band=1)
    waiting = s.make_job(id="w", chars=20, units=20.0, model_key=K24, now=60.0, band=1)
    forecast = s.forecast(waiting, 60.0, backends)
    assert forecast.start_s == pytest.approx(running)
    assert s.predicted_wait_s(waiting, 60.0, backends) == pytest.approx(2 * running, rel=0.05)
    s.finish("r2", 61.0, ok=True)
    assert s.predicted_wait_s(waiting, 61.0, backends) == 0.0


# --- admission: a job that can start now is never refused for its wait ----------------------------------


def test_a_job_that_starts_now_and_fits_is_never_refused() -> None:
    s = scheduler(rules=[ClassRule(name="short", max_chars=50, extra_slots=1), ClassRule(name="long", max_chars=None)])
    backends = [view("b0")]
    start_running(s, "long", 500, backends)  # 80 s of work on the only backend
    short = s.make_job(id="s", chars=20, units=20.0, model_key=K24, now=0.0, client_budget_s=4.0)
    assert s.offer(short, 0.0, backends) is None
    late = s.make_job(id="late", chars=20, units=20.0, model_key=K24, now=0.0, client_budget_s=4.0)
    rejection = s.offer(late, 0.0, backends)  # the express slot is taken now: 3.5 s more to wait
    assert rejection is not None and rejection.reason is Reason.DEADLINE_UNMEETABLE


# --- the property: the forecast is the simulated dispatch time ------------------------------------------

KEYS: tuple[ModelKey, ...] = (K24, K32, KP)
TENANTS = ("a", "b", "c")

arrival = st.tuples(
    st.just(0.0) | st.floats(0.0, 3.0),  # seconds after the previous arrival
    st.sampled_from(TENANTS), st.integers(0, 2), st.integers(1, 400), st.sampled_from(KEYS),
    st.none() | st.floats(1.0, 200.0),  # the client's budget
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    return {
        "backends": [view(f"b{i}", slots=draw(st.integers(1, 3)), key=draw(st.sampled_from([*KEYS, None])))
                     for i in range(n)],
        "order": draw(st.sampled_from(["fifo", "fair"])),
        "within": draw(st.sampled_from(["fifo", "shortest_first"])),
        "aging_s": draw(st.floats(2.0, 100.0)),
        "band_aging_s": draw(st.floats(2.0, 100.0)),
        "reload_s": draw(st.sampled_from([0.0, 0.5, 4.0, 20.0])),
        "weights": dict(zip(TENANTS, draw(st.tuples(*[st.sampled_from([0.5, 1.0, 3.0])] * 3)), strict=True)),
        "rules": [ClassRule(name="short", max_chars=50, extra_slots=draw(st.integers(0, 2)),
                            band=draw(st.none() | st.integers(0, 1))),
                  ClassRule(name="medium", max_chars=200, max_in_service=draw(st.none() | st.integers(1, 3)),
                            extra_slots=draw(st.integers(0, 1))),
                  ClassRule(name="long", max_chars=None, max_in_service=draw(st.none() | st.integers(1, 2)))],
        "arrivals": [draw(arrival) for _ in range(draw(st.integers(0, 30)))],
        "gap": draw(st.floats(0.0, 10.0)),
        "target": draw(st.tuples(st.sampled_from(TENANTS), st.integers(0, 2), st.integers(1, 400),
                                 st.sampled_from(KEYS))),
    }


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_the_forecast_is_the_simulated_dispatch_time(sc: dict[str, Any]) -> None:
    """Random pools (1-4 backends, 1-3 slots, loaded with any configuration or none), class caps,
    extra slots and class bands, both queue orders with aging, three tenants of different weights
    in three bands, client deadlines that expire queued jobs: traffic arrives and is served by the
    simulated dispatcher; then one more job arrives, and nothing after it. Its forecast, made
    before it is offered, is when the simulation dispatches it."""
    within = sc["within"] if sc["order"] == "fair" else "fifo"
    s = Scheduler(queue=make_queue(sc["order"], max_size=1000, within_tenant=within, aging_s=sc["aging_s"],
                                   band_aging_s=sc["band_aging_s"]),
                  cost=CostModel(CostPriors(reload_s=sc["reload_s"])), classes=LengthClasses(sc["rules"]),
                  deadlines=TIERS, reject_unmeetable=False)
    sim = DispatchSimulation(s, sc["backends"])
    now = 0.0
    for i, (dt, tenant, band, chars, key, budget) in enumerate(sc["arrivals"]):
        now += dt
        job = s.make_job(id=f"j{i}", chars=chars, units=float(chars), model_key=key, now=now, tenant=tenant,
                         weight=sc["weights"][tenant], band=band, client_budget_s=budget)
        assert sim.arrive(job, now)
    now += sc["gap"]
    sim.run_until(now)
    tenant, band, chars, key = sc["target"]
    target = s.make_job(id="target", chars=chars, units=float(chars), model_key=key, now=now, tenant=tenant,
                        weight=sc["weights"][tenant], band=band, budget_s=1e9)
    forecast = s.forecast(target, now, sim.views())
    assert sim.arrive(target, now)
    at_once = "target" in sim.started
    start = sim.run_until_started("target")
    assert start is not None
    assert abs(forecast.start_s - (start.at - now)) <= TOLERANCE_S, (forecast, start, now)
    assert forecast.at_once == at_once
    assert forecast.reload == start.reload


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.floats(0.5, 120.0))
def test_a_job_that_would_start_at_once_and_fits_its_deadline_is_admitted(sc: dict[str, Any], budget: float) -> None:
    """Whatever the backlog: a job that ``schedule`` would dispatch at once is not refused as
    unmeetable unless its predicted service alone exceeds its deadline; nor is a job that cannot
    start at once refused when its predicted wait plus service fits."""
    s = scheduler(rules=sc["rules"], order=sc["order"], reload_s=sc["reload_s"], reject_unmeetable=False)
    sim = DispatchSimulation(s, sc["backends"])
    now = 0.0
    for i, (dt, tenant, band, chars, key, client) in enumerate(sc["arrivals"]):
        now += dt
        sim.arrive(s.make_job(id=f"j{i}", chars=chars, units=float(chars), model_key=key, now=now, tenant=tenant,
                              band=band, client_budget_s=client), now)
    now += sc["gap"]
    sim.run_until(now)
    s.reject_unmeetable = True
    tenant, band, chars, key = sc["target"]
    target = s.make_job(id="target", chars=chars, units=float(chars), model_key=key, now=now, tenant=tenant,
                        band=band, budget_s=budget)
    outlook = s.outlook(target, now, sim.views())
    rejection = s.offer(target, now, sim.views())
    # The budget as the scheduler sees it: now + budget - now may differ from budget in the last bit.
    budget = target.deadline_at - now
    fits = target.predicted_s <= budget
    if outlook.starts_now and fits:
        assert rejection is None
    if fits and outlook.wait_s + target.predicted_s <= budget:
        assert rejection is None
    if rejection is not None:
        assert rejection.reason is Reason.DEADLINE_UNMEETABLE


def test_a_forecast_that_would_look_at_too_many_jobs_stops_at_a_lower_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    s = scheduler(order="fifo", reject_unmeetable=False)
    backends = [view("b0")]
    for i in range(20):
        assert s.offer(s.make_job(id=f"q{i}", chars=20, units=20.0, model_key=K24, now=0.0, budget_s=1e3), 0.0,
                       backends) is None
    job = s.make_job(id="j", chars=20, units=20.0, model_key=K24, now=0.0)
    exact = s.forecast(job, 0.0, backends)
    assert not exact.bound and exact.start_s == pytest.approx(20 * 3.5)
    monkeypatch.setattr(forecasting, "FORECAST_VISITS", 5)
    cut = s.forecast(job, 0.0, backends)
    assert cut.bound and 0 < cut.start_s < exact.start_s
