"""The async edge of the scheduling core: jobs wait here for a backend slot.

The queue and the choice of backend are pure (scheduler.queue, scheduler.dispatch); this module
owns the futures that wake a waiting request, and runs the matching whenever something changes:
a job arrives, a slot frees up, a backend changes state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from backend.pool import Backend
from backend.state import BackendState
from scheduler.dispatch import Candidate, choose_backend
from scheduler.queue import FifoQueue, Job


class Dispatcher:
    def __init__(self, backends: Callable[[], Sequence[Backend]], *, slots: int, max_queue: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._backends = backends
        self.slots = slots
        self.queue = FifoQueue(max_queue)
        self._waiting: dict[str, asyncio.Future[Backend]] = {}
        self._clock = clock

    def submit(self, job: Job) -> asyncio.Future[Backend]:
        """Queue a job; the future resolves to the backend whose slot it now holds.

        Raises scheduler.queue.QueueFullError when the queue is at its bound.
        """
        self.queue.push(job)
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._waiting[job.id] = future
        self.pump()
        return future

    def withdraw(self, job: Job) -> bool:
        """The job's client gave up; True if it was still waiting (no slot was taken)."""
        future = self._waiting.pop(job.id, None)
        if future is not None and not future.done():
            future.cancel()
        return self.queue.remove(job)

    def release(self, backend: Backend) -> None:
        """The backend finished one request (answered, or known to have stopped working on it)."""
        backend.in_flight = max(0, backend.in_flight - 1)
        self.pump()

    def pump(self) -> None:
        """Give waiting jobs, in queue order, to backends with a free slot."""
        while len(self.queue):
            job = self.queue.peek()
            assert job is not None
            backends = {b.id: b for b in self._backends() if b.state is BackendState.READY}
            chosen = choose_backend(job.model_key, [
                Candidate(id=b.id, free_slots=self.slots - b.in_flight, in_flight=b.in_flight,
                          model_key=b.model_key) for b in backends.values()])
            if chosen is None:
                return
            self.queue.pop()
            backend = backends[chosen]
            backend.in_flight += 1
            future = self._waiting.pop(job.id)
            future.set_result(backend)

    def free_slots(self) -> int:
        return sum(max(0, self.slots - b.in_flight) for b in self._backends()
                   if b.state is BackendState.READY)

    def in_service(self) -> int:
        return sum(b.in_flight for b in self._backends())
