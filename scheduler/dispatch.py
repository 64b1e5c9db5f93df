"""Which backend gets a job. Pure: the caller passes in a snapshot of the backends.

A backend holds one model configuration (sample_rate, use_phoneme) at a time and reloads, for
tens of seconds, to serve another. So: a free backend already loaded with the job's
configuration if there is one; otherwise, if a busy backend with that configuration will be
free sooner than a reload would take, wait for it; otherwise switch a free backend, preferring
one with nothing loaded; ties go to the least predicted remaining work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.queue import ModelKey


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


def choose_backend(job_key: ModelKey, candidates: Sequence[Candidate], *, reload_s: float = 0.0) -> Choice | None:
    """The backend for a job with configuration ``job_key``, or None to keep it waiting."""
    free = [c for c in candidates if c.free_slots > 0]
    if not free:
        return None
    matching = [c for c in free if c.model_key == job_key]
    if matching:
        best = min(matching, key=lambda c: c.remaining_s)
        return Choice(backend_id=best.id, reload=False)
    soon = [c for c in candidates if c.model_key == job_key and c.free_in_s < reload_s]
    if soon:
        return None  # a backend with this configuration frees up before a reload would finish
    best = min(free, key=lambda c: (c.model_key is not None, c.remaining_s))
    return Choice(backend_id=best.id, reload=True)
