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

``candidates(now)`` lists jobs best first; the caller dispatches one with ``take`` (which charges
the tenant and advances virtual time) and asks again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
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


class _Bounded:
    def __init__(self, max_size: int, max_per_tenant: int | None = None) -> None:
        self.max_size = max_size
        self.max_per_tenant = max_per_tenant
        self._jobs: dict[str, Job] = {}
        self._per_tenant: dict[str, int] = {}
        self._seq = itertools.count(1)  # 0 marks a job never queued

    def __len__(self) -> int:
        return len(self._jobs)

    def jobs(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def tenant_depth(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def _admit(self, job: Job, force: bool = False) -> None:
        if force:  # a job coming back (its backend failed) or moved over on a reload: no bound
            if job.seq:  # it keeps its place; later arrivals still come after it
                self._seq = itertools.count(max(job.seq + 1, next(self._seq)))
            else:
                job.seq = next(self._seq)
            self._jobs[job.id] = job
            self._per_tenant[job.tenant] = self.tenant_depth(job.tenant) + 1
            return
        if len(self._jobs) >= self.max_size:
            raise QueueFullError("queue", len(self._jobs), self.max_size)
        bound = job.tenant_bound if job.tenant_bound is not None else self.max_per_tenant
        depth = self.tenant_depth(job.tenant)
        if bound is not None and depth >= bound:
            raise QueueFullError("tenant", depth, bound)
        job.seq = next(self._seq)
        self._jobs[job.id] = job
        self._per_tenant[job.tenant] = depth + 1

    def remove(self, job_id: str) -> Job | None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            left = self._per_tenant[job.tenant] - 1
            if left:
                self._per_tenant[job.tenant] = left
            else:
                del self._per_tenant[job.tenant]
        return job


class FifoQueue(_Bounded):
    def push(self, job: Job, now: float, *, force: bool = False) -> None:
        self._admit(job, force)

    def candidates(self, now: float) -> Iterator[Job]:
        return iter(sorted(self._jobs.values(), key=lambda j: j.seq))

    def take(self, job: Job, now: float) -> None:
        self.remove(job.id)


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

    def push(self, job: Job, now: float, *, force: bool = False) -> None:
        self._admit(job, force)

    def effective_band(self, job: Job, now: float) -> int:
        """The job's band after aging: one band higher per ``band_aging_s`` waited."""
        promoted = int(max(0.0, now - job.arrived_at) // self.band_aging_s)
        return max(0, job.band - promoted)

    def aged(self, job: Job, now: float) -> bool:
        """Shortest-first aging: a job that has waited ``aging_s`` goes ahead of shorter ones."""
        return now - job.arrived_at >= self.aging_s

    def _tag(self, band: int, tenant: str) -> float:
        # A tenant returning from idle starts at the band's virtual time: no banked credit.
        return max(self._finish.get((band, tenant), 0.0), self._virtual.get(band, 0.0))

    def _tenant_order(self, jobs: Sequence[Job], now: float) -> list[Job]:
        if self.within_tenant is WithinTenant.FIFO:
            return sorted(jobs, key=lambda j: j.seq)

        def key(job: Job) -> tuple[int, float, int]:
            if self.aged(job, now):
                return (0, 0.0, job.seq)  # aged: ahead of every younger job, in arrival order
            return (1, job.predicted_s, job.seq)

        return sorted(jobs, key=key)

    def candidates(self, now: float) -> Iterator[Job]:
        bands: dict[int, dict[str, list[Job]]] = {}
        for job in self._jobs.values():
            bands.setdefault(self.effective_band(job, now), {}).setdefault(job.tenant, []).append(job)
        for band in sorted(bands):
            tenants = {t: self._tenant_order(jobs, now) for t, jobs in bands[band].items()}
            # Visit tenants by virtual tag, simulating charges so later candidates follow the
            # order dispatching them one by one would give.
            tags = {t: self._tag(band, t) for t in tenants}
            positions = dict.fromkeys(tenants, 0)
            while tags:
                # Ties go as take() would see them: to the tenant whose oldest remaining job is oldest.
                tenant = min(tags, key=lambda t: (tags[t], min(j.seq for j in tenants[t][positions[t]:])))
                job = tenants[tenant][positions[tenant]]
                yield job
                positions[tenant] += 1
                if positions[tenant] == len(tenants[tenant]):
                    del tags[tenant]
                else:
                    tags[tenant] += job.predicted_s / job.weight

    def take(self, job: Job, now: float) -> None:
        band = self.effective_band(job, now)
        start = self._tag(band, job.tenant)
        self._virtual[band] = max(self._virtual.get(band, 0.0), start)
        self._finish[(band, job.tenant)] = start + job.predicted_s / job.weight
        self.remove(job.id)


def make_queue(order: str, *, max_size: int, max_per_tenant: int | None = None, within_tenant: str = "fifo",
               aging_s: float = 30.0, band_aging_s: float = 60.0) -> JobQueue:
    """The queue policy named in the configuration."""
    kind = Order(order)
    if kind is Order.FIFO:
        return FifoQueue(max_size, max_per_tenant)
    return FairQueue(max_size, max_per_tenant, within_tenant=WithinTenant(within_tenant), aging_s=aging_s,
                     band_aging_s=band_aging_s)
