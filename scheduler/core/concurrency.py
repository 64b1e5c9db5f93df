"""How many requests one backend serves at once: a fixed number, or learned online (``slots: auto``).

Concurrent requests inside one backend share its throughput (x1.3 in total at 2, x1.5 at 4 for
GLM-TTS), and processes on one GPU share that GPU, so the best number in flight depends on the
hardware and on what else runs there. ``AdaptiveLimit`` measures it per backend:

- Each completed request is a sample: its *stretch* is actual seconds over its solo estimate
  (``work_s``), and it ran at the time-weighted average number in flight over its run. Service
  times differ 20x between short and long texts, so raw latency says nothing; the stretch does.
- At ``k`` in flight a backend completes ``k / stretch(k)`` solo-seconds of work per second (its
  throughput) and a request takes ``stretch(k)`` times its solo time (its latency).
- What a level is worth is its *goodput*: its throughput times the share of its requests that
  finished by their deadlines. More in flight gets more done only where the slowdown it causes
  does not make requests late.
- Start at 1. Saturated at the limit ``L`` (``L`` in flight, work waiting) and measured since it
  became the limit: probe ``L + 1`` (never past ``max_slots``). Measured there with a fresh
  cohort, keep it only if goodput rose by ``min_gain`` even two standard errors short of what
  was seen, and the latency still fits the deadlines (the 90th percentile of recent requests'
  solo time over deadline budget, times the stretch, at most ``latency_headroom``); else go back
  and leave ``L + 1`` alone for ``reprobe_s``.
- Settled at ``L`` with a fresh measure: step down to ``L - 1`` when ``L``'s goodput no longer
  beats what ``L - 1`` was measured at, or its latency stopped fitting (conditions changed).

Pure: no clock of its own, no I/O. The dispatcher calls in with ``now``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["DEFAULT_MAX_SLOTS", "AdaptiveLimit", "AdaptiveSettings", "FixedLimit", "SlotLimit", "SlotPolicy"]

DEFAULT_MAX_SLOTS = 4
BUDGET_WINDOW = 64  # recent completions whose deadline budgets the latency check looks at
BUDGET_QUANTILE = 0.9  # the latency check must hold for this share of them
LEVEL_TOLERANCE = 0.5  # a sample counts for the level nearest the average it ran at (an express slot blurs it)
# A request teaches the slowdown at the total in flight nearest the average it ran with, only when
# it is this near: one that ran half its time alone says little about either level.
COMPANY_TOLERANCE = 0.25
# The fixed part of a request's time (overhead_s) is told from its slowness only where the requests
# that ran alone differ this much in size (largest solo estimate over smallest).
OVERHEAD_SPREAD = 3.0
CONFIDENCE = 2.0  # standard errors a step's gain must clear min_gain by
POOLED_COHORTS = 4  # a level's measure pools this many of its latest cohorts
PROBE_COHORTS = 4  # a probe that is neither clearly worth it nor clearly not is decided after this many cohorts
MAD_TO_SD = 1.4826  # median absolute deviation to standard deviation, for normal noise
MEDIAN_SE = 1.2533  # standard error of a median over that of a mean, for normal noise


@dataclass(frozen=True, kw_only=True)
class AdaptiveSettings:
    max_slots: int = DEFAULT_MAX_SLOTS
    min_gain: float = 0.1  # a step up must raise throughput by this fraction
    samples: int = 8  # requests per cohort: a level is judged on that many, each followed to its end
    reprobe_s: float = 300.0  # how long a level that lost (or was stepped down from) is left alone
    latency_headroom: float = 1.0  # service at a level may take at most this share of a deadline budget

    def __post_init__(self) -> None:
        if self.max_slots < 1 or self.samples < 1 or self.min_gain < 0 or self.reprobe_s < 0 \
                or not 0 < self.latency_headroom <= 1:
            raise ValueError(f"invalid adaptive settings: {self}")


class SlotLimit(Protocol):
    """One backend's limit on requests in flight. The dispatcher calls ``dispatched`` when it
    gives the backend a job, ``released`` when the backend is done with it (or it went back in
    line), ``load`` after each scheduling pass, and ``reset`` when the backend restarts; each
    with the backend's in-flight count after the change."""

    @property
    def mode(self) -> str: ...

    @property
    def limit(self) -> int: ...

    def dispatched(self, job_id: str, now: float, in_flight: int, *, beside: int = 0,
                   extra: bool = False) -> None: ...

    def released(self, job_id: str, now: float, in_flight: int, *, work_s: float, budget_s: float,
                 ok: bool, beside: int = 0, late: bool = False) -> None: ...

    def load(self, now: float, in_flight: int, *, waiting: bool, beside: int = 0) -> None: ...

    def reset(self, now: float) -> None: ...

    def slowdown(self) -> tuple[float, ...] | None: ...

    def describe(self) -> dict[str, Any]: ...


class FixedLimit:
    """``slots: N``: always N."""

    mode = "fixed"

    def __init__(self, slots: int) -> None:
        self.limit = slots

    def dispatched(self, job_id: str, now: float, in_flight: int, *, beside: int = 0,
                   extra: bool = False) -> None:
        pass

    def released(self, job_id: str, now: float, in_flight: int, *, work_s: float, budget_s: float,
                 ok: bool, beside: int = 0, late: bool = False) -> None:
        pass

    def load(self, now: float, in_flight: int, *, waiting: bool, beside: int = 0) -> None:
        pass

    def reset(self, now: float) -> None:
        pass

    def slowdown(self) -> tuple[float, ...] | None:
        """Nothing learned: the operator chose the number, dispatch fills it."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "slots": self.limit}


@dataclass(frozen=True, kw_only=True)
class Measure:
    """What a level's latest cohorts showed (pooled over up to POOLED_COHORTS of them)."""

    throughput: float  # median solo-seconds of work completed per second
    in_time: float  # share of the samples that finished by their deadline
    spread: float  # relative standard deviation of one sample (robust: from the median absolute deviation)
    stretch: float  # median actual / solo time
    samples: int
    at: float  # when the cohort's last request finished

    @property
    def goodput(self) -> float:
        """Solo-seconds of work completed per second by requests that made their deadlines."""
        return self.throughput * self.in_time


@dataclass
class _Run:
    started_at: float
    area: float  # the in-flight integral when it started
    area_all: float  # ... and that of all in flight, those beside the limit included
    epoch: int
    cohort: bool  # one of the requests the current level is being measured with
    extra: bool = False  # let past the limit by a class's extra slot: teaches the slowdown only


@dataclass
class AdaptiveLimit:
    """``slots: auto``: the limit learned from completions (module docstring).

    A level is measured with a *cohort*: the next ``samples`` requests dispatched while it is the
    limit, each followed to its end. Judging from the first requests to *finish* instead would
    favour the short and the lucky (a probe's first completions are all quick ones), which is
    enough to tip a 7 % gain over a 10 % bar.
    """

    settings: AdaptiveSettings
    now: float = 0.0
    limit: int = 1
    probing: bool = False  # the limit is a step up still being judged
    measures: dict[int, Measure] = field(default_factory=dict)  # the latest measure of each level
    # Recent cohorts' samples: (level, solo estimate, seconds taken, late).
    _samples: dict[int, deque[tuple[float, float, float, bool]]] = field(default_factory=dict)
    _fresh: bool = False  # the current limit was measured since it became the limit
    _cohort: dict[str, tuple[float, float, float, bool] | None] = field(default_factory=dict)  # id -> a sample
    _cohort_open: bool = True  # still taking members
    _blocked_until: dict[int, float] = field(default_factory=dict)
    _ratios: deque[float] = field(default_factory=lambda: deque(maxlen=BUDGET_WINDOW))  # solo time / budget
    _runs: dict[str, _Run] = field(default_factory=dict)
    # (Solo estimate, seconds taken) of recent requests by the total in flight they ran with (those
    # beside the limit included, each request at whatever level): ``slowdown`` and ``overhead_s``.
    _company: dict[int, deque[tuple[float, float]]] = field(default_factory=dict)
    _company_added: int = 0  # samples ever added to _company (with _epoch and the measures: the curve's key)
    # The last ``slowdown`` and what it was computed from: the dispatcher asks for it on every pass.
    _curve: tuple[Any, tuple[float, ...]] | None = None
    _epoch: int = 0
    _in_flight: int = 0
    _area: float = 0.0  # integral of in-flight (within the limit) over time: which level a request ran at
    _beside: int = 0  # requests an extra slot let past the limit, running beside
    _area_all: float = 0.0  # integral of all in flight: what the backend's throughput is shared among
    _last: float = 0.0
    # The first cohort after a (re)start is not measured: a process's first requests run on cold
    # caches (on a GPU the first takes ~3x, measurements/h200-calibration.md) while its neighbours
    # start too.
    warming: bool = True

    mode = "auto"

    def __post_init__(self) -> None:
        self._last = self.now

    # --- events -------------------------------------------------------------------------------

    def dispatched(self, job_id: str, now: float, in_flight: int, *, beside: int = 0,
                   extra: bool = False) -> None:
        """``extra``: let past the limit by a class's extra slot (``beside`` counts it already)."""
        self._advance(now, in_flight, beside)
        if extra:
            self._runs[job_id] = _Run(started_at=now, area=self._area, area_all=self._area_all,
                                      epoch=self._epoch, cohort=False, extra=True)
            return
        member = self._cohort_open
        if member:
            self._cohort[job_id] = None
            self._cohort_open = len(self._cohort) < self.settings.samples
        self._runs[job_id] = _Run(started_at=now, area=self._area, area_all=self._area_all, epoch=self._epoch,
                                  cohort=member)

    def released(self, job_id: str, now: float, in_flight: int, *, work_s: float, budget_s: float,
                 ok: bool, beside: int = 0, late: bool = False) -> None:
        """``late``: it finished after its deadline (its client had its 408 already)."""
        self._advance(now, in_flight, beside)
        run = self._runs.pop(job_id, None)
        if run is None or run.epoch != self._epoch:
            return  # only work the backend did since its last restart teaches
        took = now - run.started_at
        if ok and took > 0 and work_s > 0:
            company = (self._area_all - run.area_all) / took  # all in flight, on average, while it ran
            level = round(company)
            if level >= 1 and abs(company - level) <= COMPANY_TOLERANCE:
                window = POOLED_COHORTS * self.settings.samples
                self._company.setdefault(level, deque(maxlen=window)).append((work_s, took))
                self._company_added += 1
            if not run.extra:  # one an extra slot let past the limit teaches the slowdown only
                average = (self._area - run.area) / took
                if run.cohort and abs(average - self.limit) <= LEVEL_TOLERANCE:
                    # The level is that of the requests within the limit; the throughput is shared
                    # among all in flight, those beside included (leaving them out would make a
                    # level with express requests beside it look slower than it is).
                    self._cohort[job_id] = (company, work_s, took, late)
                if budget_s > 0:
                    self._ratios.append(work_s / budget_s)
        if run.cohort:
            self._cohort.setdefault(job_id, None)
            self._close_cohort(now)

    def load(self, now: float, in_flight: int, *, waiting: bool, beside: int = 0) -> None:
        self._advance(now, in_flight, beside)
        self._decide(now, saturated=waiting and in_flight >= self.limit)

    def reset(self, now: float) -> None:
        """The backend restarted: what was learned is about a process that is gone."""
        self._advance(now, self._in_flight, self._beside)
        self.limit, self.probing, self._fresh, self.warming = 1, False, False, True
        self.measures.clear()
        self._samples.clear()
        self._company.clear()
        self._blocked_until.clear()
        self._ratios.clear()
        self._new_cohort()
        self._epoch += 1

    # --- estimates ----------------------------------------------------------------------------

    def throughput(self, level: int) -> float | None:
        """Solo-seconds of work completed per second at ``level`` in flight; None until measured."""
        measure = self.measures.get(level)
        return measure.throughput if measure is not None else None

    def stretch(self, level: int) -> float | None:
        """How many times its solo time a request takes at ``level`` in flight; None until measured."""
        measure = self.measures.get(level)
        return measure.stretch if measure is not None else None

    def slowdown(self) -> tuple[float, ...]:
        """How many times its time alone a request takes at 1, 2, ... in flight, up to
        ``max_slots`` + 1 (a class's extra slot may go one past): the median stretch of recent
        requests that ran with that many in flight in all (``samples`` of them at least) over that
        of requests that ran alone. Until requests alone were seen that often, from the levels'
        measures (whose requests may have had an express request beside them: a slowdown that
        comes out low). Past the last measured level ``m``, its slowdown times ``k / m`` (no
        more gain than measured: processor sharing without any gain when nothing is)."""
        key = (self._epoch, self._company_added, tuple(self.measures.items()))
        if self._curve is not None and self._curve[0] == key:
            return self._curve[1]
        overhead = self.overhead_s()
        enough = {level: statistics.median(self._stretch(work, took, overhead) for work, took in seen)
                  for level, seen in self._company.items() if len(seen) >= self.settings.samples}
        stretch = enough.get if 1 in enough else self.stretch
        one = stretch(1)
        curve = [1.0]
        last_level, last = 1, 1.0
        for level in range(2, self.settings.max_slots + 2):
            at = stretch(level)
            if one and at is not None:
                last_level, last = level, max(1.0, at / one)
                curve.append(last)
            else:
                curve.append(last * level / last_level)
        self._curve = (key, tuple(curve))
        return self._curve[1]

    def overhead_s(self) -> float:
        """Seconds of every request's time that do not stretch with company (the HTTP exchange,
        parsing, sending the answer): the intercept of seconds taken against solo estimate over
        recent requests that ran alone (a least-squares line), at most half the quickest of them.
        0 until ``samples`` of them were seen, differing in size by OVERHEAD_SPREAD. Left in, it
        makes a short request's stretch grow less than its share of the backend shrinks: a flat
        curve looks like a gain, and every slowdown looks smaller than it is."""
        alone = self._company.get(1)
        if alone is None or len(alone) < self.settings.samples:
            return 0.0
        works = [work for work, _ in alone]
        if max(works) < OVERHEAD_SPREAD * min(works):
            return 0.0
        tooks = [took for _, took in alone]
        mean_work, mean_took = statistics.fmean(works), statistics.fmean(tooks)
        spread = sum((work - mean_work) ** 2 for work in works)
        slope = sum((work - mean_work) * (took - mean_took) for work, took in alone) / spread
        return min(max(0.0, mean_took - slope * mean_work), 0.5 * min(tooks))

    @staticmethod
    def _stretch(work_s: float, took_s: float, overhead_s: float) -> float:
        """Time taken over solo estimate, the fixed overhead taken out (never more than half)."""
        return max(took_s - overhead_s, 0.5 * took_s) / work_s

    def fits(self, stretch: float) -> bool:
        """Whether requests slowed down ``stretch`` times still fit their deadline budgets."""
        if not self._ratios:
            return True
        ordered = sorted(self._ratios)
        return ordered[math.floor(BUDGET_QUANTILE * (len(ordered) - 1))] * stretch <= self.settings.latency_headroom

    def describe(self) -> dict[str, Any]:
        levels = {str(k): {"samples": m.samples, "throughput": round(m.throughput, 3), "stretch": round(m.stretch, 3),
                           "in_time": round(m.in_time, 3)}
                  for k, m in sorted(self.measures.items())}
        return {"mode": self.mode, "slots": self.limit, "max_slots": self.settings.max_slots,
                "probing": self.probing, "levels": levels, "slowdown": [round(x, 3) for x in self.slowdown()],
                "overhead_s": round(self.overhead_s(), 4)}

    # --- the rule -----------------------------------------------------------------------------

    def _close_cohort(self, now: float) -> None:
        """Once every member of the cohort has finished, measure the limit's level with it."""
        if self._cohort_open or any(job in self._runs for job in self._cohort):
            return
        cohort = [sample for sample in self._cohort.values() if sample is not None]
        self._new_cohort()
        if len(cohort) < max(2, self.settings.samples // 2):
            return  # mostly not at the limit (not saturated), or failures: nothing to judge
        if self.warming:
            self.warming = False
            return
        # A level that stays the limit is measured over its last few cohorts: a steadier baseline.
        pooled = self._samples.setdefault(self.limit, deque(maxlen=POOLED_COHORTS * self.settings.samples))
        pooled.extend(cohort)
        samples = list(pooled)
        overhead = self.overhead_s()
        stretches = [self._stretch(work, took, overhead) for _, work, took, _ in samples]
        values = [level / stretch for (level, *_), stretch in zip(samples, stretches, strict=True)]
        median = statistics.median(values)
        spread = MAD_TO_SD * statistics.median(abs(v - median) for v in values)
        self.measures[self.limit] = Measure(
            throughput=median, spread=spread / median,
            in_time=sum(1 for *_, late in samples if not late) / len(samples),
            stretch=statistics.median(stretches), samples=len(samples), at=now)
        self._fresh = True
        self._decide(now, saturated=False)

    def _decide(self, now: float, *, saturated: bool) -> None:
        s, top = self.settings, self.limit
        current = self.measures.get(top)
        if not self._fresh or current is None:
            return
        below = self.measures.get(top - 1)
        if self.probing:
            # A sequential test, one cohort at a time. Kept as soon as the gain holds even two
            # standard errors short of what was measured; dropped as soon as it misses the bar even
            # two standard errors above. In between (noisy service times) the probe goes on, its
            # cohorts pooled; after PROBE_COHORTS of them it is kept if the gain holds one standard
            # error short of what was measured.
            if below is None or not self.fits(current.stretch):
                self._step(now, -1)
                return
            margin = self._margin(current, below)
            bar = below.goodput * (1 + s.min_gain)
            if current.goodput * (1 - margin) >= bar:
                self.probing = False
            elif current.goodput * (1 + margin) < bar:
                self._step(now, -1)
            elif current.samples >= PROBE_COHORTS * s.samples:
                if current.goodput * (1 - margin / CONFIDENCE) >= bar:  # one standard error short
                    self.probing = False
                else:
                    self._step(now, -1)
            return
        # Conditions changed: this level no longer pays. It does not beat the level below, or it
        # clearly misses the bar it had to clear to be kept (two standard errors above).
        if below is not None and (current.goodput < below.goodput or not self.fits(current.stretch)
                                  or current.goodput * (1 + self._margin(current, below))
                                  < below.goodput * (1 + s.min_gain)):
            self._step(now, -1)
            return
        # Probed past only once measured over a whole cohort's worth of requests (a cohort may
        # close with half), and only while its requests fit (none is faster with more in flight).
        if saturated and top < s.max_slots and now >= self._blocked_until.get(top + 1, -math.inf) \
                and current.samples >= s.samples and self.fits(current.stretch):
            self._step(now, +1)

    @staticmethod
    def _margin(current: Measure, below: Measure) -> float:
        """Two standard errors of the ratio of two levels' measures, relative. Both levels' noise
        is mostly that of the solo-time estimates: the larger spread counts for both, so a cohort
        that happens to agree with itself does not look precise."""
        spread = max(current.spread, below.spread)
        return CONFIDENCE * MEDIAN_SE * spread * math.sqrt(1 / current.samples + 1 / below.samples)

    def _step(self, now: float, by: int) -> None:
        if by < 0:
            self._blocked_until[self.limit] = now + self.settings.reprobe_s
        self.limit += by
        self.probing = by > 0
        if self.probing:
            self._samples.pop(self.limit, None)  # judged on its own fresh cohort, not on old ones
        self._fresh = False
        self._new_cohort()

    def _new_cohort(self) -> None:
        for job in self._cohort:
            run = self._runs.get(job)
            if run is not None:
                run.cohort = False
        self._cohort = {}
        self._cohort_open = True

    def _advance(self, now: float, in_flight: int, beside: int = 0) -> None:
        if now > self._last:
            self._area += self._in_flight * (now - self._last)
            self._area_all += (self._in_flight + self._beside) * (now - self._last)
            self._last = now
        self._in_flight, self._beside = in_flight, beside


@dataclass(frozen=True, kw_only=True)
class SlotPolicy:
    """What ``backends.slots`` says: a fixed number, or None for adaptive."""

    fixed: int | None = 1
    adaptive: AdaptiveSettings = field(default_factory=AdaptiveSettings)

    @property
    def mode(self) -> str:
        return "fixed" if self.fixed is not None else "auto"

    def new_limit(self, now: float) -> SlotLimit:
        if self.fixed is not None:
            return FixedLimit(self.fixed)
        return AdaptiveLimit(self.adaptive, now=now)
