"""The waiting room: jobs admitted but not yet given to a backend.

Pure: no asyncio, no I/O; time is passed in. Two policies behind one interface, picked by name:

- ``fifo``: one first-come-first-served line (the seed's proposal).
- ``fair``: strict priority bands (0 = highest) with an aging guard -- a job that has waited
  ``band_aging_s`` counts as one band higher, two bands after twice that, and so on -- then,
  inside a band, start-time fair queueing across tenants by predicted cost: each tenant has a
  virtual finish tag, the backlogged tenant with the smallest tag goes next and is charged
  ``predicted_s / weight``; a tenant that comes back from idle starts at the band's virtual time,
  so idleness banks no credit. Inside a tenant: FIFO, or shortest predicted first where a job
  that has waited ``aging_s`` goes ahead of every younger one.

A *continuation* (``Job.continues``: a later piece of a fanned-out request whose first pieces
started) goes before every other job of its effective band, in arrival order, so what was
started is finished first (under ``fifo``: before the whole line). It is charged to its tenant
like any job, but it does not move the band's virtual time: it left the fair order, and moving
the band's clock would take their places from the other tenants.

``candidates(now)`` lists jobs best first; the caller dispatches one with ``take`` (which charges
the tenant and advances virtual time) and asks again.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

ModelKey = tuple[int, bool]  # (sample_rate, use_phoneme): what a backend must have loaded


class QueueFullError(Exception):
    """No room: ``scope`` is "queue" (the total bound) or "tenant" (the tenant's bound)."""

    def __init__(self, scope: str, size: int, bound: int) -> None:
        super().__init__(f"{scope} queue is full ({size} of {bound} waiting)")
        self.scope = scope
        self.size = size
        self.bound = bound


@dataclass(eq=False, kw_only=True)
class Job:
    """One admitted TTS request, as the scheduler sees it."""

    id: str
    chars: int  # len(input_text), upstream's length measure
    units: float  # glmtts.text cost units
    model_key: ModelKey
    arrived_at: float  # monotonic seconds
    deadline_at: float = float("inf")
    tenant: str = "default"
    weight: float = 1.0  # the tenant's weight
    band: int = 0  # priority band, 0 = highest
    cls: str = ""  # length class name
    predicted_s: float = 0.0  # predicted service seconds (mean)
    p95_s: float = 0.0  # predicted service seconds, 95th percentile
    tenant_bound: int | None = None  # the tenant's own bound on waiting jobs
    parent: str | None = None  # a piece of a fanned-out request: that request's id
    continues: bool = False  # a piece of a request already started: goes first in its band
    seq: int = field(default=0, compare=False)  # arrival order, set by the queue


class Order(Enum):
    FIFO = "fifo"  # one line, first come first served
    FAIR = "fair"  # priority bands, then weighted fair queueing across tenants


class WithinTenant(Enum):
    FIFO = "fifo"  # arrival order
    SHORTEST_FIRST = "shortest_first"  # shortest predicted first, with aging


class JobQueue(Protocol):
    """A bounded queue policy. Called by the scheduler only, from one thread."""

    max_size: int
    max_per_tenant: int | None

    def __len__(self) -> int: ...

    def jobs(self) -> Iterator[Job]:
        """Every waiting job, in no particular order."""
        ...

    def tenant_depth(self, tenant: str) -> int: ...

    def check(self, job: Job) -> None:
        """Raises QueueFullError when ``push(job)`` would (a bound is reached); changes nothing."""
        ...

    def push(self, job: Job, now: float, *, force: bool = False) -> None:
        """Add a job; raises QueueFullError when the total or the tenant's bound is reached.

        ``force``: a job coming back after its backend failed; it skips the bounds and keeps its
        place in line."""
        ...

    def remove(self, job_id: str) -> Job | None:
        """Take a job out without serving it (client gone, deadline passed)."""
        ...

    def candidates(self, now: float) -> Iterator[Job]:
        """Waiting jobs, best first. Invalid once the queue changes."""
        ...

    def take(self, job: Job, now: float) -> None:
        """The job was dispatched: remove it and charge its tenant."""
        ...

    def copy(self) -> JobQueue:
        """An independent queue in the same state: what the scheduler's forecasts run on."""
        ...


class _Bounded:
    def __init__(self, max_size: int, max_per_tenant: int | None = None) -> None:
        self.max_size = max_size
        self.max_per_tenant = max_per_tenant
        self._jobs: dict[str, Job] = {}
        self._per_tenant: dict[str, int] = {}
        self._next_seq = 1  # the seq of the next new job; 0 marks a job never queued

    def __len__(self) -> int:
        return len(self._jobs)

    def jobs(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def tenant_depth(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def check(self, job: Job) -> None:
        if len(self._jobs) >= self.max_size:
            raise QueueFullError("queue", len(self._jobs), self.max_size)
        bound = job.tenant_bound if job.tenant_bound is not None else self.max_per_tenant
        depth = self.tenant_depth(job.tenant)
        if bound is not None and depth >= bound:
            raise QueueFullError("tenant", depth, bound)

    def _admit(self, job: Job, force: bool = False) -> None:
        if force:  # a job coming back (its backend failed) or moved over on a reload: no bound
            if job.seq:  # it keeps its place; later arrivals still come after it
                self._next_seq = max(self._next_seq, job.seq + 1)
            else:
                job.seq = self._new_seq()
        else:
            self.check(job)
            job.seq = self._new_seq()
        self._jobs[job.id] = job
        self._per_tenant[job.tenant] = self.tenant_depth(job.tenant) + 1

    def _new_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq - 1

    def remove(self, job_id: str) -> Job | None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            left = self._per_tenant[job.tenant] - 1
            if left:
                self._per_tenant[job.tenant] = left
            else:
                del self._per_tenant[job.tenant]
        return job

    def _copy_into(self, other: _Bounded) -> None:
        other._jobs = dict(self._jobs)
        other._per_tenant = dict(self._per_tenant)
        other._next_seq = self._next_seq  # the copy numbers new jobs as this queue would


class FifoQueue(_Bounded):
    def __init__(self, max_size: int, max_per_tenant: int | None = None) -> None:
        super().__init__(max_size, max_per_tenant)
        self._line: list[Job] = []  # by seq
        self._continuations: list[Job] = []  # by seq; before the whole line

    def _place(self, job: Job) -> list[Job]:
        return self._continuations if job.continues else self._line

    def push(self, job: Job, now: float, *, force: bool = False) -> None:
        self._admit(job, force)
        bisect.insort(self._place(job), job, key=_seq)

    def remove(self, job_id: str) -> Job | None:
        job = super().remove(job_id)
        if job is not None:
            line = self._place(job)
            at = bisect.bisect_left(line, job.seq, key=_seq)
            del line[at if at < len(line) and line[at] is job else line.index(job)]
        return job

    def candidates(self, now: float) -> Iterator[Job]:
        return itertools.chain(self._continuations, self._line)

    def take(self, job: Job, now: float) -> None:
        self.remove(job.id)

    def copy(self) -> FifoQueue:
        other = FifoQueue(self.max_size, self.max_per_tenant)
        self._copy_into(other)
        other._line = list(self._line)
        other._continuations = list(self._continuations)
        return other


class FairQueue(_Bounded):
    def __init__(self, max_size: int, max_per_tenant: int | None = None, *,
                 within_tenant: WithinTenant = WithinTenant.FIFO, aging_s: float = 30.0,
                 band_aging_s: float = 60.0) -> None:
        super().__init__(max_size, max_per_tenant)
        self.within_tenant = within_tenant
        self.aging_s = aging_s
        self.band_aging_s = band_aging_s
        self._virtual: dict[int, float] = {}  # band -> virtual time
        self._finish: dict[tuple[int, str], float] = {}  # (band, tenant) -> virtual finish tag
        # What candidates() walks: group (``_group``: effective band, continuation or not) ->
        # tenant -> its jobs in their order, kept up to date by push/remove/take for as long as no
        # job ages into another band or rank (``_span``); rebuilt after. None: to be built.
        self._groups: dict[int, dict[str, list[Job]]] | None = None
        self._band_of: dict[str, int] = {}  # job id -> its group in _groups
        self._span = (math.inf, -math.inf)  # [from, until): when _groups holds
        self._oldest: dict[tuple[int, str], list[int]] = {}  # (group, tenant): shortest_first tie-breaks, lazily

    def push(self, job: Job, now: float, *, force: bool = False) -> None:
        self._admit(job, force)
        if self._groups is None:
            return
        until = _before(self._next_change([job], now))
        if not self._span[0] <= now < min(self._span[1], until):
            self._groups = None
            return
        group = self._group(job, now)
        rank = _by_seq if job.continues else self._rank(now)
        bisect.insort(self._groups.setdefault(group, {}).setdefault(job.tenant, []), job, key=rank)
        self._band_of[job.id] = group
        self._oldest.pop((group, job.tenant), None)
        self._span = (now, min(self._span[1], until))  # times before the push are not asked for again

    def remove(self, job_id: str) -> Job | None:
        job = super().remove(job_id)
        if job is not None and self._groups is not None:
            group = self._band_of.pop(job.id)
            tenants = self._groups[group]
            jobs = tenants[job.tenant]
            jobs.remove(job)  # Job compares by identity
            self._oldest.pop((group, job.tenant), None)
            if not jobs:
                del tenants[job.tenant]
                if not tenants:
                    del self._groups[group]
        return job

    def effective_band(self, job: Job, now: float) -> int:
        """The job's band after aging: one band higher per ``band_aging_s`` waited."""
        promoted = int(max(0.0, now - job.arrived_at) // self.band_aging_s)
        return max(0, job.band - promoted)

    def _group(self, job: Job, now: float) -> int:
        """Where ``candidates`` lists the job: its effective band's continuations (``2 * band``)
        before that band's other jobs (``2 * band + 1``), before the next band's."""
        return 2 * self.effective_band(job, now) + (0 if job.continues else 1)

    def aged(self, job: Job, now: float) -> bool:
        """Shortest-first aging: a job that has waited ``aging_s`` goes ahead of shorter ones."""
        return now - job.arrived_at >= self.aging_s

    def _tag(self, band: int, tenant: str) -> float:
        # A tenant returning from idle starts at the band's virtual time: no banked credit.
        return max(self._finish.get((band, tenant), 0.0), self._virtual.get(band, 0.0))

    def _rank(self, now: float) -> Callable[[Job], tuple[int, float, int]]:
        """A job's place among its tenant's jobs of one band."""
        if self.within_tenant is WithinTenant.FIFO:
            return lambda job: (0, 0.0, job.seq)

        def rank(job: Job) -> tuple[int, float, int]:
            if self.aged(job, now):
                return (0, 0.0, job.seq)  # aged: ahead of every younger job, in arrival order
            return (1, job.predicted_s, job.seq)

        return rank

    def _next_change(self, jobs: Iterable[Job], now: float) -> float:
        """The earliest time after ``now`` at which one of ``jobs`` moves up a band or, under
        shortest_first, ages ahead of shorter jobs; infinity if none will."""
        soonest = math.inf
        for job in jobs:
            if self.effective_band(job, now) > 0:
                waited = max(0.0, now - job.arrived_at)
                soonest = min(soonest, job.arrived_at + (waited // self.band_aging_s + 1) * self.band_aging_s)
            if self.within_tenant is WithinTenant.SHORTEST_FIRST and not self.aged(job, now):
                soonest = min(soonest, job.arrived_at + self.aging_s)
        return soonest

    def _build(self, now: float) -> dict[int, dict[str, list[Job]]]:
        groups: dict[int, dict[str, list[Job]]] = {}
        self._band_of = {}
        for job in self._jobs.values():
            group = self._band_of[job.id] = self._group(job, now)
            groups.setdefault(group, {}).setdefault(job.tenant, []).append(job)
        rank = self._rank(now)
        for group, tenants in groups.items():
            for jobs in tenants.values():
                jobs.sort(key=rank if group % 2 else _by_seq)
        self._groups, self._oldest = groups, {}
        self._span = (now, _before(self._next_change(self._jobs.values(), now)))
        return groups

    def _oldest_from(self, group: int, tenant: str) -> list[int]:
        """``out[i]``: the smallest seq among the tenant's jobs of the group from its ``i``-th on."""
        cached = self._oldest.get((group, tenant))
        if cached is None:
            assert self._groups is not None
            cached = self._oldest[(group, tenant)] = _suffix_min_seq(self._groups[group][tenant])
        return cached

    def candidates(self, now: float) -> Iterator[Job]:
        groups = self._groups
        if groups is None or not self._span[0] <= now < self._span[1]:
            groups = self._build(now)
        for band in sorted({group // 2 for group in groups}):
            charged: dict[str, float] = {}  # tags after the band's continuations are charged
            if 2 * band in groups:
                yield from self._continuations(band, groups[2 * band], charged)
            if 2 * band + 1 in groups:
                yield from self._band_order(band, groups[2 * band + 1], charged)

    def _continuations(self, band: int, tenants: dict[str, list[Job]], charged: dict[str, float]) -> Iterator[Job]:
        """The band's continuations in arrival order, each charged to ``charged`` as ``take`` would."""
        for job in heapq.merge(*tenants.values(), key=_seq):
            yield job
            start = charged[job.tenant] if job.tenant in charged else self._tag(band, job.tenant)
            charged[job.tenant] = start + job.predicted_s / job.weight

    def _band_order(self, band: int, tenants: dict[str, list[Job]], charged: dict[str, float]) -> Iterator[Job]:
        # Visit tenants by virtual tag, simulating charges so later candidates follow the order
        # dispatching them one by one would give.
        group = 2 * band + 1
        tags = {t: charged[t] if t in charged else self._tag(band, t) for t in tenants}
        positions = dict.fromkeys(tenants, 0)

        def first(tenant: str) -> tuple[float, int]:
            """Ties go as take() would see them: to the tenant whose oldest remaining job is oldest
            (under FIFO its next one)."""
            if self.within_tenant is WithinTenant.FIFO:
                return tags[tenant], tenants[tenant][positions[tenant]].seq
            return tags[tenant], self._oldest_from(group, tenant)[positions[tenant]]

        while tags:
            tenant = next(iter(tags)) if len(tags) == 1 else min(tags, key=first)
            jobs = tenants[tenant]
            job = jobs[positions[tenant]]
            yield job
            positions[tenant] += 1
            if positions[tenant] == len(jobs):
                del tags[tenant]
            else:
                tags[tenant] += job.predicted_s / job.weight

    def take(self, job: Job, now: float) -> None:
        band = self.effective_band(job, now)
        start = self._tag(band, job.tenant)
        if not job.continues:  # a continuation went out of the fair order: the band's clock stays
            self._virtual[band] = max(self._virtual.get(band, 0.0), start)
        self._finish[(band, job.tenant)] = start + job.predicted_s / job.weight
        self.remove(job.id)

    def copy(self) -> FairQueue:
        other = FairQueue(self.max_size, self.max_per_tenant, within_tenant=self.within_tenant,
                          aging_s=self.aging_s, band_aging_s=self.band_aging_s)
        self._copy_into(other)
        other._virtual = dict(self._virtual)
        other._finish = dict(self._finish)
        if self._groups is not None:
            other._groups = {band: {t: list(jobs) for t, jobs in tenants.items()}
                             for band, tenants in self._groups.items()}
            other._band_of = dict(self._band_of)
            other._span = self._span
        return other


def _seq(job: Job) -> int:
    return job.seq


def _by_seq(job: Job) -> tuple[int, float, int]:
    """A continuation's rank among its tenant's: arrival order (the shape of ``FairQueue._rank``)."""
    return (0, 0.0, job.seq)


def _suffix_min_seq(jobs: Sequence[Job]) -> list[int]:
    """``out[i]`` is the smallest ``seq`` among ``jobs[i:]``."""
    out = [job.seq for job in jobs]
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def _before(at: float) -> float:
    """A little before ``at``: a span must end before floating-point rounding could let a job age early."""
    return at if math.isinf(at) else at - 1e-9 * max(1.0, abs(at))


def make_queue(order: str, *, max_size: int, max_per_tenant: int | None = None, within_tenant: str = "fifo",
               aging_s: float = 30.0, band_aging_s: float = 60.0) -> JobQueue:
    """The queue policy named in the configuration."""
    kind = Order(order)
    if kind is Order.FIFO:
        return FifoQueue(max_size, max_per_tenant)
    return FairQueue(max_size, max_per_tenant, within_tenant=WithinTenant(within_tenant), aging_s=aging_s,
                     band_aging_s=band_aging_s)
