"""Backends as the scheduler sees them, and the jobs it gives them: what one dispatch decides
(``Assignment``), a job in service (``Running``), and when jobs sharing one backend finish.
Plain values: the scheduler (scheduler.core.scheduler) keeps them; nothing here changes on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scheduler.core.queue import Job, ModelKey


@dataclass(frozen=True, kw_only=True)
class BackendView:
    """A backend as the scheduler needs to see it."""

    id: str
    ready: bool  # may take traffic now
    alive: bool  # ready, or starting/restarting: will serve
    slots: int
    model_key: ModelKey | None
    # How many times its time alone a request takes with 1, 2, ... in flight (learned by slots:
    # auto); None: not known, nothing is checked (a fixed number of slots is the operator's).
    slowdown: tuple[float, ...] | None = None

    def slowdown_at(self, level: int) -> float:
        """The slowdown with ``level`` in flight: past what is known, processor sharing without gain."""
        curve = self.slowdown or ()
        return curve[level - 1] if 1 <= level <= len(curve) else float(max(1, level))


@dataclass(frozen=True, kw_only=True)
class Assignment:
    job: Job
    backend_id: str
    reload: bool  # the backend will switch model configuration for this job


@dataclass(kw_only=True)
class Running:
    job: Job
    backend_id: str
    started_at: float
    reload_s: float | None = None  # predicted seconds its backend first spends loading its configuration
    answered_early: bool = False  # the client already got 408; the backend still works on it

    @property
    def ends_at(self) -> float:
        """When its backend is predicted to be done with it."""
        return self.started_at + (self.reload_s or 0.0) + self.job.predicted_s

    def left_s(self, now: float) -> float:
        return max(0.0, self.ends_at - now)


def shared_finish_s(work_s: Sequence[float], slowdown_at: Callable[[int], float]) -> list[float]:
    """Seconds until each job finishes when they share one backend from now: processor sharing
    where, with ``k`` in flight, each progresses at ``1 / slowdown_at(k)`` solo-seconds per second."""
    order = sorted(range(len(work_s)), key=lambda i: work_s[i])
    finish = [0.0] * len(work_s)
    t = done = 0.0  # time so far, and solo work every job still running has done
    for position, i in enumerate(order):
        active = len(order) - position
        t += (work_s[i] - done) * slowdown_at(active)
        done = work_s[i]
        finish[i] = t
    return finish
