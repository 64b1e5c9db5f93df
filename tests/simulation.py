"""A discrete-event simulation of the dispatcher around the real scheduling core.

What scheduler.runtime.dispatcher does in real time, done here over simulated time with the real
``Scheduler``: a job arrives (``offer``, then ``schedule``); a dispatched job holds its slot for
exactly its predicted service time, plus the predicted reload when it switched its backend's model
configuration, then ends (``finish``); a queued job whose deadline passes leaves (``expire``); the
scheduler runs after every event. Every completion and deadline due at one instant happens before
that instant's ``schedule``. A backend holds the configuration of the last job dispatched to it;
backends otherwise keep their state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from scheduler.core.queue import Job
from scheduler.core.running import BackendView
from scheduler.core.scheduler import Scheduler


@dataclass(frozen=True, kw_only=True)
class Start:
    at: float  # when the job was dispatched
    backend_id: str
    reload: bool  # its backend switched configuration for it


class DispatchSimulation:
    def __init__(self, scheduler: Scheduler, backends: Sequence[BackendView], *, now: float = 0.0) -> None:
        self.scheduler = scheduler
        self.backends = {b.id: b for b in backends}
        self.now = now
        self.started: dict[str, Start] = {}
        self.rejected: list[str] = []
        self._ends: dict[str, float] = {}  # running job -> when it ends

    def views(self) -> list[BackendView]:
        return list(self.backends.values())

    def arrive(self, job: Job, at: float) -> bool:
        """Run until ``at``, then offer ``job`` and schedule; False if admission refused it."""
        self.run_until(at)
        if self.scheduler.offer(job, self.now, self.views()) is not None:
            self.rejected.append(job.id)
            return False
        self._schedule()
        return True

    def run_until(self, at: float) -> None:
        """Process every completion and deadline up to ``at`` (inclusive); the clock ends at ``at``."""
        while (due := self._next_event()) <= at:
            self._advance(due)
        self.now = max(self.now, at)

    def run_until_started(self, job_id: str, *, max_events: int = 100_000) -> Start | None:
        """Process events until ``job_id`` is dispatched; None if it never is (it expired, or the
        simulation ran out of events)."""
        for _ in range(max_events):
            if job_id in self.started:
                return self.started[job_id]
            due = self._next_event()
            if math.isinf(due):
                return None
            self._advance(due)
        raise AssertionError(f"no dispatch of {job_id} within {max_events} events")

    def _next_event(self) -> float:
        deadline = self.scheduler.next_deadline()
        return min(min(self._ends.values(), default=math.inf), math.inf if deadline is None else deadline)

    def _advance(self, to: float) -> None:
        self.now = max(self.now, to)
        for job_id in [j for j, end in self._ends.items() if end <= self.now]:
            del self._ends[job_id]
            assert self.scheduler.finish(job_id, self.now, ok=True) is not None
        self.scheduler.expire(self.now)
        self._schedule()

    def _schedule(self) -> None:
        for a in self.scheduler.schedule(self.now, self.views()):
            run = self.scheduler.running[a.job.id]
            reload_s = self.scheduler.cost.reload_s if a.reload else None
            self._ends[a.job.id] = run.started_at + (reload_s or 0.0) + a.job.predicted_s
            self.started[a.job.id] = Start(at=self.now, backend_id=a.backend_id, reload=a.reload)
            self.backends[a.backend_id] = replace(self.backends[a.backend_id], model_key=a.job.model_key)

