"""Backend choice (scheduler.core.dispatch) and what affinity buys through Scheduler.schedule."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.classes import ClassRule, LengthClasses
from scheduler.core.cost import CostModel, CostPriors
from scheduler.core.deadlines import Tier, TiersPolicy
from scheduler.core.dispatch import Candidate, Choice, choose_backend
from scheduler.core.queue import FifoQueue, ModelKey
from scheduler.core.running import BackendView
from scheduler.core.scheduler import Scheduler

K24: ModelKey = (24000, False)
K32: ModelKey = (32000, False)
K24P: ModelKey = (24000, True)
KEYS = (K24, K32, K24P)


def cand(id: str, *, key: ModelKey | None, slots: int = 1, in_flight: int = 0, remaining_s: float = 0.0) -> Candidate:
    return Candidate(id=id, slots=slots, in_flight=in_flight, model_key=key, remaining_s=remaining_s)


# --- choose_backend -----------------------------------------------------------------------------------


def test_nothing_free_means_wait() -> None:
    assert choose_backend(K24, [cand("a", key=K24, in_flight=1, remaining_s=5.0)], reload_s=20.0) is None
    assert choose_backend(K24, [], reload_s=20.0) is None


@pytest.mark.parametrize("other", [K32, None])
def test_a_free_same_key_backend_wins_over_any_other_free_one(other: ModelKey | None) -> None:
    pool = [cand("other", key=other), cand("same", key=K24, slots=2, in_flight=1, remaining_s=50.0)]
    assert choose_backend(K24, pool, reload_s=20.0) == Choice(backend_id="same", reload=False)


def test_among_same_key_backends_least_remaining_work_wins() -> None:
    pool = [cand("x", key=K24, slots=2, in_flight=1, remaining_s=30.0), cand("y", key=K24, slots=2, in_flight=1,
                                                                              remaining_s=3.0)]
    assert choose_backend(K24, pool, reload_s=20.0) == Choice(backend_id="y", reload=False)


def test_waits_when_a_busy_same_key_backend_frees_before_a_reload() -> None:
    pool = [cand("busy", key=K24, in_flight=1, remaining_s=19.0), cand("free", key=K32)]
    assert choose_backend(K24, pool, reload_s=20.0) is None


def test_switches_when_the_wait_is_longer_than_a_reload() -> None:
    pool = [cand("busy", key=K24, in_flight=1, remaining_s=21.0), cand("free", key=K32)]
    assert choose_backend(K24, pool, reload_s=20.0) == Choice(backend_id="free", reload=True)


def test_a_multi_slot_backend_frees_after_its_average_remaining_work() -> None:
    busy = cand("busy", key=K24, slots=2, in_flight=2, remaining_s=30.0)
    assert busy.free_in_s == 15.0
    assert choose_backend(K24, [busy, cand("free", key=K32)], reload_s=20.0) is None
    assert choose_backend(K24, [busy, cand("free", key=K32)], reload_s=10.0) == Choice(backend_id="free", reload=True)


def test_a_switch_prefers_an_empty_backend_then_least_remaining_work() -> None:
    pool = [cand("loaded", key=K32, slots=2, in_flight=1, remaining_s=0.0), cand("empty", key=None, slots=2,
                                                                              in_flight=1, remaining_s=40.0)]
    assert choose_backend(K24, pool, reload_s=20.0) == Choice(backend_id="empty", reload=True)
    pool = [cand("a", key=K32, slots=2, in_flight=1, remaining_s=9.0), cand("b", key=K24P, slots=2, in_flight=1,
                                                                         remaining_s=2.0)]
    assert choose_backend(K24, pool, reload_s=20.0) == Choice(backend_id="b", reload=True)


def test_reload_s_zero_never_waits() -> None:
    pool = [cand("busy", key=K24, in_flight=1, remaining_s=0.5), cand("free", key=K32)]
    assert choose_backend(K24, pool) == Choice(backend_id="free", reload=True)


@settings(max_examples=200, deadline=None, database=None)
@given(pool=st.lists(st.tuples(st.sampled_from([*KEYS, None]), st.integers(1, 3), st.integers(0, 3),
                               st.floats(0.0, 100.0)), min_size=0, max_size=5),
       key=st.sampled_from(KEYS), reload_s=st.floats(0.0, 60.0))
def test_choice_is_free_and_reloads_only_without_a_free_match(pool: list[tuple[ModelKey | None, int, int, float]],
                                                              key: ModelKey, reload_s: float) -> None:
    candidates = [cand(f"b{i}", key=k, slots=s, in_flight=min(f, s), remaining_s=r if f else 0.0)
                  for i, (k, s, f, r) in enumerate(pool)]
    choice = choose_backend(key, candidates, reload_s=reload_s)
    free_match = [c for c in candidates if c.free_slots and c.model_key == key]
    if choice is None:
        assert not free_match
        return
    chosen = next(c for c in candidates if c.id == choice.backend_id)
    assert chosen.free_slots > 0
    assert choice.reload == (chosen.model_key != key)
    assert not (choice.reload and free_match)


# --- affinity through the scheduler, against a key-blind dispatcher -----------------------------------

RELOAD_S = 20.0


@dataclass(frozen=True)
class Arrival:
    gap_s: float  # after the previous arrival
    key: ModelKey
    units: float


def run_trace(trace: list[Arrival], loaded: dict[str, ModelKey | None], *, blind: bool) -> tuple[int, int]:
    """Feed the trace through Scheduler.schedule over one-slot backends; a reload adds RELOAD_S to
    the service, and the backend then holds the job's key. ``blind`` hides the loaded keys from
    the scheduler, which makes it a key-blind least-work dispatcher. Returns (reloads the backends
    did, tally.reloads)."""
    scheduler = Scheduler(queue=FifoQueue(10**6), cost=CostModel(CostPriors(reload_s=RELOAD_S)),
                          classes=LengthClasses([ClassRule(name="all", max_chars=None)]),
                          deadlines=TiersPolicy([Tier(max_chars=None, timeout_s=1e9)]), reject_unmeetable=False)
    loaded = dict(loaded)
    ends: dict[str, float] = {}
    reloads = 0
    now = 0.0
    next_at = trace[0].gap_s if trace else math.inf
    i = 0
    while i < len(trace) or ends:
        now = min(next_at, *ends.values()) if ends else next_at
        for job_id in [j for j, end in ends.items() if end <= now]:
            del ends[job_id]
            scheduler.finish(job_id, now, ok=False)  # ok=False: predictions stay at the priors in both runs
        views = [BackendView(id=b, ready=True, alive=True, slots=1, model_key=None if blind else k)
                 for b, k in loaded.items()]
        while i < len(trace) and next_at <= now:
            arrival = trace[i]
            job = scheduler.make_job(id=f"j{i}", chars=int(arrival.units), units=arrival.units, model_key=arrival.key,
                                     now=now)
            assert scheduler.offer(job, now, views) is None
            i += 1
            next_at = now + trace[i].gap_s if i < len(trace) else math.inf
        for assignment in scheduler.schedule(now, views):
            before = loaded[assignment.backend_id]
            switch = before is not None and before != assignment.job.model_key
            reloads += switch
            loaded[assignment.backend_id] = assignment.job.model_key
            ends[assignment.job.id] = now + assignment.job.predicted_s + (RELOAD_S if switch else 0.0)
    assert len(scheduler.queue) == 0 and not scheduler.running
    assert scheduler.tally.dispatched == len(trace)
    return reloads, scheduler.tally.reloads


def pool_for(keys: list[ModelKey], extra: list[ModelKey | None]) -> dict[str, ModelKey | None]:
    """One backend per key in the traffic, plus ``extra`` ones."""
    return {f"b{i}": k for i, k in enumerate([*keys, *extra])}


arrivals = st.builds(Arrival, gap_s=st.floats(0.0, 15.0), key=st.sampled_from(KEYS), units=st.floats(5.0, 120.0))


@settings(max_examples=60, deadline=None, database=None)
@given(trace=st.lists(arrivals, min_size=2, max_size=60), extra=st.lists(st.sampled_from([*KEYS, None]), max_size=2))
def test_affinity_never_reloads_jobs_shorter_than_a_reload(trace: list[Arrival], extra: list[ModelKey | None]) -> None:
    """Every job predicted under reload_s (units <= 120: < 19.4 s of 20 s) and each key has a
    backend: affinity reloads only to put an otherwise idle backend to work on a backlog that
    would wait longer than a reload, so never more than the key-blind dispatcher, on every trace;
    tally.reloads agrees with the backends' count."""
    pool = pool_for(sorted({a.key for a in trace}), extra)
    done, tallied = run_trace(trace, pool, blind=False)
    blind, _ = run_trace(trace, pool, blind=True)
    assert done == tallied <= blind


@settings(max_examples=20, deadline=None, database=None)
@given(seed=st.integers(0, 2**32), mean_gap_s=st.floats(0.5, 30.0), max_units=st.sampled_from([120.0, 300.0, 600.0]),
       n_keys=st.integers(2, 3), extra=st.lists(st.sampled_from([*KEYS, None]), max_size=2))
def test_affinity_reloads_less_than_a_key_blind_dispatcher(seed: int, mean_gap_s: float, max_units: float,
                                                           n_keys: int, extra: list[ModelKey | None]) -> None:
    """150 jobs of 2-3 keys at random (Poisson arrivals, 1-96 s jobs, loads from light to
    overload), a pool where each key has a backend: affinity does strictly fewer reloads than the
    key-blind dispatcher. (Per job the choice is greedy, so on a short adversarial trace affinity
    can lose by one; over 2,300 random 150-job traces its worst ratio was 0.94.)"""
    rng = random.Random(seed)
    keys = rng.sample(KEYS, n_keys)
    trace = [Arrival(gap_s=rng.expovariate(1 / mean_gap_s), key=rng.choice(keys), units=rng.uniform(5.0, max_units))
             for _ in range(150)]
    pool = pool_for(sorted(keys), extra)
    done, tallied = run_trace(trace, pool, blind=False)
    blind, _ = run_trace(trace, pool, blind=True)
    assert done == tallied
    assert done < blind


@pytest.mark.parametrize("seed", range(5))
def test_affinity_reloads_far_less_on_mixed_traffic(seed: int) -> None:
    """300 short jobs, three keys at random, arriving about as fast as three backends serve them:
    the key-blind dispatcher reloads on >= 10 % of dispatches, affinity on under a quarter of that
    (it does switch an idle backend when one key's backlog would wait longer than a reload: seeds
    0-4 give 11-22 % of the key-blind count)."""
    rng = random.Random(seed)
    trace = [Arrival(gap_s=rng.expovariate(1 / 4.0), key=rng.choice(KEYS), units=rng.uniform(5, 120))
             for _ in range(300)]
    pool = pool_for(list(KEYS), [])
    done, tallied = run_trace(trace, pool, blind=False)
    blind, _ = run_trace(trace, pool, blind=True)
    assert done == tallied
    assert blind >= 30
    assert done < blind / 4


# --- defects found and fixed ------------------------------------------------------------------------------------


def scheduler_for(reload_s: float = RELOAD_S) -> Scheduler:
    return Scheduler(queue=FifoQueue(100), cost=CostModel(CostPriors(reload_s=reload_s)),
                     classes=LengthClasses([ClassRule(name="all", max_chars=None)]),
                     deadlines=TiersPolicy([Tier(max_chars=None, timeout_s=1e9)]), reject_unmeetable=False)


def test_a_backlog_of_one_key_spills_onto_another_backend() -> None:
    scheduler = scheduler_for()
    views = [BackendView(id="b0", ready=True, alive=True, slots=1, model_key=K24),
             BackendView(id="b1", ready=True, alive=True, slots=1, model_key=K32)]
    for i in range(10):  # ~14.7 s each: the 3rd in line would wait ~29 s > a 20 s reload
        job = scheduler.make_job(id=f"j{i}", chars=90, units=90.0, model_key=K24, now=0.0)
        assert scheduler.offer(job, 0.0, views) is None
    assigned = [a.backend_id for t in range(20) for a in scheduler.schedule(float(t), views)]
    assert "b1" in assigned  # today: only b0 is used, 9 jobs wait ~130 s with b1 idle


def test_a_reload_in_one_pass_is_seen_by_the_next_assignment() -> None:
    scheduler = scheduler_for()
    views = [BackendView(id="b", ready=True, alive=True, slots=2, model_key=K24)]
    for i, key in enumerate([K32, K24]):
        job = scheduler.make_job(id=f"j{i}", chars=10, units=10.0, model_key=key, now=0.0)
        assert scheduler.offer(job, 0.0, views) is None
    assignments = scheduler.schedule(0.0, views)
    loaded: ModelKey | None = K24
    for a in assignments:  # replay the pass: each non-reload must find its key loaded
        if a.reload:
            loaded = a.job.model_key
        else:
            assert a.job.model_key == loaded, assignments  # today: j1 (24 kHz) lands "no reload" on a 32 kHz load
