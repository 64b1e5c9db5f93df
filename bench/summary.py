"""What one load-generator run achieved: goodput, latency percentiles, fairness, outcomes.

Pure functions over `bench.loadgen.Record`s; no I/O.

- **Goodput**: requests answered 200 with ``success: true`` *within their SLO* (the deadline tier
  of their length) and *completed inside the arrival window*, per second of that window. Counting
  by completion keeps the backlog a system may still hold when arrivals stop (up to a deadline's
  worth of work) from inflating the rate: a server cannot complete more than its capacity.
- **Fairness**: Jain's index over the tenants of x_i = goodput_i / fair_i, where fair_i is the
  (weighted) max-min fair share of the measured total goodput given each tenant's offered rate
  (a tenant asking for less than an equal split gets all it asks; the rest is split among the
  others). 1.0 means every tenant got exactly its fair share; 1/n means one tenant got everything.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.loadgen import Record, outcome_counts


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
    """One tenant's offered rate, goodput and max-min fair share, requests per second."""

    offered_rps: float
    goodput_rps: float
    fair_rps: float


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """One (configuration, load) point of a benchmark."""

    config: str
    load: float  # offered load as a multiple of pool capacity (nominal)
    capacity_rps: float
    duration_s: float
    requests: int
    offered_rps: float  # arrivals actually in the trace / duration
    goodput_rps: float
    latency_s: dict[str, tuple[float | None, float | None]]  # class -> (p50, p99) of 200 answers
    answered: dict[str, int]  # class -> requests answered 200 + success (any latency)
    class_requests: dict[str, int]  # class -> requests offered
    class_good: dict[str, int]  # class -> requests answered OK within their SLO
    jain: float | None
    tenants: dict[str, TenantShare]
    outcomes: dict[str, int]  # "200 ok", "429 queue_full", "408 deadline", "timeout", ...
    orphaned_backend_s: float | None  # from the sidecar's /api/v1/queue, when it reports it
    max_send_lag_s: float  # how late the generator sent its latest request (open-loop health)
    failures: dict[str, int] = field(default_factory=dict)  # failure_kind -> requests

    @property
    def short_p99_s(self) -> float | None:
        return self.latency_s["short"][1]

    @property
    def goodput_pct(self) -> float:
        return 100.0 * self.goodput_rps / self.capacity_rps

    @property
    def rejections(self) -> dict[str, int]:
        return {label: n for label, n in self.outcomes.items() if label != "200 ok"}


def summarize(records: Sequence[Record], *, config: str, load: float, capacity_rps: float, duration_s: float,
              slo_s: Callable[[int], float], weights: Mapping[str, float],
              classes: Sequence[str] = ("short", "medium", "long"),
              orphaned_backend_s: float | None = None) -> RunSummary:
    """Goodput (200 + success within `slo_s(chars)`), per-class p50/p99 of 200 answers, Jain's
    index of per-tenant goodput over max-min fair shares of the total goodput, outcome counts."""
    good = [r for r in records
            if r.ok and r.latency_s <= slo_s(r.chars) and r.intended_s + r.latency_s <= duration_s]
    offered = {name: sum(1 for r in records if r.tenant == name) / duration_s for name in weights}
    goodput = {name: sum(1 for r in good if r.tenant == name) / duration_s for name in weights}
    fair = max_min_fair(sum(goodput.values()), offered, weights)
    ratios = [goodput[name] / fair[name] for name in weights if fair[name] > 0]
    latency: dict[str, tuple[float | None, float | None]] = {}
    answered: dict[str, int] = {}
    class_requests = {cls: sum(1 for r in records if r.cls == cls) for cls in classes}
    class_good = {cls: sum(1 for r in good if r.cls == cls) for cls in classes}
    for cls in classes:
        served = [r.latency_s for r in records if r.ok and r.cls == cls]
        latency[cls] = (percentile(served, 50), percentile(served, 99))
        answered[cls] = len(served)
    return RunSummary(
        config=config, load=load, capacity_rps=capacity_rps, duration_s=duration_s, requests=len(records),
        offered_rps=len(records) / duration_s, goodput_rps=len(good) / duration_s, latency_s=latency,
        answered=answered, class_requests=class_requests, class_good=class_good, jain=jain_index(ratios),
        tenants={name: TenantShare(offered_rps=offered[name], goodput_rps=goodput[name], fair_rps=fair[name])
                 for name in weights},
        outcomes=outcome_counts(records), orphaned_backend_s=orphaned_backend_s,
        max_send_lag_s=max((r.send_lag_s for r in records), default=0.0),
        failures=dict(Counter(kind for r in records if (kind := failure_kind(r)) is not None)),
    )
