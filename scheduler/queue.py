"""The waiting room: jobs admitted but not yet given to a backend.

Pure: no asyncio, no I/O, time passed in. Bounded; FIFO for now.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

ModelKey = tuple[int, bool]  # (sample_rate, use_phoneme): what a backend must have loaded


class QueueFullError(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"queue is full ({size} waiting)")
        self.size = size


@dataclass(eq=False, kw_only=True)
class Job:
    """One admitted TTS request, as the scheduler sees it."""

    id: str
    chars: int  # len(input_text), upstream's length measure
    units: float  # glmtts.text cost units
    model_key: ModelKey
    enqueued_at: float  # monotonic seconds


class FifoQueue:
    """First come, first served, at most ``max_size`` waiting."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs.values())

    def push(self, job: Job) -> None:
        if len(self._jobs) >= self.max_size:
            raise QueueFullError(len(self._jobs))
        self._jobs[job.id] = job

    def peek(self) -> Job | None:
        return next(iter(self._jobs.values()), None)

    def pop(self) -> Job:
        return self._jobs.popitem(last=False)[1]

    def remove(self, job: Job) -> bool:
        """Take a job out (its client left); False when it was no longer waiting."""
        return self._jobs.pop(job.id, None) is not None

    def oldest_wait(self, now: float) -> float:
        head = self.peek()
        return now - head.enqueued_at if head else 0.0
