"""One dispatch decision: the next queued job to start, and on which backend.

``Scheduler.schedule`` takes these decisions for real; ``Forecaster.forecast`` takes the same ones
over simulated time on a copy of the queue, so a forecast waits exactly as dispatch would make a
job wait. The order: the queue's (bands, fair queueing), the jobs of a starved class first
(``ClassShares``); within each class's cap and extra slots; onto the backend ``choose_backend``
picks (model-configuration affinity and reloads); on a backend whose requests slow each other
down, only when every deadline still holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from scheduler.core.classes import ClassShares, LengthClasses
from scheduler.core.cost import CostModel
from scheduler.core.dispatch import Candidate, choose_backend
from scheduler.core.queue import Job, ModelKey
from scheduler.core.running import Assignment, BackendView, Running, shared_finish_s


class Pool:
    """The ready backends of one dispatch decision."""

    def __init__(self, ready: Sequence[BackendView]) -> None:
        self.ready = ready
        self.slots = sum(b.slots for b in ready)  # what class caps are relative to
        self.view = {b.id: b for b in ready}
        self.learned = any(b.slowdown is not None for b in ready)  # some backend's slowdown is known


class Demand:
    """What is queued: work by model configuration (dispatch leaves a free backend to a
    configuration that still has some; exactly 0 once the last such job left, whatever the
    rounding of the sums), and jobs by length class."""

    def __init__(self, jobs: Iterable[Job]) -> None:
        self.work: dict[ModelKey, float] = {}
        self._count: Counter[ModelKey] = Counter()
        self._classes: Counter[str] = Counter()
        for job in jobs:
            self.work[job.model_key] = self.work.get(job.model_key, 0.0) + job.predicted_s
            self._count[job.model_key] += 1
            self._classes[job.cls] += 1

    def remove(self, job: Job) -> None:
        key = job.model_key
        self._count[key] -= 1
        self.work[key] = self.work[key] - job.predicted_s if self._count[key] else 0.0
        self._classes[job.cls] -= 1
        if not self._classes[job.cls]:
            del self._classes[job.cls]

    def classes(self) -> Iterable[str]:
        """The length classes with jobs queued."""
        return self._classes.keys()


def load(now: float, running: Mapping[str, Running]) -> tuple[Counter[str], dict[str, float]]:
    """Jobs in flight and predicted seconds of service left, per backend. (What dispatch weighs;
    a reload under way is not counted in it: counting it makes affinity switch more backends, each
    switch a reload. A forecast's slots do free at ``Running.ends_at``.)"""
    in_flight: Counter[str] = Counter()
    remaining: dict[str, float] = {}
    for run in running.values():
        in_flight[run.backend_id] += 1
        left = max(0.0, run.job.predicted_s - (now - run.started_at))
        remaining[run.backend_id] = remaining.get(run.backend_id, 0.0) + left
    return in_flight, remaining


class DispatchStep:
    """The dispatch decision under the length classes' rules and the cost model's reload time."""

    def __init__(self, classes: LengthClasses, cost: CostModel) -> None:
        self.classes = classes
        self.cost = cost

    def run(self, chosen: Assignment, now: float) -> Running:
        """The job ``chosen`` sends to its backend at ``now``, as it runs there."""
        return Running(job=chosen.job, backend_id=chosen.backend_id, started_at=now,
                       reload_s=self.cost.reload_s if chosen.reload else None)

    def pick(self, now: float, pool: Pool, running: Mapping[str, Running], loaded: Mapping[str, ModelKey | None],
             jobs: Iterable[Job], demand: Demand, shares: ClassShares) -> Assignment | None:
        """The next dispatch at ``now``: the first of ``jobs`` (best first, the queue's order; the
        jobs of a starved class, ``ClassShares``, before the others) that a backend takes within its
        class's cap, or None. ``demand`` counts the queued jobs by configuration and by class;
        ``shares`` is advanced to ``now``."""
        shares.advance(now, demand.classes(), self.classes, len(pool.ready))
        in_flight, remaining = load(now, running)
        in_service = Counter(r.job.cls for r in running.values())
        # For each length class with jobs waiting and below its cap: its extra slots, or None when
        # no backend has a slot free for it even with them.
        room: dict[int, bool] = {}
        extra_of: dict[str, int | None] = {}
        for cls in demand.classes():
            if self._capped(cls, in_service, pool):
                continue
            extra = self.classes.extra_slots(cls)
            if extra not in room:
                room[extra] = any(in_flight[b.id] < b.slots + extra for b in pool.ready)
            extra_of[cls] = extra if room[extra] else None
        if all(extra is None for extra in extra_of.values()):
            return None  # every class with jobs waiting is at its cap or finds no slot
        starved = shares.starved(cls for cls, extra in extra_of.items() if extra is not None)
        if starved:
            listed = list(jobs)
            jobs = [job for job in listed if job.cls in starved] + [job for job in listed if job.cls not in starved]
        seen_by: dict[int, list[Candidate]] = {}  # the backends as a job with this many extra slots sees them
        waiting: dict[ModelKey, float] = {}  # work already waiting for a backend of a configuration
        on: dict[str, list[Running]] | None = None  # running jobs by backend, when a slowdown is known
        for job in jobs:
            if job.cls not in extra_of:  # at its cap
                continue
            slack = extra_of[job.cls]
            choice = None  # also when no backend has a slot for it: what choose_backend would say
            if slack is not None:
                if slack not in seen_by:
                    seen_by[slack] = [Candidate(id=b.id, slots=b.slots + slack, in_flight=in_flight[b.id],
                                                model_key=loaded[b.id], remaining_s=remaining.get(b.id, 0.0))
                                      for b in pool.ready]
                seen = seen_by[slack]
                if pool.learned:  # a backend that slows down with company takes the job only in time
                    if on is None:
                        on = {}
                        for run in running.values():
                            on.setdefault(run.backend_id, []).append(run)
                    seen = [c if shares_in_time(job, pool.view[c.id], on.get(c.id, ()), now)
                            else replace(c, slots=c.in_flight) for c in seen]
                choice = choose_backend(job.model_key, seen, reload_s=self.cost.reload_s,
                                        waiting_s=waiting.get(job.model_key, 0.0), demand=demand.work)
            if choice is not None:
                return Assignment(job=job, backend_id=choice.backend_id, reload=choice.reload)
            waiting[job.model_key] = waiting.get(job.model_key, 0.0) + job.predicted_s
        return None

    def _capped(self, cls: str, in_service: Counter[str], pool: Pool) -> bool:
        cap = self.classes.cap(cls, pool.slots)
        return cap is not None and in_service[cls] >= cap


def shares_in_time(job: Job, backend: BackendView, mine: Sequence[Running], now: float) -> bool:
    """Whether ``job`` may join ``mine``, the jobs ``backend`` runs: with one more in flight
    each runs slower (``BackendView.slowdown``) while they overlap: joining must not make a
    running job that would have made its deadline miss it, nor the job itself miss its own
    when waiting for a request here to end would have it finish sooner. An idle backend always
    may. (A short job next to a long one delays it by its own short overlap only, not by the
    long job's whole remainder.)"""
    if not mine or backend.slowdown is None:
        return True
    before = backend.slowdown_at(len(mine))
    # Each running job's work left, in solo seconds, from the time it ran at ``before`` (a
    # reload under way counts as work).
    left = [max(0.0, run.ends_at - run.started_at - (now - run.started_at) / before) for run in mine]
    without = shared_finish_s(left, backend.slowdown_at)
    with_job = shared_finish_s([*left, job.predicted_s], backend.slowdown_at)
    # Late even so: it waits only if waiting for a request here to end would do better.
    if now + with_job[-1] > job.deadline_at and with_job[-1] > min(without) + job.predicted_s * before:
        return False
    return not any(now + alone <= run.job.deadline_at < now + shared
                   for run, alone, shared in zip(mine, without, with_job, strict=False))
