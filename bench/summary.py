"""What one load-generator run achieved, in work: goodput, SLO attainment, latency, fairness, outcomes.

Pure functions over `bench.loadgen.Record`s; no I/O.

- **Work** of a request: the seconds one backend needs for it alone, by the service model's mean
  (the caller passes `work_s(units)`). A long text is worth many short ones, so goodput in work
  cannot be raised by serving only the cheap requests.
- **Goodput**: the work of requests answered 200 with ``success: true`` *within their SLO* and
  *completed inside the arrival window*, per backend-second of that window (work / (backends x
  window)). Counting by completion keeps the backlog a system may still hold when arrivals stop
  from inflating it.
- **In SLO** of a length class: requests answered OK within their SLO (whenever that was) out of
  the requests offered; a refusal, a 408, a late answer or none at all is a miss.
- **Fairness**: Jain's index over the tenants of x_i = goodput_i / fair_i, where fair_i is the
  (weighted) max-min fair share of the total work goodput given the work each tenant offered
  (a tenant asking for less than an equal split gets all it asks; the rest is split among the
  others). 1.0 means every tenant got exactly its fair share; 1/n means one tenant got everything.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.loadgen import Record, outcome_counts

# Length classes by characters, as upstream's and the seed's thresholds count them.
CLASSES = ("short", "medium", "long")
SHORT_MAX_CHARS, MEDIUM_MAX_CHARS = 50, 200


def length_class(chars: int) -> str:
    return "short" if chars <= SHORT_MAX_CHARS else "medium" if chars <= MEDIUM_MAX_CHARS else "long"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between order statistics; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def max_min_fair(capacity: float, demands: Mapping[str, float],
                 weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Weighted max-min fair allocation of `capacity` among demand-capped claimants (water filling).

    A claimant whose demand is below its weighted share of what is left gets its demand; what
    it leaves is shared among the rest in proportion to their weights.
    """
    weight = {name: (weights or {}).get(name, 1.0) for name in demands}
    fair = {name: 0.0 for name in demands}
    active = {name for name, demand in demands.items() if demand > 0}
    left = capacity
    while active and left > 1e-12:
        per_weight = left / sum(weight[name] for name in active)
        capped = {name for name in active if demands[name] <= weight[name] * per_weight}
        if not capped:
            for name in active:
                fair[name] = weight[name] * per_weight
            break
        for name in capped:
            fair[name] = demands[name]
            left -= demands[name]
        active -= capped
    return fair


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all equal, 1/n when one has all."""
    squares = sum(x * x for x in values)
    if not values or squares == 0:
        return None
    return sum(values) ** 2 / (len(values) * squares)


# Why a request did not succeed, as the report groups them (see `failure_kind`).
FAILURE_KINDS = ("429 queue full", "429 unmeetable", "503", "408", "backend error", "no answer", "other")
QUEUE_FULL_REASONS = frozenset({"queue_full", "tenant_queue_full"})
REFUSED_KINDS = frozenset({"429 queue full", "429 unmeetable", "503"})  # turned away before any work
LATE_KINDS = frozenset({"408", "no answer"})  # a deadline passed, or no answer came at all


def failure_kind(record: Record) -> str | None:
    """None for a success; else the sidecar's admission reason by status and body `reason` (429
    queue or tenant share full / 429 deadline unmeetable / 503 no backend or draining), 408 (a
    deadline passed, the sidecar's or the backend's own), a backend error (5xx other than 503, or
    200 with `success: false`), no answer before the generator's cap, or other."""
    if record.ok:
        return None
    if record.status is None:
        return "no answer"
    if record.status == 429:
        return "429 queue full" if record.reason in QUEUE_FULL_REASONS else \
            "429 unmeetable" if record.reason == "deadline_unmeetable" else "other"
    if record.status == 503:
        return "503"
    if record.status == 408:
        return "408"
    if record.status == 200 or record.status >= 500:
        return "backend error"
    return "other"


@dataclass(frozen=True, kw_only=True)
class TenantShare:
    """One tenant's offered work, work goodput and max-min fair share, work-seconds per second."""

    offered: float
    goodput: float
    fair: float


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """One (arm, load) point of a benchmark. Work is in solo service seconds (see the module doc)."""

    config: str
    load: float  # the offered load it was asked for, a multiple of the pool's capacity (nominal)
    backends: int
    duration_s: float
    requests: int
    offered_work_s: float  # work of every arrival in the trace
    goodput: float  # work served OK within SLO inside the window, per backend-second
    class_goodput: dict[str, float]  # the same by length class (they sum to goodput)
    class_requests: dict[str, int]  # class -> requests offered
    class_in_slo: dict[str, int]  # class -> requests answered OK within their SLO (at any time)
    in_slo_pct: dict[str, float | None]  # class -> class_in_slo / class_requests, %; None when none offered
    refused: int  # requests turned away (429, 503)
    late: int  # requests answered OK after their SLO, answered 408, or not answered at all
    refused_late_work_pct: float  # work of those two, % of the offered work
    latency_s: dict[str, tuple[float | None, float | None]]  # class -> (p50, p99) of 200 answers
    jain: float | None
    tenants: dict[str, TenantShare]
    outcomes: dict[str, int]  # "200 ok", "429 queue_full", "408 deadline", "timeout", ...
    failures: dict[str, int] = field(default_factory=dict)  # failure_kind -> requests
    orphaned_backend_s: float | None = None  # backend time spent on requests already answered or gone
    max_send_lag_s: float = 0.0  # how late the generator sent its latest request (open-loop health)

    @property
    def offered(self) -> float:
        """Offered work per backend-second: the measured load, in goodput's unit."""
        return self.offered_work_s / (self.backends * self.duration_s)

    @property
    def refused_late(self) -> int:
        return self.refused + self.late


def summarize(records: Sequence[Record], *, config: str, load: float, backends: int, duration_s: float,
              slo_s: Callable[[int], float], work_s: Callable[[float], float], weights: Mapping[str, float],
              orphaned_backend_s: float | None = None) -> RunSummary:
    """Work goodput overall and per class, SLO attainment per class, refused and late requests,
    per-class p50/p99 of 200 answers, Jain's index of per-tenant work goodput over max-min fair
    shares of the offered work, outcome counts. `work_s(units)`: a request's solo service seconds."""
    work = [work_s(r.units) for r in records]
    in_slo = [r.ok and r.latency_s <= slo_s(r.chars) for r in records]
    good = [ok and r.intended_s + r.latency_s <= duration_s for r, ok in zip(records, in_slo, strict=True)]
    kinds = [failure_kind(r) for r in records]
    refused = [kind in REFUSED_KINDS for kind in kinds]
    late = [kind in LATE_KINDS or (r.ok and not ok) for r, kind, ok in zip(records, kinds, in_slo, strict=True)]
    classes = [length_class(r.chars) for r in records]
    backend_s = backends * duration_s

    def total(selected: Sequence[bool], cls: str | None = None, tenant: str | None = None) -> float:
        return sum(w for w, s, c, r in zip(work, selected, classes, records, strict=True)
                   if s and (cls is None or c == cls) and (tenant is None or r.tenant == tenant))

    everything = [True] * len(records)
    offered = {name: total(everything, tenant=name) / duration_s for name in weights}
    served = {name: total(good, tenant=name) / duration_s for name in weights}
    fair = max_min_fair(sum(served.values()), offered, weights)
    ratios = [served[name] / fair[name] for name in weights if fair[name] > 0]
    class_requests = {cls: classes.count(cls) for cls in CLASSES}
    class_in_slo = {cls: sum(1 for c, ok in zip(classes, in_slo, strict=True) if ok and c == cls) for cls in CLASSES}
    latency: dict[str, tuple[float | None, float | None]] = {}
    for cls in CLASSES:
        answered = [r.latency_s for r, c in zip(records, classes, strict=True) if r.ok and c == cls]
        latency[cls] = (percentile(answered, 50), percentile(answered, 99))
    offered_work = sum(work)
    missed = [a or b for a, b in zip(refused, late, strict=True)]
    return RunSummary(
        config=config, load=load, backends=backends, duration_s=duration_s, requests=len(records),
        offered_work_s=offered_work, goodput=total(good) / backend_s,
        class_goodput={cls: total(good, cls) / backend_s for cls in CLASSES},
        class_requests=class_requests, class_in_slo=class_in_slo,
        in_slo_pct={cls: 100.0 * class_in_slo[cls] / n if (n := class_requests[cls]) else None for cls in CLASSES},
        refused=sum(refused), late=sum(late),
        refused_late_work_pct=100.0 * total(missed) / offered_work if offered_work else 0.0,
        latency_s=latency, jain=jain_index(ratios),
        tenants={name: TenantShare(offered=offered[name], goodput=served[name], fair=fair[name]) for name in weights},
        outcomes=outcome_counts(records),
        failures=dict(Counter(kind for kind in kinds if kind is not None)),
        orphaned_backend_s=orphaned_backend_s,
        max_send_lag_s=max((r.send_lag_s for r in records), default=0.0),
    )
