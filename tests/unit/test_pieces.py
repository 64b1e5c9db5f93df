"""Pieces of a fanned-out request in the pure core (scheduler.core.scheduler, scheduler.core.queue).

Shown here: ``free_slots`` counts only slots free now and matches what ``schedule`` starts; pieces
keep their request's class, band, deadline and tenant; ``offer_pieces`` judges the request exactly
as ``offer`` would and queues its pieces past the bounds; continuations go first in their band, in
both queue orders, and their tenant is charged for them; a hypothesis state machine drives every
operation and checks that no job is both queued and running and that the queue's counts hold.
Time is a plain float passed in: no sockets, no sleeps.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler.core.admission import Reason
from scheduler.core.classes import ClassRule, LengthClasses
from scheduler.core.cost import CostModel
from scheduler.core.deadlines import Tier, TiersPolicy
from scheduler.core.queue import FairQueue, FifoQueue, Job, ModelKey, WithinTenant, make_queue
from scheduler.core.running import BackendView
from scheduler.core.scheduler import Scheduler

K24: ModelKey = (24000, False)
K32: ModelKey = (32000, False)
RULES = [ClassRule(name="short", max_chars=50, band=0, extra_slots=1),
         ClassRule(name="long", max_chars=None)]


def make(order: str = "fair", *, rules: list[ClassRule] | None = None, max_size: int = 100,
         max_per_tenant: int | None = None, reject_unmeetable: bool = False, timeout_s: float = 1e6,
         within: str = "fifo") -> Scheduler:
    queue = make_queue(order, max_size=max_size, max_per_tenant=max_per_tenant, within_tenant=within)
    return Scheduler(queue=queue, cost=CostModel(), classes=LengthClasses(rules or RULES),
                     deadlines=TiersPolicy([Tier(max_chars=None, timeout_s=timeout_s)]),
                     reject_unmeetable=reject_unmeetable)


def view(id: str, *, slots: int = 1, ready: bool = True, alive: bool = True, key: ModelKey | None = K24,
         slowdown: tuple[float, ...] | None = None) -> BackendView:
    return BackendView(id=id, ready=ready, alive=alive, slots=slots, model_key=key, slowdown=slowdown)


def parent_job(scheduler: Scheduler, id: str = "p", *, chars: int = 600, now: float = 0.0, tenant: str = "t",
               band: int = 1, weight: float = 1.0, key: ModelKey = K24, bound: int | None = None,
               budget_s: float | None = None) -> Job:
    return scheduler.make_job(id=id, chars=chars, units=float(chars), model_key=key, now=now, tenant=tenant,
                              weight=weight, band=band, tenant_bound=bound, client_budget_s=budget_s)


def pieces_of(scheduler: Scheduler, parent: Job, n: int, *, chars: int | None = None) -> list[Job]:
    size = chars if chars is not None else max(1, parent.chars // n)
    return [scheduler.make_piece(parent, id=f"{parent.id}.{i}", chars=size, units=float(size)) for i in range(n)]


def run_one(scheduler: Scheduler, id: str, backends: list[BackendView], *, now: float = 0.0,
            chars: int = 600) -> None:
    """Offer a job and dispatch it: it runs."""
    job = parent_job(scheduler, id, chars=chars, now=now)
    assert scheduler.offer(job, now, backends) is None
    assert [a.job.id for a in scheduler.schedule(now, backends)] == [id]


def queued_ids(scheduler: Scheduler, now: float) -> list[str]:
    return [j.id for j in scheduler.queue.candidates(now)]


# --- free_slots ------------------------------------------------------------------------------------


def test_an_idle_pool_offers_every_ready_slot() -> None:
    scheduler = make()
    backends = [view("a", slots=2), view("b"), view("c", slots=3, ready=False)]
    assert scheduler.free_slots(parent_job(scheduler), 0.0, backends) == 3  # c is not ready


def test_a_partly_busy_pool_offers_what_is_left_per_backend() -> None:
    scheduler = make()
    backends = [view("a", slots=2), view("b", slots=2)]
    run_one(scheduler, "r1", backends)
    run_one(scheduler, "r2", backends)
    assert Counter(r.backend_id for r in scheduler.running.values()) == {"a": 1, "b": 1}
    assert scheduler.free_slots(parent_job(scheduler), 0.0, backends) == 2
    run_one(scheduler, "r3", backends)
    run_one(scheduler, "r4", backends)
    assert scheduler.free_slots(parent_job(scheduler), 0.0, backends) == 0


@pytest.mark.parametrize("queued_band", [0, 1, 2])
def test_nothing_is_free_while_any_job_waits(queued_band: int) -> None:
    scheduler = make()
    backends = [view("a", slots=4)]
    waiting = parent_job(scheduler, "w", band=queued_band)
    assert scheduler.offer(waiting, 0.0, backends) is None  # queued, not yet dispatched
    assert scheduler.free_slots(parent_job(scheduler, band=1), 0.0, backends) == 0
    scheduler.schedule(0.0, backends)
    assert scheduler.free_slots(parent_job(scheduler, band=1), 0.0, backends) == 3


def test_a_capped_class_fans_out_no_further_than_its_cap() -> None:
    rules = [ClassRule(name="short", max_chars=50), ClassRule(name="long", max_chars=None, max_in_service=2)]
    scheduler = make(rules=rules)
    backends = [view("a", slots=2), view("b", slots=2)]
    assert scheduler.free_slots(parent_job(scheduler), 0.0, backends) == 2  # the cap, not the 4 slots
    run_one(scheduler, "r1", backends)
    assert scheduler.free_slots(parent_job(scheduler), 0.0, backends) == 1
    short = parent_job(scheduler, "s", chars=20)
    assert scheduler.free_slots(short, 0.0, backends) == 3  # another class: only the slots bound it


def test_a_class_extra_slots_are_never_offered() -> None:
    scheduler = make()
    backends = [view("a")]
    run_one(scheduler, "r1", backends)
    short = parent_job(scheduler, "s", chars=20)
    assert scheduler.free_slots(short, 0.0, backends) == 0
    assert scheduler.offer(short, 0.0, backends) is None
    assert [a.job.id for a in scheduler.schedule(0.0, backends)] == ["s"]  # a short job itself would start


def test_a_free_slot_the_job_would_wait_out_is_not_offered() -> None:
    """Model affinity: a K24 job waits for the busy K24 backend, which frees before a reload would
    finish, rather than switch the free K32 one. So that slot is not free for its pieces."""
    scheduler = make()
    backends = [view("a", key=K24), view("b", key=K32)]
    run_one(scheduler, "r1", backends, chars=20)
    parent = parent_job(scheduler)
    assert scheduler.running["r1"].job.predicted_s < scheduler.cost.reload_s
    assert scheduler.free_slots(parent, 0.0, backends) == 0
    assert scheduler.offer(parent, 0.0, backends) is None
    assert scheduler.schedule(0.0, backends) == []  # the request itself would wait too


@settings(max_examples=80, deadline=None, database=None)
@given(pool=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([K24, K32, None]), st.booleans()), min_size=1,
                     max_size=3),
       busy=st.lists(st.tuples(st.integers(1, 600), st.sampled_from([K24, K32])), max_size=5),
       chars=st.integers(51, 900), key=st.sampled_from([K24, K32]), cap=st.none() | st.integers(1, 3),
       learned=st.booleans())
def test_free_slots_is_what_schedule_starts(pool: list[tuple[int, ModelKey | None, bool]],
                                            busy: list[tuple[int, ModelKey]], chars: int, key: ModelKey,
                                            cap: int | None, learned: bool) -> None:
    """Whatever runs, on whichever backends and configurations: ``free_slots`` pieces the size of
    their request all start at once, and one more does not."""
    rules = [ClassRule(name="short", max_chars=50, extra_slots=1),
             ClassRule(name="long", max_chars=None, max_in_service=cap)]
    scheduler = make(rules=rules)
    slowdown = (1.0, 1.6, 2.4) if learned else None
    backends = [view(f"b{i}", slots=slots, key=k, ready=ready, slowdown=slowdown)
                for i, (slots, k, ready) in enumerate(pool)]
    for i, (size, k) in enumerate(busy):
        job = parent_job(scheduler, f"r{i}", chars=size, key=k)
        scheduler.offer(job, 0.0, backends)
        scheduler.schedule(0.0, backends)
    for job in list(scheduler.queue.jobs()):
        scheduler.cancel(job.id)
    parent = parent_job(scheduler, chars=chars, key=key)
    n = scheduler.free_slots(parent, 0.0, backends)
    pieces = [scheduler.make_piece(parent, id=f"p.{i}", chars=chars, units=float(chars)) for i in range(n + 1)]
    assert scheduler.offer_pieces(parent, pieces, 0.0, backends) is None
    started = [a.job.id for a in scheduler.schedule(0.0, backends)]
    assert started == [p.id for p in pieces[:n]]


# --- make_piece ------------------------------------------------------------------------------------


def test_a_piece_keeps_its_requests_class_band_deadline_and_tenant() -> None:
    scheduler = make()
    parent = parent_job(scheduler, chars=600, band=2, tenant="acme", weight=3.0, bound=7, key=K32, now=5.0)
    piece = scheduler.make_piece(parent, id="p.0", chars=30, units=30.0)
    assert scheduler.classes.of(30).name == "short"  # a text this short alone would be short, band 0
    assert (piece.cls, piece.band) == ("long", 2)  # the request's: no fast lane, no extra slots
    assert (piece.tenant, piece.weight, piece.tenant_bound, piece.model_key) == ("acme", 3.0, 7, K32)
    assert (piece.arrived_at, piece.deadline_at) == (parent.arrived_at, parent.deadline_at)
    assert (piece.id, piece.chars, piece.units, piece.parent) == ("p.0", 30, 30.0, "p")
    prediction = scheduler.cost.predict(30.0, K32)
    assert (piece.predicted_s, piece.p95_s) == (prediction.mean_s, prediction.p95_s)
    assert piece.predicted_s < parent.predicted_s
    assert not piece.continues and piece.seq == 0 and parent.parent is None


# --- offer_pieces: judged as the request -----------------------------------------------------------


def both_ways(setup: dict[str, object], prepare: object = None) -> tuple[Scheduler, Scheduler]:
    """Two schedulers in the same state: one will be offered the request whole, one its pieces."""
    whole, split = make(**setup), make(**setup)  # type: ignore[arg-type]
    if callable(prepare):
        prepare(whole)
        prepare(split)
    return whole, split


@pytest.mark.parametrize("case", ["tenant_full", "queue_full", "unmeetable", "no_backend", "admitted"])
def test_pieces_are_judged_exactly_as_their_request(case: str) -> None:
    backends = [view("a")]
    setup: dict[str, object] = {"max_size": 3, "max_per_tenant": 2, "reject_unmeetable": True, "timeout_s": 300.0}
    fillers = {"tenant_full": ["t", "t"], "queue_full": ["x", "y", "z"], "unmeetable": [], "no_backend": [],
               "admitted": ["t"]}[case]

    def prepare(scheduler: Scheduler) -> None:
        run_one(scheduler, "busy", backends)
        for i, tenant in enumerate(fillers):
            assert scheduler.offer(parent_job(scheduler, f"f{i}", chars=60, tenant=tenant), 0.0, backends) is None

    whole, split = both_ways(setup, prepare)
    budget = 1.0 if case == "unmeetable" else None
    views = [view("a", ready=False, alive=False)] if case == "no_backend" else backends
    parent = parent_job(whole, budget_s=budget)
    twin = parent_job(split, budget_s=budget)
    expected = whole.offer(parent, 0.0, views)
    got = split.offer_pieces(twin, pieces_of(split, twin, 3), 0.0, views)
    assert got == expected
    assert split.tally.rejected == whole.tally.rejected and split.tally.admitted == whole.tally.admitted
    assert split.work_rate(1.0, above_band=2) == whole.work_rate(1.0, above_band=2)  # the request noted once
    if case == "admitted":
        assert got is None
        queued = {j.id for j in split.queue.jobs()}
        assert queued == {"f0", "p.0", "p.1", "p.2"} and "p" not in queued
    else:
        assert got is not None and {j.id for j in split.queue.jobs()} == {f"f{i}" for i in range(len(fillers))}
    expected_reason = {"tenant_full": Reason.TENANT_QUEUE_FULL, "queue_full": Reason.QUEUE_FULL,
                       "unmeetable": Reason.DEADLINE_UNMEETABLE, "no_backend": Reason.NO_BACKEND}.get(case)
    assert (got.reason if got is not None else None) is expected_reason


def test_admitted_pieces_go_past_the_bounds_and_each_has_its_expiry() -> None:
    scheduler = make(max_size=2, max_per_tenant=1, reject_unmeetable=True, timeout_s=400.0)
    backends = [view("a")]
    run_one(scheduler, "busy", backends)
    parent = parent_job(scheduler, now=1.0)
    pieces = pieces_of(scheduler, parent, 5)
    assert scheduler.offer_pieces(parent, pieces, 1.0, backends) is None
    assert len(scheduler.queue) == 5 and scheduler.queue.tenant_depth("t") == 5
    assert scheduler.tally.admitted == 2  # "busy" and the request: once
    assert scheduler.next_deadline() == min(scheduler.expires_at(p) for p in pieces)
    assert len({p.seq for p in pieces}) == 5 and all(p.seq for p in pieces)
    # Queued, the pieces count as waiting work: the next request meets the bounds (5 of 2 waiting).
    refused = scheduler.offer(parent_job(scheduler, "next", now=1.0), 1.0, backends)
    assert refused is not None and refused.reason is Reason.QUEUE_FULL


def test_offer_pieces_wants_pieces_of_that_request() -> None:
    scheduler = make()
    parent, other = parent_job(scheduler), parent_job(scheduler, "q")
    with pytest.raises(ValueError):
        scheduler.offer_pieces(parent, [], 0.0, [view("a")])
    with pytest.raises(ValueError):
        scheduler.offer_pieces(parent, pieces_of(scheduler, other, 2), 0.0, [view("a")])
    with pytest.raises(ValueError):
        scheduler.add_piece(parent_job(scheduler, "plain"), 0.0)
    assert len(scheduler.queue) == 0 and scheduler.tally.admitted == 0


def test_the_first_batch_starts_together_on_the_free_slots() -> None:
    scheduler = make()
    backends = [view("a", slots=2), view("b")]
    parent = parent_job(scheduler)
    n = scheduler.free_slots(parent, 0.0, backends)
    assert n == 3
    pieces = pieces_of(scheduler, parent, n)
    assert scheduler.offer_pieces(parent, pieces, 0.0, backends) is None
    started = scheduler.schedule(0.0, backends)
    assert [a.job.id for a in started] == ["p.0", "p.1", "p.2"]
    assert Counter(a.backend_id for a in started) == {"a": 2, "b": 1}
    assert scheduler.tally.dispatched == 3 and len(scheduler.queue) == 0


# --- continuations first -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["fifo", "fair"])
def test_a_started_requests_pieces_go_before_new_work_of_their_band(order: str) -> None:
    scheduler = make(order)
    backends = [view("a")]
    run_one(scheduler, "busy", backends)
    parent = parent_job(scheduler, tenant="x", now=0.0)
    later = pieces_of(scheduler, parent, 3)
    new = [parent_job(scheduler, f"n{i}", tenant=t, now=1.0) for i, t in enumerate("yzx")]
    for job in new:
        assert scheduler.offer(job, 1.0, backends) is None
    for piece in later:
        scheduler.add_piece(piece, 2.0)
    assert all(piece.continues for piece in later)
    assert queued_ids(scheduler, 2.0)[:3] == ["p.0", "p.1", "p.2"]
    assert scheduler.tally.admitted == 4  # continuations are not admitted again


def test_a_higher_band_still_goes_before_continuations() -> None:
    scheduler = make()
    backends = [view("a")]
    run_one(scheduler, "busy", backends)
    parent = parent_job(scheduler, tenant="x", band=1)
    piece, = pieces_of(scheduler, parent, 1)
    scheduler.add_piece(piece, 1.0)
    high = parent_job(scheduler, "high", tenant="y", band=0, now=1.0)
    low = parent_job(scheduler, "low", tenant="y", band=2, now=1.0)
    same = parent_job(scheduler, "same", tenant="y", band=1, now=1.0)
    for job in (low, same, high):
        assert scheduler.offer(job, 1.0, backends) is None
    assert queued_ids(scheduler, 1.0) == ["high", "p.0", "same", "low"]


def test_continuations_follow_the_band_they_aged_into() -> None:
    queue = FairQueue(100, band_aging_s=10.0)
    continuation = Job(id="c", chars=10, units=10.0, model_key=K24, arrived_at=0.0, band=2, continues=True)
    fresh = Job(id="f", chars=10, units=10.0, model_key=K24, arrived_at=9.0, band=1)
    old = Job(id="o", chars=10, units=10.0, model_key=K24, arrived_at=0.0, band=1)
    for job in (fresh, continuation, old):
        queue.push(job, 9.0)
    assert [j.id for j in queue.candidates(9.0)] == ["f", "o", "c"]  # not aged yet: band 2, last
    # At 15 s the continuation counts as band 1 and goes first in it; old counts as band 0.
    assert [j.id for j in queue.candidates(15.0)] == ["o", "c", "f"]


def test_continuations_of_several_tenants_go_in_arrival_order() -> None:
    for order in ("fifo", "fair"):
        queue = make_queue(order, max_size=10)
        jobs = [Job(id=f"c{i}", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant=t, band=1,
                    predicted_s=cost, continues=True) for i, (t, cost) in enumerate([("a", 9.0), ("b", 1.0),
                                                                                    ("a", 1.0), ("c", 5.0)])]
        plain = Job(id="n", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="b", band=1)
        for job in (plain, *jobs):
            queue.push(job, 0.0, force=True)
        assert [j.id for j in queue.candidates(0.0)] == ["c0", "c1", "c2", "c3", "n"], order


def test_a_tenant_is_charged_the_sum_of_its_pieces() -> None:
    """Tenant a's continuations (4 + 3 + 2 s) go first, and a is charged for them: b, costing 1 s
    a job and starting from the same virtual time, then gets 9 s of work before a's next job."""
    queue = FairQueue(100)
    for i, cost in enumerate([4.0, 3.0, 2.0]):
        queue.push(Job(id=f"a.{i}", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="a", parent="a",
                       predicted_s=cost, continues=True), 0.0)
    queue.push(Job(id="a-new", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="a", predicted_s=1.0),
               0.0)
    for i in range(12):
        queue.push(Job(id=f"b{i}", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="b",
                       predicted_s=1.0), 0.0)
    listed = [j.id for j in queue.candidates(0.0)]
    taken = []
    for _ in range(len(listed)):
        first = next(queue.candidates(0.0))
        queue.take(first, 0.0)
        taken.append(first.id)
    assert taken == listed
    assert taken[:3] == ["a.0", "a.1", "a.2"]
    assert taken.index("a-new") == 3 + 9  # after b0..b8: b's tag reached a's 9 (the tie to the older job)


def test_a_continuation_does_not_move_its_bands_virtual_time() -> None:
    """A tenant far ahead in its share takes a continuation: the others keep their place."""
    queue = FairQueue(100)
    for i in range(3):  # a uses 30 s of the band
        queue.push(Job(id=f"a{i}", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="a",
                       predicted_s=10.0), 0.0)
        queue.take(next(queue.candidates(0.0)), 0.0)
    b = Job(id="b", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="b", predicted_s=1.0)
    queue.push(b, 0.0)
    queue.take(b, 0.0)  # b's tag: the band's virtual time (20) + 1
    queue.push(Job(id="a.c", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="a", parent="x",
                   predicted_s=10.0, continues=True), 0.0)
    queue.take(next(queue.candidates(0.0)), 0.0)  # a's continuation: a is charged 30 -> 40
    queue.push(Job(id="a.n", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="a", predicted_s=1.0), 0.0)
    for i in range(30):
        queue.push(Job(id=f"b{i}", chars=10, units=10.0, model_key=K24, arrived_at=0.0, tenant="b",
                       predicted_s=1.0), 0.0)
    listed = [j.id for j in queue.candidates(0.0)]
    assert listed.index("a.n") == 19  # b goes from 21 to 40 first, not from 30 (a's tag when it took a.c)


# --- requeue, withdraw, expiry ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ["fifo", "fair"])
def test_a_requeued_piece_keeps_its_place_and_goes_first(order: str) -> None:
    scheduler = make(order)
    backends = [view("a"), view("b")]
    parent = parent_job(scheduler, tenant="x")
    first = pieces_of(scheduler, parent, 2)
    assert scheduler.offer_pieces(parent, first, 0.0, backends) is None
    assert len(scheduler.schedule(0.0, backends)) == 2
    newer = [parent_job(scheduler, f"n{i}", tenant="y", now=1.0) for i in range(2)]
    for job in newer:
        assert scheduler.offer(job, 1.0, backends) is None
    seq = first[1].seq
    assert scheduler.requeue("p.1", 2.0)
    assert first[1].seq == seq and first[1].continues  # its request has started: it goes first
    assert queued_ids(scheduler, 2.0) == ["p.1", "n0", "n1"]
    assert [a.job.id for a in scheduler.schedule(2.0, backends)] == ["p.1"]  # onto the one slot free
    assert scheduler.finish("p.0", 3.0, ok=True) is not None
    assert scheduler.cost.samples(K24) == 1  # learned from p.0's own units and time


def test_a_withdrawn_piece_leaves_nothing_behind() -> None:
    for order in ("fifo", "fair"):
        scheduler = make(order, reject_unmeetable=True, timeout_s=400.0)
        backends = [view("a")]
        run_one(scheduler, "busy", backends)
        parent = parent_job(scheduler)
        pieces = pieces_of(scheduler, parent, 2)
        assert scheduler.offer_pieces(parent, pieces, 0.0, backends) is None
        extra, = pieces_of(scheduler, parent_job(scheduler, "p"), 1, chars=50)
        extra.id = "p.2"
        scheduler.add_piece(extra, 0.0)
        for piece in (*pieces, extra):
            assert scheduler.cancel(piece.id) is piece
            assert scheduler.cancel(piece.id) is None
        assert len(scheduler.queue) == 0 and scheduler.queue.tenant_depth("t") == 0
        assert list(scheduler.queue.candidates(0.0)) == [] and scheduler.next_deadline() is None
        assert scheduler.expire(1e9) == [] and scheduler.tally.cancelled == 3
        assert set(scheduler.running) == {"busy"}


def test_a_piece_expires_with_its_requests_deadline() -> None:
    scheduler = make(reject_unmeetable=True, timeout_s=400.0)
    backends = [view("a")]
    run_one(scheduler, "busy", backends, chars=900)
    parent = parent_job(scheduler, now=1.0)
    piece, = pieces_of(scheduler, parent, 1, chars=100)
    scheduler.add_piece(piece, 1.0)
    latest = parent.deadline_at - piece.predicted_s
    assert scheduler.next_deadline() == latest
    assert scheduler.expire(latest - 1e-6) == []
    assert scheduler.expire(latest) == [piece]
    assert scheduler.tally.shed == 1 and len(scheduler.queue) == 0


# --- forecasts over continuations ------------------------------------------------------------------


def mixed_queue(queue: FairQueue | FifoQueue, spec: list[tuple[str, int, int, bool]]) -> None:
    for i, (tenant, band, units, continues) in enumerate(spec):
        cost = units + 2.0 ** -(3 * i + 3)  # tie-free tags (see test_queue)
        weight = {"a": 1.0, "b": 2.0, "c": 4.0}[tenant]
        queue.push(Job(id=f"j{i}", chars=10, units=10.0, model_key=K24, arrived_at=float(i), tenant=tenant,
                       weight=weight, band=band, predicted_s=cost, continues=continues,
                       parent="r" if continues else None), float(i))


spec_strategy = st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 2), st.integers(1, 20), st.booleans()),
                         min_size=1, max_size=14)


@settings(max_examples=80, deadline=None, database=None)
@given(spec=spec_strategy, shortest_first=st.booleans(), warmup=st.integers(0, 5), now=st.floats(0.0, 300.0),
       fifo=st.booleans())
def test_candidates_with_continuations_list_the_order_of_one_by_one_dispatch(
        spec: list[tuple[str, int, int, bool]], shortest_first: bool, warmup: int, now: float, fifo: bool) -> None:
    within = WithinTenant.SHORTEST_FIRST if shortest_first else WithinTenant.FIFO
    queue: FairQueue | FifoQueue = (FifoQueue(100) if fifo else
                                    FairQueue(100, within_tenant=within, aging_s=50.0, band_aging_s=100.0))
    mixed_queue(queue, spec)
    for _ in range(min(warmup, len(spec) - 1)):
        queue.take(next(queue.candidates(now)), now)
    copy = queue.copy()
    listed = [j.id for j in queue.candidates(now)]
    assert [j.id for j in copy.candidates(now)] == listed
    one_by_one = []
    for _ in range(len(listed)):
        first = next(copy.candidates(now))
        copy.take(first, now)
        one_by_one.append(first.id)
    assert one_by_one == listed
    assert listed == [j.id for j in queue.candidates(now)]  # the copy was independent


operation = st.tuples(st.sampled_from(["push", "push", "continue", "take", "remove"]), st.floats(0.0, 40.0),
                      st.sampled_from("abc"), st.integers(0, 2), st.integers(1, 20), st.integers(0, 10**6))


@settings(max_examples=120, deadline=None, database=None)
@given(ops=st.lists(operation, max_size=40), shortest_first=st.booleans())
def test_groups_kept_up_to_date_with_continuations_equal_groups_built_afresh(
        ops: list[tuple[str, float, str, int, int, int]], shortest_first: bool) -> None:
    within = WithinTenant.SHORTEST_FIRST if shortest_first else WithinTenant.FIFO
    queue = FairQueue(100, within_tenant=within, aging_s=15.0, band_aging_s=25.0)
    now = 0.0
    for n, (kind, dt, tenant, band, units, pick) in enumerate(ops):
        now += dt
        waiting = sorted(queue.jobs(), key=lambda j: j.seq)
        if kind in ("push", "continue") or not waiting:
            queue.push(Job(id=f"j{n}", chars=10, units=10.0, model_key=K24, arrived_at=now - dt * (pick % 3) / 2,
                           tenant=tenant, band=band, predicted_s=float(units), continues=kind == "continue"),
                       now, force=kind == "continue")
        elif kind == "take":
            queue.take(next(queue.candidates(now)), now)
        else:
            queue.remove(waiting[pick % len(waiting)].id)
        afresh = queue.copy()
        afresh._groups = None
        listed = [j.id for j in queue.candidates(now)]
        assert listed == [j.id for j in afresh.candidates(now)] == [j.id for j in queue.copy().candidates(now)]
        bands = [(queue.effective_band(j, now), not j.continues) for j in queue.candidates(now)]
        assert bands == sorted(bands)  # by band; in each, continuations first


def test_a_forecast_over_continuations_is_the_real_dispatch_order() -> None:
    """The forecast of each queued job, on a pool where one job starts at a time, matches when
    schedule really starts it, continuations included (and charged: x's new job goes last)."""
    scheduler = make()
    backends = [view("a")]
    run_one(scheduler, "busy", backends)
    parent = parent_job(scheduler, tenant="x")
    for piece in pieces_of(scheduler, parent, 2, chars=100):
        scheduler.add_piece(piece, 0.0)
    for i, tenant in enumerate("yxz"):
        assert scheduler.offer(parent_job(scheduler, f"n{i}", chars=150, tenant=tenant), 0.0, backends) is None
    forecast = {j.id: scheduler.forecast(j, 0.0, backends).start_s for j in scheduler.queue.jobs()}
    started: dict[str, float] = {}
    now = 0.0
    for _ in range(10):
        ending = min(scheduler.running.values(), key=lambda r: r.ends_at)
        now = ending.ends_at
        scheduler.finish(ending.job.id, now, ok=True)
        scheduler.cost = CostModel()  # learning nothing: the forecast assumed the predictions
        for assignment in scheduler.schedule(now, backends):
            started[assignment.job.id] = now
        if not len(scheduler.queue):
            break
    assert list(started) == ["p.0", "p.1", "n0", "n2", "n1"]
    assert started == pytest.approx(forecast)


# --- any sequence of operations --------------------------------------------------------------------


@dataclass
class Request:
    parent: Job
    pending: list[Job]  # pieces not yet queued
    started: bool = False


class PiecesMachine(RuleBasedStateMachine):
    """Random fanned-out and plain requests, dispatches, finishes, requeues, withdrawals and expiries.
    After every step: no job is both queued and running, the queue's per-tenant counts are those of
    its jobs, candidates list each queued job once (continuations first in their band), and every
    piece ever queued is in exactly one place."""

    order = "fair"

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.requests: list[Request] = []
        self.gone: set[str] = set()  # pieces finished, withdrawn or expired
        self.queued_ever: set[str] = set()
        self.next_id = 0
        self.admitted = 0

    @initialize(slots=st.lists(st.integers(1, 2), min_size=1, max_size=3), max_size=st.integers(1, 6),
                reject=st.booleans(), within=st.sampled_from(["fifo", "shortest_first"]))
    def setup(self, slots: list[int], max_size: int, reject: bool, within: str) -> None:
        self.scheduler = make(self.order, max_size=max_size, max_per_tenant=3, reject_unmeetable=reject,
                              timeout_s=120.0, within=within)
        self.backends = [view(f"b{i}", slots=n) for i, n in enumerate(slots)]

    def _new_parent(self, tenant: str, band: int, chars: int) -> Job:
        self.next_id += 1
        return parent_job(self.scheduler, f"r{self.next_id}", chars=chars, now=self.now, tenant=tenant, band=band)

    @rule(tenant=st.sampled_from("xyz"), band=st.integers(0, 2), chars=st.integers(100, 900),
          n=st.integers(2, 5), first=st.integers(1, 5))
    def offer_pieces(self, tenant: str, band: int, chars: int, n: int, first: int) -> None:
        parent = self._new_parent(tenant, band, chars)
        pieces = pieces_of(self.scheduler, parent, n)
        first = min(first, n)
        if self.scheduler.offer_pieces(parent, pieces[:first], self.now, self.backends) is None:
            self.admitted += 1
            self.requests.append(Request(parent=parent, pending=pieces[first:]))
            self.queued_ever.update(p.id for p in pieces[:first])

    @rule(tenant=st.sampled_from("xyz"), band=st.integers(0, 2), chars=st.integers(1, 900))
    def offer_plain(self, tenant: str, band: int, chars: int) -> None:
        parent = self._new_parent(tenant, band, chars)
        if self.scheduler.offer(parent, self.now, self.backends) is None:
            self.admitted += 1
            self.gone.discard(parent.id)

    @precondition(lambda self: any(r.pending for r in self.requests))
    @rule(pick=st.integers(0, 10**6))
    def add_piece(self, pick: int) -> None:
        open_ = [r for r in self.requests if r.pending]
        request = open_[pick % len(open_)]
        piece = request.pending.pop(0)
        self.scheduler.add_piece(piece, self.now)
        assert piece.continues
        self.queued_ever.add(piece.id)

    @rule(dt=st.floats(0.0, 20.0))
    def schedule(self, dt: float) -> None:
        self.now += dt
        queued = {j.id for j in self.scheduler.queue.jobs()}
        for assignment in self.scheduler.schedule(self.now, self.backends):
            assert assignment.job.id in queued

    @precondition(lambda self: bool(self.scheduler.running))
    @rule(pick=st.integers(0, 10**6), ok=st.booleans(), dt=st.floats(0.0, 20.0))
    def finish(self, pick: int, ok: bool, dt: float) -> None:
        self.now += dt
        ids = sorted(self.scheduler.running)
        job_id = ids[pick % len(ids)]
        assert self.scheduler.finish(job_id, self.now, ok=ok) is not None
        self.gone.add(job_id)

    @precondition(lambda self: bool(self.scheduler.running))
    @rule(pick=st.integers(0, 10**6))
    def requeue(self, pick: int) -> None:
        ids = sorted(self.scheduler.running)
        job_id = ids[pick % len(ids)]
        job = self.scheduler.running[job_id].job
        assert self.scheduler.requeue(job_id, self.now)
        assert job.continues == (job.parent is not None)

    @precondition(lambda self: len(self.scheduler.queue) > 0)
    @rule(pick=st.integers(0, 10**6))
    def withdraw(self, pick: int) -> None:
        ids = sorted(j.id for j in self.scheduler.queue.jobs())
        job_id = ids[pick % len(ids)]
        assert self.scheduler.cancel(job_id) is not None
        self.gone.add(job_id)

    @rule(dt=st.floats(0.0, 60.0))
    def expire(self, dt: float) -> None:
        self.now += dt
        for job in self.scheduler.expire(self.now):
            self.gone.add(job.id)

    @invariant()
    def nothing_both_queued_and_running(self) -> None:
        if not hasattr(self, "scheduler"):
            return
        queue = self.scheduler.queue
        queued = [j.id for j in queue.jobs()]
        assert len(queued) == len(set(queued)) == len(queue)
        assert not set(queued) & set(self.scheduler.running)
        tenants = Counter(j.tenant for j in queue.jobs())
        for tenant in "xyz":
            assert queue.tenant_depth(tenant) == tenants[tenant]
        listed = [j.id for j in queue.candidates(self.now)]
        assert sorted(listed) == sorted(queued)
        if isinstance(queue, FairQueue):
            bands = [(queue.effective_band(j, self.now), not j.continues) for j in queue.candidates(self.now)]
            assert bands == sorted(bands)
        else:
            flags = [not j.continues for j in queue.candidates(self.now)]
            assert flags == sorted(flags)

    @invariant()
    def every_piece_in_one_place(self) -> None:
        if not hasattr(self, "scheduler"):
            return
        queued = {j.id for j in self.scheduler.queue.jobs()}
        running = set(self.scheduler.running)
        for piece_id in self.queued_ever:
            places = (piece_id in queued) + (piece_id in running) + (piece_id in self.gone)
            assert places == 1, piece_id
        assert self.scheduler.tally.admitted == self.admitted


class FifoPiecesMachine(PiecesMachine):
    order = "fifo"


TestPiecesFair = PiecesMachine.TestCase
TestPiecesFair.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, database=None)
TestPiecesFifo = FifoPiecesMachine.TestCase
TestPiecesFifo.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, database=None)


# --- pressure: when even free slots are not split over ---------------------------------------------


def test_a_calm_pool_has_no_pressure() -> None:
    assert not make(reject_unmeetable=True).pressure(0.0)


def test_a_request_turned_away_for_capacity_is_pressure_for_a_rate_window_or_its_service() -> None:
    scheduler = make(max_size=1)
    backends = [view("a")]
    run_one(scheduler, "busy", backends, chars=60)
    assert scheduler.offer(parent_job(scheduler, "queued", chars=60), 1.0, backends) is None
    refused = parent_job(scheduler, "refused", chars=60)
    rejection = scheduler.offer(refused, 2.0, backends)
    assert rejection is not None and rejection.reason is Reason.QUEUE_FULL
    assert refused.predicted_s < 30.0  # so the rate window, 30 s, is the longer
    assert scheduler.pressure(2.0) and scheduler.pressure(2.0 + 29.9)
    assert not scheduler.pressure(2.0 + 30.0)
    # A long request turned away keeps the pool pressed for its own predicted service.
    long = parent_job(scheduler, "long", chars=2000, now=40.0)
    assert long.predicted_s > 30.0
    assert scheduler.offer(long, 40.0, backends) is not None
    assert scheduler.pressure(40.0 + long.predicted_s - 0.1) and not scheduler.pressure(40.0 + long.predicted_s)


def test_a_tenant_s_own_bound_is_not_pressure() -> None:
    scheduler = make()
    backends = [view("a")]
    run_one(scheduler, "busy", backends)
    assert scheduler.offer(parent_job(scheduler, "q1", tenant="x", bound=1), 1.0, backends) is None
    refused = scheduler.offer(parent_job(scheduler, "q2", tenant="x", bound=1), 1.0, backends)
    assert refused is not None and refused.reason is Reason.TENANT_QUEUE_FULL
    assert not scheduler.pressure(1.0)


def test_a_queued_job_running_out_of_time_is_pressure() -> None:
    scheduler = make(timeout_s=5.0)
    backends = [view("a")]
    run_one(scheduler, "busy", backends)
    assert scheduler.offer(parent_job(scheduler, "waiting", now=1.0), 1.0, backends) is None
    assert not scheduler.pressure(5.0)
    assert [j.id for j in scheduler.expire(6.0)] == ["waiting"]
    assert scheduler.pressure(6.0)


def test_pressure_survives_a_reload() -> None:
    old = make(max_size=1)
    backends = [view("a")]
    run_one(old, "busy", backends)
    assert old.offer(parent_job(old, "queued"), 1.0, backends) is None
    assert old.offer(parent_job(old, "refused"), 1.0, backends) is not None
    new = make()
    new.adopt(old)
    assert new.pressure(2.0)
