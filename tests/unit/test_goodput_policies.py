"""A class keeps its minimum share of backend time, and a backend whose requests slow each other
down takes another one only when every deadline still holds (pure: injected time, no sockets)."""

from __future__ import annotations

import pytest

from scheduler.config import ConfigError, parse_config
from scheduler.core.classes import RATE_WINDOW_S, ClassRule, ClassShares, LengthClasses
from scheduler.core.concurrency import AdaptiveLimit, AdaptiveSettings, Measure
from scheduler.core.cost import CostModel, CostPriors
from scheduler.core.deadlines import Tier, TiersPolicy
from scheduler.core.queue import ModelKey, make_queue
from scheduler.core.running import BackendView, shared_finish_s
from scheduler.core.scheduler import Scheduler
from scheduler.runtime.build import build_scheduler
from tests.simulation import DispatchSimulation

K24: ModelKey = (24000, False)
SHORT_S, LONG_S = 1.0, 10.0  # predicted service of the two kinds of job below


def scheduler(*, long_share: float, short_share: float = 0.0, deadline_s: float = 1e6) -> Scheduler:
    # base_s 0, per_unit_s 1: a job of n units is predicted to take n seconds (no learning: weight huge).
    cost = CostModel(CostPriors(base_s=0.0, per_unit_s=1.0, prior_weight=1e9, reload_s=0.0))
    rules = [ClassRule(name="short", max_chars=50, band=0, min_share=short_share),
             ClassRule(name="long", max_chars=None, min_share=long_share)]
    # Band aging off (a wait of a day): the minimum share alone must keep the long class going.
    return Scheduler(queue=make_queue("fair", max_size=10_000, band_aging_s=86_400.0), cost=cost,
                     classes=LengthClasses(rules), deadlines=TiersPolicy([Tier(max_chars=None, timeout_s=deadline_s)]),
                     reject_unmeetable=False)


def flood(s: Scheduler, *, seconds: float) -> dict[str, float]:
    """One backend; long jobs (10 s, standard band) wait from the start; short ones (1 s, lifted to
    the top band) arrive faster than the backend serves them. Backend seconds per class started."""
    sim = DispatchSimulation(s, [BackendView(id="b", ready=True, alive=True, slots=1, model_key=K24)])
    for i in range(100):  # 1000 s of long work: more than the run can serve
        sim.arrive(s.make_job(id=f"long-{i}", chars=300, units=LONG_S, model_key=K24, now=0.0, band=1), 0.0)
    t, i = 0.0, 0
    while t < seconds:  # one short job every 0.8 s: 125 % of the backend
        sim.arrive(s.make_job(id=f"short-{i}", chars=10, units=SHORT_S, model_key=K24, now=t, band=1), t)
        t, i = t + 0.8, i + 1
    sim.run_until(seconds)
    served = {"short": 0.0, "long": 0.0}
    for job_id, start in sim.started.items():
        kind = job_id.split("-")[0]
        served[kind] += max(0.0, min(seconds, start.at + (LONG_S if kind == "long" else SHORT_S)) - start.at)
    return served


def test_without_a_minimum_share_a_flood_of_short_texts_starves_the_long_ones() -> None:
    served = flood(scheduler(long_share=0.0), seconds=600.0)
    assert served["long"] <= LONG_S  # at most the one that started before the flood


@pytest.mark.parametrize("share", [0.2, 0.4])
def test_a_class_with_waiting_work_keeps_its_minimum_share_of_backend_time(share: float) -> None:
    served = flood(scheduler(long_share=share), seconds=600.0)
    got = served["long"] / (served["long"] + served["short"])
    # One 10 s job is the unit of the long class's share: within one job of the target.
    assert share - LONG_S / 600.0 <= got <= share + 2 * LONG_S / 600.0, served


def test_a_waiting_class_earns_its_share_of_backend_time_and_pays_for_what_it_is_given() -> None:
    classes = LengthClasses([ClassRule(name="a", max_chars=10, min_share=0.25),
                             ClassRule(name="b", max_chars=None, min_share=0.0)])
    shares = ClassShares()
    shares.advance(0.0, ["a", "b"], classes, 2)
    assert shares.starved(["a", "b"]) == set()  # nothing owed yet
    shares.advance(4.0, ["a", "b"], classes, 2)  # 4 s x 2 backends x 25 % = 2 s owed to a
    assert shares.credit == {"a": pytest.approx(2.0)} and shares.starved(["a", "b"]) == {"a"}
    copy = shares.copy()
    shares.note("a", 1.5, classes, 2)
    assert shares.starved(["a"]) == {"a"}  # 0.5 s still owed
    shares.note("a", 1.0, classes, 2)
    assert shares.starved(["a"]) == set()
    assert copy.starved(["a"]) == {"a"}  # a copy (a forecast's) is its own
    shares.advance(1000.0, ["a"], classes, 2)  # owed at most RATE_WINDOW_S of its share
    assert shares.credit["a"] == pytest.approx(0.25 * 2 * RATE_WINDOW_S)
    shares.advance(1001.0, ["b"], classes, 2)  # a stopped waiting: what it was owed is gone
    assert shares.starved(["a"]) == set()
    shares.note("a", 1.0, classes, 2)
    shares.note("a", 10_000.0, classes, 2)  # a job is paid whole, what came before beyond a window is forgotten
    assert shares.credit["a"] == pytest.approx(-10_000.0)
    shares.note("a", 1.0, classes, 2)
    shares.note("a", 1.0, classes, 2)
    assert shares.credit["a"] == pytest.approx(-max(0.25 * 2 * RATE_WINDOW_S, 1.0))


def test_the_minimum_shares_add_up_to_at_most_one_and_a_reload_keeps_what_was_served() -> None:
    with pytest.raises(ConfigError, match=r"classes\[1\]\.min_share: the classes' min_share add up to 1\.2"):
        parse_config("classes: [{name: a, max_chars: 10, min_share: 0.6}, {name: b, max_chars: null, min_share: 0.6}]")
    config = parse_config("classes: [{name: a, max_chars: 10, min_share: 0.5}, "
                          "{name: b, max_chars: null, min_share: 0.5}]")
    old = build_scheduler(config)
    old.shares.note("a", 3.0, old.classes, 1)
    new = build_scheduler(config)
    new.adopt(old)
    assert new.shares.credit == {"a": -3.0}


def test_the_highest_band_is_the_first_band_whatever_it_is_called() -> None:
    config = parse_config("priorities: {bands: [urgent, normal], default: normal}\n"
                          "classes: [{name: short, max_chars: 50, band: highest}, {name: rest, max_chars: null}]")
    s = build_scheduler(config)
    assert s.make_job(id="a", chars=10, units=10.0, model_key=K24, now=0.0, band=1).band == 0
    assert s.make_job(id="b", chars=100, units=100.0, model_key=K24, now=0.0, band=1).band == 1
    assert build_scheduler(parse_config("{}")).make_job(id="c", chars=10, units=10.0, model_key=K24, now=0.0,
                                                        band=1).band == 0  # the default short class
    with pytest.raises(ConfigError, match=r"priorities\.bands\[0\]: band name 'highest' is reserved"):
        parse_config("priorities: {bands: [highest, low], default: low}")


# --- sharing a backend in time ----------------------------------------------------------------------


def shared(slowdown: tuple[float, ...] | None, *, slots: int = 2) -> list[BackendView]:
    return [BackendView(id="b", ready=True, alive=True, slots=slots, model_key=K24, slowdown=slowdown)]


def start(s: Scheduler, job_id: str, units: float, deadline_s: float, backends: list[BackendView],
          now: float = 0.0) -> list[str]:
    job = s.make_job(id=job_id, chars=10, units=units, model_key=K24, now=now, client_budget_s=deadline_s)
    assert s.offer(job, now, backends, force=True) is None
    return [a.job.id for a in s.schedule(now, backends)]


def test_a_job_joins_a_busy_backend_only_if_every_deadline_still_holds() -> None:
    curve = (1.0, 2.0 / 1.3)  # the emulator's default: 2 in flight, each 1.54x slower
    s = scheduler(long_share=0.0)
    assert start(s, "running", 10.0, 12.0, shared(curve)) == ["running"]
    # 10 s left of 12. A 5 s newcomer runs next to it at 1.54x for 7.7 s: the running job has
    # done 5 s of its work by then and ends at 7.7 + 5 = 12.7 s, past its deadline. It waits.
    assert start(s, "newcomer", 5.0, 100.0, shared(curve)) == []
    # A 1 s newcomer delays it by its own overlap only: 1.54 + 9 = 10.5 s. It may.
    assert start(s, "short", 1.0, 100.0, shared(curve, slots=3)) == ["short"]
    # Not knowing the slowdown (a fixed number of slots), the slot is simply free.
    s2 = scheduler(long_share=0.0)
    assert start(s2, "running", 10.0, 12.0, shared(None)) == ["running"]
    assert start(s2, "newcomer", 5.0, 100.0, shared(None)) == ["newcomer"]


def test_shared_finish_times_follow_processor_sharing() -> None:
    def flat(k: int) -> float:
        return float(k)  # each of k jobs at 1/k

    assert shared_finish_s([], flat) == []
    assert shared_finish_s([3.0], flat) == [3.0]
    # 1 s and 3 s together: both at half speed until the first is done at 2 s, then the other alone.
    assert shared_finish_s([3.0, 1.0], flat) == pytest.approx([4.0, 2.0])
    gain = (1.0, 2 / 1.3, 3 / 1.4)
    assert shared_finish_s([2.0, 2.0, 2.0], lambda k: gain[k - 1]) == pytest.approx([2 * 3 / 1.4] * 3)


def test_a_job_late_either_way_shares_when_that_ends_it_sooner_than_waiting() -> None:
    curve = (1.0, 2.0 / 1.3)
    s = scheduler(long_share=0.0)
    assert start(s, "running", 10.0, 100.0, shared(curve)) == ["running"]
    # 2 s x 1.54 = 3.1 s > 2.5 s: late, but waiting for the 10 s job would end it at 12 s.
    assert start(s, "tight", 2.0, 2.5, shared(curve, slots=3)) == ["tight"]
    # A backend slower with company than processor sharing: waiting would end it sooner.
    s2 = scheduler(long_share=0.0)
    assert start(s2, "running", 1.0, 100.0, shared((1.0, 5.0))) == ["running"]
    assert start(s2, "waits", 2.0, 2.5, shared((1.0, 5.0))) == []  # shared: 5 s + 1 s; waiting: 1 + 2 s


def test_an_unmeasured_level_counts_as_processor_sharing_without_gain() -> None:
    s = scheduler(long_share=0.0)
    assert start(s, "running", 3.0, 4.1, shared((1.0,))) == ["running"]
    # A 1 s job next to it at 2x: 2 s together, then 2 s of its work left alone: 4 s <= 4.1 s.
    assert start(s, "fits-at-2x", 1.0, 100.0, shared((1.0,))) == ["fits-at-2x"]
    s2 = scheduler(long_share=0.0)
    assert start(s2, "running", 3.0, 3.9, shared((1.0,))) == ["running"]
    assert start(s2, "not-at-2x", 1.0, 100.0, shared((1.0,))) == []  # 4 s > 3.9 s


def test_the_slowdown_is_learned_by_company_express_requests_included() -> None:
    """A level-1 request with an express one beside it all along ran with 2 in flight: it teaches
    the slowdown at 2, not at 1 (counted at 1, the slowdown at 2 would come out low)."""
    limit = AdaptiveLimit(AdaptiveSettings(samples=2, max_slots=2))
    for i, t in enumerate((0.0, 2.0)):  # alone: as fast as their solo estimates
        limit.dispatched(f"a{i}", t, 1)
        limit.released(f"a{i}", t + 1.0, 0, work_s=1.0, budget_s=60.0, ok=True)
    for i, t in enumerate((10.0, 20.0)):  # the limit's one and an express one, together: 1.5x each
        limit.dispatched(f"m{i}", t, 1)
        limit.dispatched(f"x{i}", t, 1, beside=1, extra=True)
        limit.released(f"x{i}", t + 1.5, 1, work_s=1.0, budget_s=60.0, ok=True)
        limit.released(f"m{i}", t + 1.5, 0, work_s=1.0, budget_s=60.0, ok=True)
    # 3 in flight was never seen: 1.5 x 3 / 2, no more gain than measured.
    assert limit.slowdown() == pytest.approx((1.0, 1.5, 2.25))
    assert limit.describe()["slowdown"] == [1.0, 1.5, 2.25]
    limit.reset(30.0)
    assert limit.slowdown() == (1.0, 2.0, 3.0)


def test_a_fixed_overhead_per_request_does_not_make_a_flat_curve_look_like_a_gain() -> None:
    """20 ms of every request's time (the HTTP exchange) does not stretch with company. Left in,
    a 70 ms request alone takes 1.29x its solo time and next to another 2.29x: a slowdown of 1.78
    where the backend is twice as slow, a gain that is not there."""
    limit = AdaptiveLimit(AdaptiveSettings(samples=8, max_slots=2))
    overhead, t = 0.02, 0.0
    for i in range(8):  # alone, short and long texts
        work = (0.07, 1.6)[i % 2]
        limit.dispatched(f"a{i}", t, 1)
        t += overhead + work
        limit.released(f"a{i}", t, 0, work_s=work, budget_s=60.0, ok=True)
    assert limit.overhead_s() == pytest.approx(overhead)
    for i in range(4):  # two at a time on a flat curve: each at half speed
        work = (0.07, 1.6)[i % 2]
        limit.dispatched(f"p{i}", t, 1)
        limit.dispatched(f"q{i}", t, 1, beside=1, extra=True)
        t += overhead + 2 * work
        limit.released(f"q{i}", t, 1, work_s=work, budget_s=60.0, ok=True)
        limit.released(f"p{i}", t, 0, work_s=work, budget_s=60.0, ok=True)
    assert limit.slowdown()[1] == pytest.approx(2.0)
    assert limit.describe()["overhead_s"] == pytest.approx(overhead)
    # Alone requests all of one size cannot tell the overhead from slowness: none is assumed.
    same = AdaptiveLimit(AdaptiveSettings(samples=2))
    for i in range(2):
        same.dispatched(f"s{i}", float(i), 1)
        same.released(f"s{i}", i + 0.5, 0, work_s=0.25, budget_s=60.0, ok=True)
    assert same.overhead_s() == 0.0


def test_the_adaptive_limit_reports_the_slowdown_it_measured() -> None:
    limit = AdaptiveLimit(AdaptiveSettings(max_slots=3))
    assert limit.slowdown() == (1.0, 2.0, 3.0, 4.0)  # nothing measured: k at k in flight
    limit.measures[1] = Measure(throughput=1.0, spread=0.0, in_time=1.0, stretch=1.1, samples=8, at=0.0)
    limit.measures[2] = Measure(throughput=1.3, spread=0.0, in_time=1.0, stretch=1.1 * 2 / 1.3, samples=8, at=0.0)
    # Past what was measured, no more gain than measured: 2 / 1.3 x k / 2.
    assert limit.slowdown() == pytest.approx((1.0, 2 / 1.3, 3 / 1.3, 4 / 1.3))
