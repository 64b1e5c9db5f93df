"""Which backend gets the next job. Pure: the caller passes in a snapshot of the backends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.queue import ModelKey


@dataclass(frozen=True, kw_only=True)
class Candidate:
    id: str
    free_slots: int  # slots not in use; only backends that may take traffic are candidates
    in_flight: int
    model_key: ModelKey | None  # the loaded model configuration, None when nothing is loaded


def choose_backend(job_key: ModelKey, candidates: Sequence[Candidate]) -> str | None:
    """A backend with a free slot: one already loaded with the job's configuration if any
    (a reload costs tens of seconds), then the least busy; ties keep the given order."""
    free = [c for c in candidates if c.free_slots > 0]
    if not free:
        return None
    best = min(free, key=lambda c: (c.model_key != job_key, c.in_flight))
    return best.id
