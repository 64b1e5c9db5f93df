"""Which backend gets a job. Pure: the caller passes in a snapshot of the backends.

A backend holds one model configuration (sample_rate, use_phoneme) at a time and reloads, for
tens of seconds, to serve another. So: a free backend already loaded with the job's
configuration if there is one (the one running fewest requests, then the one with the least
work left); otherwise, if a busy backend with that configuration will be
free -- for this job, after the same-configuration work queued before it -- sooner than a reload
would take, wait for it; otherwise switch a free backend that no queued job of its own
configuration needs, preferring one with nothing loaded; ties go to the least remaining work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scheduler.core.queue import ModelKey


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A backend that may take traffic (ready), as the scheduler sees it."""

    id: str
    slots: int
    in_flight: int
    model_key: ModelKey | None  # the loaded configuration, None when nothing is loaded
    remaining_s: float = 0.0  # predicted seconds of work still to do on its in-flight jobs

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.in_flight)

    @property
    def free_in_s(self) -> float:
        """Predicted seconds until one of its slots frees up."""
        if self.free_slots:
            return 0.0
        return self.remaining_s / max(1, self.in_flight)


@dataclass(frozen=True, kw_only=True)
class Choice:
    backend_id: str
    reload: bool  # the backend must switch its model configuration first


def choose_backend(job_key: ModelKey, candidates: Sequence[Candidate], *, reload_s: float = 0.0,
                   waiting_s: float = 0.0, demand: Mapping[ModelKey, float] | None = None) -> Choice | None:
    """The backend for a job with configuration ``job_key``, or None to keep it waiting.

    ``waiting_s``: predicted work of jobs with the same configuration already waiting for such a
    backend; they go first, so waiting is worth it only while all of that fits before a reload.
    ``demand``: queued work by configuration; a free backend whose own configuration still has
    work waiting is left to it rather than switched away (no reload ping-pong).
    """
    free = [c for c in candidates if c.free_slots > 0]
    if not free:
        return None
    matching = [c for c in free if c.model_key == job_key]
    if matching:
        # Fewest requests in flight first (each one slows the others down), then least work left.
        best = min(matching, key=lambda c: (c.in_flight, c.remaining_s))
        return Choice(backend_id=best.id, reload=False)
    same = [c for c in candidates if c.model_key == job_key]
    same_slots = sum(c.slots for c in same)
    if same and min(c.free_in_s for c in same) + waiting_s / max(1, same_slots) < reload_s:
        return None  # a backend with this configuration frees up before a reload would finish
    demand = demand or {}
    switchable = [c for c in free if c.model_key is None or demand.get(c.model_key, 0.0) <= 0.0]
    if not switchable:
        return None
    best = min(switchable, key=lambda c: (c.model_key is not None, c.remaining_s))
    return Choice(backend_id=best.id, reload=True)
