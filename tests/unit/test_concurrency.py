"""scheduler.core.concurrency: the adaptive slot limit against a simulated processor-sharing backend.

The simulated backend runs k jobs at once, each at T(k)/k of its solo speed; a closed loop keeps
it saturated with jobs whose solo times differ 20x (1 s and 20 s, with 5 % noise around what the
controller is told). Time is simulated: no sleeps.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.concurrency import AdaptiveLimit, AdaptiveSettings, FixedLimit, SlotPolicy


@dataclass
class Simulation:
    """A saturated processor-sharing backend driven by one AdaptiveLimit."""

    limit: AdaptiveLimit
    curve: Sequence[float]
    budget_factor: float = 20.0  # deadline budget = this x the job's solo estimate
    # Late when it takes more than this x its solo estimate from its dispatch: what is left of its
    # budget once it waited in line (None: never late).
    slack: float | None = None
    seed: int = 0
    now: float = 0.0
    time_at: Counter[int] = field(default_factory=Counter)  # simulated seconds spent at each limit
    highest_in_flight: int = 0
    completed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.running: dict[str, tuple[float, float]] = {}  # id -> (remaining solo work, solo estimate)
        self.started: dict[str, float] = {}
        self.next_id = 0

    def fill(self) -> None:
        while True:
            while len(self.running) < self.limit.limit:
                estimate = self.rng.choice((1.0, 20.0))
                job = f"j{self.next_id}"
                self.next_id += 1
                self.running[job] = (estimate * self.rng.lognormvariate(0.0, 0.05), estimate)
                self.started[job] = self.now
                self.limit.dispatched(job, self.now, len(self.running))
            before = self.limit.limit
            self.limit.load(self.now, len(self.running), waiting=True)
            if self.limit.limit <= before:
                break
        self.highest_in_flight = max(self.highest_in_flight, len(self.running))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        self.fill()
        while self.now < end:
            k = len(self.running)
            speed = self.curve[min(k, len(self.curve)) - 1] / k
            job = min(self.running, key=lambda j: self.running[j][0])
            step = self.running[job][0] / speed
            self.time_at[self.limit.limit] += step
            self.now += step
            for other, (left, estimate) in list(self.running.items()):
                self.running[other] = (left - step * speed, estimate)
            _, estimate = self.running.pop(job)
            took = self.now - self.started.pop(job)
            self.completed += 1
            self.limit.released(job, self.now, len(self.running), work_s=estimate,
                                budget_s=estimate * self.budget_factor, ok=True,
                                late=self.slack is not None and took > estimate * self.slack)
            self.fill()

    def settled_at(self, seconds: float) -> Counter[int]:
        """Share of the next ``seconds`` of simulated time spent at each limit."""
        self.time_at.clear()
        self.run(seconds)
        total = sum(self.time_at.values())
        return Counter({level: t / total for level, t in self.time_at.items()})


def simulate(curve: Sequence[float], *, seed: int = 0, budget_factor: float = 20.0, slack: float | None = None,
             **knobs: float) -> Simulation:
    knobs = {"max_slots": 4, "min_gain": 0.1, "samples": 8, "reprobe_s": 600.0} | knobs
    limit = AdaptiveLimit(AdaptiveSettings(**knobs))  # type: ignore[arg-type]
    return Simulation(limit=limit, curve=curve, budget_factor=budget_factor, slack=slack, seed=seed)


@pytest.mark.parametrize(("curve", "best"), [
    ((1.0, 1.9, 2.6, 2.75, 2.8), 3),  # 2.75 / 2.6 < 1.1: the fourth slot does not pay
    ((1.0, 1.3, 1.4, 1.5), 2),  # the measured GLM-TTS shape: 1.3 >= 1.1, but 1.4 / 1.3 < 1.1
    ((1.0, 1.0, 1.0, 1.0), 1),  # no gain at all
    ((1.0, 2.0, 3.0, 4.0, 5.0), 4),  # linear: up to max_slots, never past it
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_it_settles_at_the_best_fixed_limit(curve: tuple[float, ...], best: int, seed: int) -> None:
    sim = simulate(curve, seed=seed)
    sim.run(2000.0)  # a few hundred completions of 1 s and 20 s jobs
    # Re-probes every 600 s cost time at the next level: a level whose gain is near the bar (3 on
    # the second curve, 4 on the first) is probed for up to four cohorts before it is dropped.
    share = sim.settled_at(6000.0)
    assert share[best] > 0.6 and share[best] == max(share.values()), share
    assert sim.highest_in_flight <= 4


def test_a_level_whose_latency_breaks_the_deadlines_is_not_kept() -> None:
    # 2 in flight: x1.5 throughput (a gain), but each job takes 2/1.5 = 1.33x its solo time, and
    # the budgets (1.25x solo, headroom 1: service may take the whole budget) allow only 1.25x.
    sim = simulate((1.0, 1.5, 1.6), budget_factor=1.25)
    sim.run(2000.0)
    assert sim.settled_at(6000.0)[1] > 0.8, sim.limit.describe()
    roomy = simulate((1.0, 1.5, 1.6), budget_factor=1.5)  # 1.33 <= 1.5: now it fits
    roomy.run(2000.0)
    assert roomy.settled_at(6000.0)[2] > 0.8


@pytest.mark.parametrize("seed", [0, 1])
def test_a_level_that_gains_throughput_but_makes_requests_late_is_not_kept(seed: int) -> None:
    """Goodput, not throughput: x1.3 at 2 in flight, but each request then takes 2 / 1.3 = 1.54x
    its solo time, past the 1.4x its deadline leaves once it waited in line. The budgets alone
    (20x solo) would allow it; the requests that finish late do not count."""
    sim = simulate((1.0, 1.3, 1.4, 1.5), seed=seed, slack=1.4)
    sim.run(2000.0)
    assert sim.settled_at(6000.0)[1] > 0.8, sim.limit.describe()
    assert sim.limit.describe()["levels"]["2"]["in_time"] == 0.0
    roomy = simulate((1.0, 1.3, 1.4, 1.5), seed=seed, slack=1.7)  # 1.54 <= 1.7: in time, kept
    roomy.run(2000.0)
    assert roomy.settled_at(6000.0)[2] > 0.6, roomy.limit.describe()


def test_it_follows_a_change_of_curve() -> None:
    sim = simulate((1.0, 1.9, 2.6, 2.75, 2.8))
    sim.run(2000.0)
    assert sim.settled_at(2000.0)[3] > 0.6
    sim.curve = (1.0, 1.3, 1.4, 1.5)  # other processes on the GPU got busy: concurrency pays less
    sim.run(3000.0)
    assert sim.settled_at(6000.0)[2] > 0.6
    sim.curve = (1.0, 1.0, 1.0, 1.0)
    sim.run(3000.0)
    assert sim.settled_at(6000.0)[1] > 0.8  # the rest: re-probes of 2, every reprobe_s
    sim.curve = (1.0, 1.9, 2.6, 2.75, 2.8)  # the GPU is free again: re-probes find the knee again
    sim.run(4000.0)
    assert sim.settled_at(6000.0)[3] > 0.6


def test_learned_throughput_and_stretch_are_normalised_by_solo_time() -> None:
    sim = simulate((1.0, 1.9, 2.6, 2.75, 2.8))
    sim.run(2000.0)
    while sim.limit.probing:
        sim.run(10.0)
    described = sim.limit.describe()
    assert described["mode"] == "auto" and described["slots"] == 3 and described["max_slots"] == 4
    for level, throughput in ((1, 1.0), (2, 1.9), (3, 2.6), (4, 2.75)):
        assert sim.limit.throughput(level) == pytest.approx(throughput, rel=0.08)
        assert sim.limit.stretch(level) == pytest.approx(level / throughput, rel=0.08)
        assert described["levels"][str(level)]["samples"] >= 4


def test_only_successes_since_the_last_restart_teach_it() -> None:
    limit = AdaptiveLimit(AdaptiveSettings(samples=2), warming=False)
    for i in range(2):  # a cohort of failures: nothing measured
        limit.dispatched(f"a{i}", float(i), 1)
        limit.released(f"a{i}", i + 0.5, 0, work_s=1.0, budget_s=60.0, ok=False)
    assert limit.describe()["levels"] == {}
    limit.dispatched("b", 2.0, 1)
    limit.reset(2.5)  # a new process: b ran on the old one
    limit.released("b", 3.0, 0, work_s=1.0, budget_s=60.0, ok=True)
    assert limit.describe()["levels"] == {}
    for i, start in enumerate((4.0, 5.0)):  # the new process's first cohort: its warm-up, not measured
        limit.dispatched(f"w{i}", start, 1)
        limit.released(f"w{i}", start + 0.5, 0, work_s=0.1, budget_s=60.0, ok=True)
    assert limit.describe()["levels"] == {} and not limit.warming
    for i, start in enumerate((6.0, 7.0)):
        limit.dispatched(f"c{i}", start, 1)
        limit.released(f"c{i}", start + 0.5, 0, work_s=0.25, budget_s=60.0, ok=True)
    assert limit.stretch(1) == 2.0 and limit.throughput(1) == 0.5


def test_a_restart_starts_again_at_one() -> None:
    sim = simulate((1.0, 1.9, 2.6, 2.75, 2.8))
    sim.run(2000.0)
    assert sim.limit.limit == 3
    sim.limit.reset(sim.now)
    assert sim.limit.limit == 1 and sim.limit.describe()["levels"] == {}


def test_a_request_counts_at_its_time_weighted_level_only_if_it_stayed_near_it() -> None:
    limit = AdaptiveLimit(AdaptiveSettings(samples=2, max_slots=4), warming=False)
    limit.limit = 2
    limit.dispatched("a", 0.0, 1)
    limit.dispatched("b", 0.0, 2)
    limit.released("a", 2.0, 1, work_s=1.0, budget_s=60.0, ok=True)  # 2 s at 2 in flight: stretch 2
    limit.dispatched("c", 2.0, 2)  # not in the cohort of 2
    limit.released("b", 4.0, 1, work_s=1.0, budget_s=60.0, ok=True)  # 4 s at 2 (with a, then c): stretch 4
    assert limit.stretch(2) == 3.0 and limit.throughput(2) == 0.75  # medians of (2, 4) and (2/2, 2/4)
    other = AdaptiveLimit(AdaptiveSettings(samples=2, max_slots=4), warming=False)
    other.limit = 2
    other.dispatched("a", 0.0, 1)
    other.dispatched("b", 0.0, 2)
    other.released("a", 3.0, 1, work_s=1.0, budget_s=60.0, ok=True)  # 3 s at 2: counts
    other.released("b", 7.0, 0, work_s=2.0, budget_s=60.0, ok=True)  # average 1.43: nearer level 1 than 2
    assert other.describe()["levels"] == {}  # one clean sample of two is too few to measure
    near = AdaptiveLimit(AdaptiveSettings(samples=2, max_slots=4), warming=False)
    near.limit = 2
    near.dispatched("a", 0.0, 1)
    near.dispatched("b", 0.0, 2)
    near.released("a", 3.0, 1, work_s=1.0, budget_s=60.0, ok=True)  # 3 s at 2
    near.released("b", 4.0, 0, work_s=2.0, budget_s=60.0, ok=True)  # average 1.75 (an express job came and went)
    assert near.describe()["levels"]["2"]["samples"] == 2


def test_fixed_is_fixed() -> None:
    limit = SlotPolicy(fixed=3).new_limit(0.0)
    assert isinstance(limit, FixedLimit) and limit.limit == 3 and limit.mode == "fixed"
    limit.load(0.0, 3, waiting=True)
    limit.reset(1.0)
    assert limit.limit == 3 and limit.describe() == {"mode": "fixed", "slots": 3}
    assert isinstance(SlotPolicy(fixed=None).new_limit(0.0), AdaptiveLimit)


@settings(max_examples=40, deadline=None)
@given(curve=st.lists(st.floats(0.2, 5.0), min_size=1, max_size=6), max_slots=st.integers(1, 5),
       samples=st.integers(2, 6), min_gain=st.floats(0.0, 0.5), budget_factor=st.floats(1.0, 50.0),
       seed=st.integers(0, 1000))
def test_the_limit_stays_within_one_and_max_slots(curve: list[float], max_slots: int, samples: int,
                                                   min_gain: float, budget_factor: float, seed: int) -> None:
    sim = simulate(curve, seed=seed, budget_factor=budget_factor, max_slots=max_slots, samples=samples,
                   min_gain=min_gain, reprobe_s=50.0)
    seen = set()
    for _ in range(10):
        sim.run(30.0)
        seen.add(sim.limit.limit)
    assert all(1 <= level <= max_slots for level in seen)
    assert 1 <= sim.highest_in_flight <= max_slots


def test_requests_beside_the_limit_share_the_throughput_but_not_the_level() -> None:
    limit = AdaptiveLimit(AdaptiveSettings(samples=2, max_slots=4), warming=False)
    limit.load(0.0, 0, waiting=False, beside=1)  # an express request runs beside the whole time
    limit.dispatched("a", 0.0, 1, beside=1)
    limit.released("a", 2.0, 0, work_s=1.0, budget_s=60.0, ok=True, beside=1)  # 2 s for 1 s of work
    limit.dispatched("b", 2.0, 1, beside=1)
    limit.released("b", 4.0, 0, work_s=1.0, budget_s=60.0, ok=True, beside=1)
    # Counted at level 1 (the limit's), with the backend's throughput shared by two: 2 / 2 = 1, a
    # flat curve; not 1 / 2, which would make level 1 look half as fast as it is.
    assert limit.describe()["levels"]["1"] == {"samples": 2, "throughput": 1.0, "stretch": 2.0, "in_time": 1.0}
