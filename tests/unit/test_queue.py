"""The waiting room (scheduler.core.queue): bounds, FIFO, and the fair policy's three layers.

Time is a plain float advanced by hand; every property has a stated, checked bound.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.queue import (
    FairQueue,
    FifoQueue,
    Job,
    JobQueue,
    QueueFullError,
    WithinTenant,
    make_queue,
)

KEY = (24000, False)
_ids = iter(range(10**9))


def job(*, tenant: str = "t", weight: float = 1.0, band: int = 0, cost: float = 1.0, arrived: float = 0.0,
        tenant_bound: int | None = None, id: str | None = None) -> Job:
    return Job(id=id or f"j{next(_ids)}", chars=10, units=10.0, model_key=KEY, arrived_at=arrived, tenant=tenant,
               weight=weight, band=band, predicted_s=cost, tenant_bound=tenant_bound)


def take_first(queue: JobQueue, now: float) -> Job:
    first = next(queue.candidates(now))
    queue.take(first, now)
    return first


def ids(jobs: Iterable[Job]) -> list[str]:
    return [j.id for j in jobs]


# --- bounds and FIFO --------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["fifo", "fair"])
def test_total_bound_raises_queue_full_with_scope(order: str) -> None:
    queue = make_queue(order, max_size=2)
    queue.push(job(), 0.0)
    queue.push(job(), 0.0)
    with pytest.raises(QueueFullError) as info:
        queue.push(job(), 0.0)
    assert (info.value.scope, info.value.size, info.value.bound) == ("queue", 2, 2)
    assert len(queue) == 2


@pytest.mark.parametrize("order", ["fifo", "fair"])
def test_tenant_bound_from_queue_and_overridden_by_the_job(order: str) -> None:
    queue = make_queue(order, max_size=10, max_per_tenant=1)
    queue.push(job(tenant="a"), 0.0)
    with pytest.raises(QueueFullError) as info:
        queue.push(job(tenant="a"), 0.0)
    assert info.value.scope == "tenant"
    queue.push(job(tenant="b"), 0.0)  # another tenant is not affected
    queue.push(job(tenant="a", tenant_bound=2), 0.0)  # the tenant's own bound wins over the queue's
    assert queue.tenant_depth("a") == 2
    assert queue.tenant_depth("b") == 1
    assert queue.tenant_depth("nobody") == 0


@pytest.mark.parametrize("order", ["fifo", "fair"])
def test_forced_push_skips_bounds_and_keeps_its_place(order: str) -> None:
    queue = make_queue(order, max_size=2)
    first, second = job(), job()
    queue.push(first, 0.0)
    queue.push(second, 0.0)
    queue.take(first, 0.0)  # dispatched ...
    queue.push(job(), 0.0)
    queue.push(first, 1.0, force=True)  # ... its backend failed: back in line, over the bound
    assert len(queue) == 3
    assert next(queue.candidates(1.0)) is first  # ahead of everything that arrived after it


@pytest.mark.parametrize("order", ["fifo", "fair"])
def test_remove_updates_depths(order: str) -> None:
    queue = make_queue(order, max_size=5)
    a = job(tenant="a")
    queue.push(a, 0.0)
    assert queue.remove(a.id) is a
    assert queue.remove(a.id) is None
    assert len(queue) == 0
    assert queue.tenant_depth("a") == 0
    assert list(queue.jobs()) == []


def test_fifo_serves_in_arrival_order_regardless_of_band_or_tenant() -> None:
    queue = FifoQueue(10)
    pushed = [job(band=2, tenant="x"), job(band=0, tenant="y", cost=0.1), job(band=1, tenant="x", cost=50)]
    for j in pushed:
        queue.push(j, 0.0)
    assert [take_first(queue, 0.0) for _ in pushed] == pushed


def test_make_queue_picks_the_policy_by_name() -> None:
    assert isinstance(make_queue("fifo", max_size=1), FifoQueue)
    fair = make_queue("fair", max_size=1, within_tenant="shortest_first", aging_s=5.0, band_aging_s=7.0)
    assert isinstance(fair, FairQueue)
    assert (fair.within_tenant, fair.aging_s, fair.band_aging_s) == (WithinTenant.SHORTEST_FIRST, 5.0, 7.0)
    with pytest.raises(ValueError):
        make_queue("lifo", max_size=1)
    with pytest.raises(ValueError):
        make_queue("fair", max_size=1, within_tenant="random")


# --- priority bands -----------------------------------------------------------------------------------


def test_bands_are_strict_before_aging() -> None:
    queue = FairQueue(10, band_aging_s=60.0)
    low, high = job(band=2, arrived=0.0), job(band=0, arrived=10.0)
    queue.push(low, 0.0)
    queue.push(high, 10.0)
    assert take_first(queue, 59.0) is high


@pytest.mark.parametrize(("waited", "band"), [(0.0, 2), (59.9, 2), (60.0, 1), (119.9, 1), (120.0, 0), (1e6, 0)])
def test_aging_promotes_one_band_per_band_aging_s(waited: float, band: int) -> None:
    queue = FairQueue(10, band_aging_s=60.0)
    assert queue.effective_band(job(band=2, arrived=100.0), 100.0 + waited) == band


@settings(max_examples=40, deadline=None, database=None)
@given(band_aging_s=st.floats(5.0, 100.0), diff=st.integers(1, 3), tick=st.floats(0.5, 5.0),
       same_tenant=st.booleans(), seed=st.integers(0, 2**16))
def test_band_starvation_is_bounded_by_aging(band_aging_s: float, diff: int, tick: float, same_tenant: bool,
                                             seed: int) -> None:
    """A band-``diff`` job under a never-ending stream of band-0 jobs (one arrives and one is
    dispatched every ``tick``, so band 0 is never empty) waits at least ``band_aging_s × diff``
    (bands are strict until then) and at most ``band_aging_s × diff + tick`` (one service slot)."""
    rng = random.Random(seed)
    queue = FairQueue(1000, band_aging_s=band_aging_s)
    low = job(band=diff, tenant="t" if same_tenant else "batch", arrived=0.0, cost=rng.uniform(1, 100))
    queue.push(low, 0.0)
    for _ in range(2):
        queue.push(job(tenant="t", arrived=0.0, cost=rng.uniform(0.1, 10)), 0.0)
    bound = band_aging_s * diff
    now = 0.0
    for k in range(1, 10**6):
        now = k * tick
        queue.push(job(tenant="t", arrived=now, cost=rng.uniform(0.1, 10)), now)
        if take_first(queue, now) is low:
            break
    assert bound - 1e-9 <= now <= bound + tick


# --- weighted fair queueing across tenants ----------------------------------------------------------


def serve_backlogged(queue: FairQueue, costs: dict[str, tuple[float, float]], weights: dict[str, float], n: int,
                     rng: random.Random, served: dict[str, float], start: float = 0.0) -> float:
    """Dispatch ``n`` jobs one at a time (always the first candidate) while every tenant in
    ``costs`` keeps 2 jobs waiting; add the cost served per tenant to ``served``."""
    def refill(tenant: str, now: float) -> None:
        while queue.tenant_depth(tenant) < 2:
            lo, hi = costs[tenant]
            queue.push(job(tenant=tenant, weight=weights[tenant], cost=rng.uniform(lo, hi), arrived=now), now)

    now = start
    for tenant in costs:
        refill(tenant, now)
    for _ in range(n):
        now += 1.0
        taken = take_first(queue, now)
        served[taken.tenant] = served.get(taken.tenant, 0.0) + taken.predicted_s
        refill(taken.tenant, now)
    return now


SHARE_TOLERANCE = 0.05  # a tenant's share of served cost is within ±5 % (relative) of weight / sum(weights)


def assert_shares(served: dict[str, float], weights: dict[str, float]) -> None:
    total_cost = sum(served.values())
    total_weight = sum(weights.values())
    for tenant, weight in weights.items():
        fair = weight / total_weight
        assert abs(served.get(tenant, 0.0) / total_cost - fair) <= SHARE_TOLERANCE * fair, (served, weights)


@settings(max_examples=12, deadline=None, database=None)
@given(weights=st.lists(st.sampled_from([1.0, 2.0, 3.0, 0.5, 5.0]), min_size=2, max_size=4),
       costs=st.lists(st.tuples(st.floats(1.0, 5.0), st.floats(1.0, 2.0)), min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_weighted_cost_shares_converge_to_weights(weights: list[float], costs: list[tuple[float, float]],
                                                  seed: int) -> None:
    """Backlogged tenants, each with its own job-cost range (up to 10x apart): after N = 3000
    dispatches each tenant's share of the served cost is within ±5 % (relative) of
    weight / sum(weights); and at every dispatch any two tenants' served cost per unit weight
    differ by at most SFQ's bound, max_cost_i / w_i + max_cost_j / w_j."""
    names = [f"t{i}" for i in range(len(weights))]
    weight_of = dict(zip(names, weights, strict=True))
    cost_of = {name: (lo, lo * spread) for name, (lo, spread) in zip(names, costs, strict=False)}
    served: dict[str, float] = {}
    queue = FairQueue(100)
    rng = random.Random(seed)
    now = 0.0
    for _ in range(3000):
        now = serve_backlogged(queue, cost_of, weight_of, 1, rng, served, start=now)
        for a in names:
            for b in names:
                gap = served.get(a, 0.0) / weight_of[a] - served.get(b, 0.0) / weight_of[b]
                assert gap <= cost_of[a][1] / weight_of[a] + cost_of[b][1] / weight_of[b] + 1e-9
    assert_shares(served, weight_of)


def test_weights_one_two_three_with_varied_costs() -> None:
    """The headline case: weights 1:2:3, costs 0.5–80 s; cost shares 1/6, 2/6, 3/6 within ±5 %."""
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}
    costs = {"a": (0.5, 80.0), "b": (0.5, 10.0), "c": (20.0, 40.0)}
    served: dict[str, float] = {}
    serve_backlogged(FairQueue(100), costs, weights, 3000, random.Random(1), served)
    assert_shares(served, weights)


def test_equal_weights_share_cost_not_count() -> None:
    """Equal weights, jobs 100x apart in size: the cost shares are equal (±5 %), so the tenant with
    small jobs gets ~100x as many dispatches."""
    weights = {"small": 1.0, "large": 1.0}
    costs = {"small": (0.9, 1.1), "large": (90.0, 110.0)}
    served: dict[str, float] = {}
    counts = {"small": 0, "large": 0}
    queue = FairQueue(100)
    rng = random.Random(7)
    for tenant in costs:
        for _ in range(2):
            queue.push(job(tenant=tenant, cost=rng.uniform(*costs[tenant])), 0.0)
    for k in range(3000):
        taken = take_first(queue, float(k))
        served[taken.tenant] = served.get(taken.tenant, 0.0) + taken.predicted_s
        counts[taken.tenant] += 1
        queue.push(job(tenant=taken.tenant, cost=rng.uniform(*costs[taken.tenant]), arrived=float(k)), float(k))
    assert_shares(served, weights)
    assert counts["small"] > 50 * counts["large"]


@settings(max_examples=10, deadline=None, database=None)
@given(idle_for=st.integers(500, 3000), seed=st.integers(0, 2**16))
def test_an_idle_tenant_banks_no_credit(idle_for: int, seed: int) -> None:
    """Tenant c is served, goes idle while a and b are served ``idle_for`` jobs, then comes back.
    Over the next 300 dispatches c's cost share stays within ±5 % of its fair third (it is not
    paid back for the idle time), and so does every prefix of that window longer than 30
    dispatches (no burst at the return)."""
    rng = random.Random(seed)
    weights = {"a": 1.0, "b": 1.0, "c": 1.0}
    costs = {t: (1.0, 10.0) for t in weights}
    queue = FairQueue(100)
    now = serve_backlogged(queue, costs, weights, 300, rng, {})
    for left in [j for j in queue.jobs() if j.tenant == "c"]:
        queue.remove(left.id)
    now = serve_backlogged(queue, {"a": costs["a"], "b": costs["b"]}, weights, idle_for, rng, {}, start=now)
    served: dict[str, float] = {}
    total = 0.0
    for k in range(300):
        now = serve_backlogged(queue, costs, weights, 1, rng, served, start=now)
        total = sum(served.values())
        if k >= 30:
            assert served.get("c", 0.0) / total <= (1 + SHARE_TOLERANCE) / 3 + 10.0 / total
    assert_shares(served, weights)


def test_tenant_returning_from_idle_starts_at_virtual_time() -> None:
    queue = FairQueue(10)
    for _ in range(3):
        queue.push(job(tenant="busy", cost=10.0), 0.0)
    take_first(queue, 0.0)
    take_first(queue, 0.0)  # busy's finish tag is now 20, the band's virtual time 10
    late = job(tenant="late", cost=10.0)
    queue.push(late, 0.0)
    assert take_first(queue, 0.0) is late  # tag max(0, 10) = 10 < 20: its turn, but no more than that
    queue.push(job(tenant="late", cost=10.0), 0.0)
    assert take_first(queue, 0.0).tenant == "busy"  # tie at 20: busy has waited longer


def test_tenants_in_different_bands_do_not_share_virtual_time() -> None:
    queue = FairQueue(10, band_aging_s=1e9)
    for _ in range(5):
        queue.push(job(tenant="a", band=1, cost=100.0), 0.0)
        take_first(queue, 0.0)
    fresh = job(tenant="a", band=0, cost=1.0)
    other = job(tenant="b", band=0, cost=1.0)
    queue.push(other, 0.0)
    queue.push(fresh, 0.0)
    # a's charges in band 1 do not follow it into band 0: tie, b arrived first.
    assert ids(queue.candidates(0.0)) == [other.id, fresh.id]


@settings(max_examples=60, deadline=None, database=None)
@given(spec=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 2), st.integers(1, 20)), min_size=1,
                     max_size=12),
       weights=st.tuples(*[st.sampled_from([1.0, 2.0, 4.0])] * 3),
       shortest_first=st.booleans(), warmup=st.integers(0, 5), now=st.floats(0.0, 300.0))
def test_candidates_list_the_order_of_one_by_one_dispatch(spec: list[tuple[str, int, int]],
                                                          weights: tuple[float, float, float], shortest_first: bool,
                                                          warmup: int, now: float) -> None:
    """The documented promise of ``candidates``: its order is the order that taking the first
    candidate again and again (at the same ``now``) gives. Tie-free by construction: job i costs
    an integer plus 2**-(3i+3), and weights are powers of two, so every virtual tag is exact and
    its binary fraction names the jobs summed into it (ties: the xfail below)."""
    within = WithinTenant.SHORTEST_FIRST if shortest_first else WithinTenant.FIFO
    queue = FairQueue(100, within_tenant=within, aging_s=50.0, band_aging_s=100.0)
    weight_of = dict(zip("abc", weights, strict=True))
    for i, (tenant, band, units) in enumerate(spec):
        cost = units + 2.0 ** -(3 * i + 3)
        queue.push(job(tenant=tenant, weight=weight_of[tenant], band=band, cost=cost, arrived=float(i)), float(i))
    for _ in range(min(warmup, len(spec) - 1)):
        take_first(queue, now)
    listed = ids(queue.candidates(now))
    one_by_one = [take_first(queue, now).id for _ in range(len(listed))]
    assert listed == one_by_one


operation = st.tuples(st.sampled_from(["push", "push", "take", "remove"]), st.floats(0.0, 40.0),
                      st.sampled_from("abc"), st.integers(0, 2), st.integers(1, 20), st.integers(0, 10**6))


@settings(max_examples=150, deadline=None, database=None)
@given(ops=st.lists(operation, max_size=40), shortest_first=st.booleans(), forced=st.booleans())
def test_candidates_kept_up_to_date_equal_candidates_worked_out_afresh(ops: list[tuple[str, float, str, int, int, int]],
                                                                      shortest_first: bool, forced: bool) -> None:
    """The fair queue keeps what candidates() walks up to date through pushes, removals and takes
    while no job ages; whatever the history (aging included), its order is that of a copy made to
    work it out afresh, and so is a copy's."""
    within = WithinTenant.SHORTEST_FIRST if shortest_first else WithinTenant.FIFO
    queue = FairQueue(100, within_tenant=within, aging_s=15.0, band_aging_s=25.0)
    now = 0.0
    for kind, dt, tenant, band, units, pick in ops:
        now += dt
        waiting = sorted(queue.jobs(), key=lambda j: j.seq)
        if kind == "push" or not waiting:
            queue.push(job(tenant=tenant, band=band, cost=float(units), arrived=now - dt * (pick % 3) / 2), now,
                       force=forced)
        elif kind == "take":
            queue.take(next(queue.candidates(now)), now)
        else:
            queue.remove(waiting[pick % len(waiting)].id)
        afresh = queue.copy()
        afresh._groups = None
        assert ids(queue.candidates(now)) == ids(afresh.candidates(now)) == ids(queue.copy().candidates(now))


def test_candidates_order_matches_one_by_one_dispatch_on_ties() -> None:
    queue = FairQueue(10)
    a1, b2, b3, a4 = job(tenant="a"), job(tenant="b"), job(tenant="b"), job(tenant="a")
    for j in (a1, b2, b3, a4):
        queue.push(j, 0.0)
    listed = ids(queue.candidates(0.0))
    one_by_one = [take_first(queue, 0.0).id for _ in range(4)]
    assert listed == one_by_one  # listed: a1 b2 a4 b3; one by one: a1 b2 b3 a4


# --- order inside a tenant ------------------------------------------------------------------------


def test_within_tenant_fifo_ignores_cost() -> None:
    queue = FairQueue(10)
    long, short = job(cost=80.0), job(cost=1.0)
    queue.push(long, 0.0)
    queue.push(short, 0.0)
    assert ids(queue.candidates(0.0)) == [long.id, short.id]


def test_shortest_first_until_aged() -> None:
    queue = FairQueue(10, within_tenant=WithinTenant.SHORTEST_FIRST, aging_s=30.0)
    long, short = job(cost=80.0, arrived=0.0), job(cost=1.0, arrived=5.0)
    queue.push(long, 0.0)
    queue.push(short, 5.0)
    assert ids(queue.candidates(29.9)) == [short.id, long.id]
    assert ids(queue.candidates(30.0)) == [long.id, short.id]


@settings(max_examples=40, deadline=None, database=None)
@given(tick=st.floats(0.5, 5.0), aging_ticks=st.floats(3.0, 60.0), long_cost=st.floats(50.0, 500.0),
       seed=st.integers(0, 2**16))
def test_shortest_first_starvation_is_bounded_by_aging(tick: float, aging_ticks: float, long_cost: float,
                                                      seed: int) -> None:
    """A long job under a never-ending stream of shorter ones from the same tenant (one arrives and
    one is dispatched every ``tick``): it goes no earlier than ``aging_s`` (shortest first holds
    until then) and no later than ``aging_s + tick`` (the next dispatch)."""
    rng = random.Random(seed)
    aging_s = aging_ticks * tick
    queue = FairQueue(1000, within_tenant=WithinTenant.SHORTEST_FIRST, aging_s=aging_s)
    long = job(cost=long_cost, arrived=0.0)
    queue.push(long, 0.0)
    for _ in range(2):
        queue.push(job(cost=rng.uniform(0.1, long_cost / 2)), 0.0)
    now = 0.0
    for k in range(1, 10**6):
        now = k * tick
        queue.push(job(cost=rng.uniform(0.1, long_cost / 2), arrived=now), now)
        if take_first(queue, now) is long:
            break
    assert aging_s <= now <= aging_s + tick
