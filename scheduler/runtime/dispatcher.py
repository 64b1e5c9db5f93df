"""The async edge of the scheduling core: where requests wait and timers fire.

scheduler.core.scheduler.Scheduler decides (pure); this module owns what it cannot: the futures that wake
a waiting request with its backend, and one timer for the earliest queued deadline, so a job
expires on time even when no backend frees up. It runs the scheduler after every change: a job
arrives or leaves, a slot frees, a backend changes state.

It also keeps each backend's slot limit (scheduler.core.concurrency): fixed, or learned from what the
backend completes; it tells the limit every dispatch and release, and resets it when the backend
restarts. A limit changes only on those events and on a pump (the pool's change notice, a reload);
reading it (``limit``, ``views``, ``slot_states``: metrics scrapes, status pages) changes nothing.
And it hands each backend's warm-up synthesis (timed by the pool) to the cost model, before the
backend's first dispatch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from backend.pool import Backend
from backend.state import BackendState
from backend.warmup import WarmupRun
from glmtts.loop import wait_for
from glmtts.text import units
from scheduler.core.admission import Reason, Rejection
from scheduler.core.concurrency import SlotLimit, SlotPolicy
from scheduler.core.cost import CostModel
from scheduler.core.queue import Job
from scheduler.core.running import BackendView
from scheduler.core.scheduler import Scheduler

# States of a backend whose process is (re)starting: what its slot limit learned no longer holds.
FRESH = (BackendState.STARTING, BackendState.RESTARTING)
# States of a backend that is serving or will serve (FAILED waits out a long cool-down; STOPPING does not return).
ALIVE = (BackendState.STARTING, BackendState.WARMING, BackendState.READY, BackendState.UNHEALTHY,
         BackendState.DRAINING, BackendState.RESTARTING)


class QueuedDeadline(Exception):
    """The job's time ran out while it waited: its deadline passed, or (``shed``) its latest
    start did, so it could no longer finish in time (``Scheduler.expires_at``)."""

    def __init__(self, job_id: str, *, shed: bool = False) -> None:
        super().__init__(job_id)
        self.shed = shed


# Admission refusals that say the pool is short of capacity (not a tenant's own bound).
TURNED_AWAY = (Reason.DEADLINE_UNMEETABLE.value, Reason.QUEUE_FULL.value)


class Dispatcher:
    def __init__(self, scheduler: Scheduler, backends: Callable[[], Sequence[Backend]], *,
                 slots: SlotPolicy | int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self._backends = backends
        self.clock = clock
        self._policy = SlotPolicy(fixed=slots) if isinstance(slots, int) else slots
        self._limits: dict[str, SlotLimit] = {}
        self._identity: dict[str, tuple[int | None, int]] = {}  # (pid, restarts) the limit learned about
        self._waiting: dict[str, asyncio.Future[Backend]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._warmups: dict[str, WarmupRun] = {}  # per backend, the warm-up the cost model has seen
        self._taught: CostModel | None = None  # ... that cost model (a reload may bring a new one)
        self._turned_away = 0  # requests refused for want of capacity, as of the last load report
        self._extra: dict[str, set[str]] = {}  # per backend, the jobs it runs beyond its limit (extra slots)

    @property
    def slots(self) -> SlotPolicy:
        return self._policy

    @slots.setter
    def slots(self, policy: SlotPolicy | int) -> None:
        """A reload: a changed policy starts every backend's limit afresh; an unchanged one keeps
        what was learned."""
        policy = SlotPolicy(fixed=policy) if isinstance(policy, int) else policy
        if policy != self._policy:
            self._policy = policy
            self._limits.clear()
            self._refresh()

    def limit(self, backend: Backend) -> SlotLimit:
        """The backend's slot limit as it stands; reading it changes nothing (``_track`` keeps it up
        to date). A backend not seen yet (it joined the pool since the last event) gets a fresh
        one, kept nowhere: what its limit will be once tracked."""
        limit = self._limits.get(backend.id)
        return limit if limit is not None else self._policy.new_limit(self.clock())

    def _refresh(self) -> None:
        """Bring every backend's slot limit up to date with its backend (``_track``) and forget
        those of backends that left the pool."""
        backends = self._backends()
        for gone in set(self._limits) - {b.id for b in backends}:
            del self._limits[gone]
            self._identity.pop(gone, None)
            self._warmups.pop(gone, None)
            self._extra.pop(gone, None)
        now = self.clock()
        for backend in backends:
            self._track(backend, now)

    def _track(self, backend: Backend, now: float) -> SlotLimit:
        """The backend's slot limit, made current: created for a backend first seen, reset when its
        process (re)starts (what was learned is about a process that is gone), and shown on the
        backend (``slots``, ``slot_mode``: its status)."""
        limit = self._limits.get(backend.id)
        if limit is None:
            limit = self._limits[backend.id] = self._policy.new_limit(now)
        identity = (backend.pid, backend.restarts)
        if backend.state in FRESH or self._identity.get(backend.id, identity) != identity:
            limit.reset(now)
        self._identity[backend.id] = identity
        self._show(backend, limit)
        return limit

    @staticmethod
    def _show(backend: Backend, limit: SlotLimit) -> None:
        backend.slots, backend.slot_mode = limit.limit, limit.mode

    def _within(self, backend: Backend) -> int:
        """The backend's requests in flight within its limit: those a class's extra slot let past
        it share the backend too, but the limit is learned from, and compared with, the others."""
        return max(0, backend.in_flight - self._beside(backend))

    def _beside(self, backend: Backend) -> int:
        """The backend's requests in flight past its limit, on a class's extra slot."""
        return len(self._extra.get(backend.id, ()))

    def slot_states(self) -> dict[str, dict[str, Any]]:
        """Each backend's slot limit and what it learned (for metrics and status; a read)."""
        return {b.id: self.limit(b).describe() for b in self._backends()}

    def views(self) -> list[BackendView]:
        """The backends as the scheduler sees them, with their slot limits as they stand (a read)."""
        return [self._view(b, self.limit(b)) for b in self._backends()]

    @staticmethod
    def _view(backend: Backend, limit: SlotLimit) -> BackendView:
        return BackendView(id=backend.id, ready=backend.state is BackendState.READY, alive=backend.state in ALIVE,
                           slots=limit.limit, model_key=backend.model_key, slowdown=limit.slowdown())

    def offer(self, job: Job, *, force: bool = False) -> Rejection | asyncio.Future[Backend]:
        """Admit a job: a future resolving to the backend whose slot it holds; or why not.
        ``force``: skip admission (a job admitted before a restart)."""
        self._refresh()
        rejection = self.scheduler.offer(job, self.clock(), self.views(), force=force)
        if rejection is not None:
            return rejection
        return self._wait(job)

    def offer_pieces(self, parent: Job, pieces: Sequence[Job]) -> Rejection | list[asyncio.Future[Backend]]:
        """Admit a fanned-out request by its first ``pieces`` (``Scheduler.offer_pieces``): one
        future per piece, in their order, each resolving to the backend whose slot that piece
        holds; or why not. The pieces are dispatched together, in one pump."""
        self._refresh()
        rejection = self.scheduler.offer_pieces(parent, pieces, self.clock(), self.views())
        if rejection is not None:
            return rejection
        futures = [self._future(piece) for piece in pieces]
        self.pump()
        return futures

    def add_piece(self, job: Job) -> asyncio.Future[Backend]:
        """Queue a later piece of a request already started (``Scheduler.add_piece``): a future
        resolving to its backend. Withdrawn, finished and requeued like any job."""
        self.scheduler.add_piece(job, self.clock())
        return self._wait(job)

    def _wait(self, job: Job) -> asyncio.Future[Backend]:
        future = self._future(job)
        self.pump()
        return future

    def _future(self, job: Job) -> asyncio.Future[Backend]:
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._waiting[job.id] = future
        return future

    def withdraw(self, job: Job, future: asyncio.Future[Backend]) -> None:
        """The client gave up while waiting: leave the queue, or give back a slot just assigned."""
        self._waiting.pop(job.id, None)
        if self.scheduler.cancel(job.id) is None and future.done() and not future.cancelled() \
                and future.exception() is None:
            self.finish(job, future.result(), ok=False)
        else:
            self.pump()

    def requeue(self, job: Job, backend: Backend) -> asyncio.Future[Backend]:
        """The backend failed before answering: back in line, where the job was."""
        self._release(job, backend, ok=False)
        self.scheduler.requeue(job.id, self.clock())
        return self._wait(job)

    def answered_early(self, job: Job) -> None:
        self.scheduler.answered_early(job.id)

    def finish(self, job: Job, backend: Backend, *, ok: bool) -> None:
        """The backend is done with the job (answered, or known to have stopped working on it)."""
        if self.scheduler.finish(job.id, self.clock(), ok=ok) is not None:
            self._release(job, backend, ok=ok)
        self.pump()

    def _release(self, job: Job, backend: Backend, *, ok: bool) -> None:
        backend.in_flight = max(0, backend.in_flight - 1)
        self._extra.get(backend.id, set()).discard(job.id)
        # The limit measures against the cost model's prior line: the learned prediction follows the
        # slowdown that concurrency itself causes, so it would hide what the limit must see.
        priors = self.scheduler.cost.priors
        limit = self._track(backend, self.clock())
        limit.released(job.id, self.clock(), self._within(backend), beside=self._beside(backend),
                       work_s=priors.base_s + priors.per_unit_s * job.units,
                       budget_s=job.deadline_at - job.arrived_at, ok=ok, late=self.clock() > job.deadline_at)
        self._show(backend, limit)

    def pump(self) -> None:
        """Run the scheduler and wake the requests it dispatched; again when a limit rose. First,
        every backend's slot limit is brought up to date: a pump follows every change of a
        backend (the pool's change notice) and every change of the queue."""
        self._refresh()
        self._learn_warmups()
        while True:
            self._assign()
            if not self._observe_load():
                break
        self._arm_timer()
        if self.idle():
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def _learn_warmups(self) -> None:
        """Teach the cost model every warm-up a backend finished since the last look (the pool
        calls for a pump when a backend becomes ready); a new cost model, each backend's latest."""
        if self._taught is not self.scheduler.cost:
            self._taught, self._warmups = self.scheduler.cost, {}
        for backend in self._backends():
            run = backend.warmup
            if run is not None and self._warmups.get(backend.id) is not run:
                self._warmups[backend.id] = run
                self.scheduler.cost.observe_warmup(units(run.text), run.model_key, run.seconds)

    def _assign(self) -> None:
        backends = {b.id: b for b in self._backends()}
        for assignment in self.scheduler.schedule(self.clock(), self.views()):
            backend = backends[assignment.backend_id]
            future = self._waiting.pop(assignment.job.id, None)
            if future is None or future.done():  # its client is gone: nobody will use the slot
                self.scheduler.finish(assignment.job.id, self.clock(), ok=False)
                continue
            limit = self._track(backend, self.clock())
            extra = backend.in_flight >= limit.limit  # a class's extra slot: not what the limit measures
            backend.in_flight += 1
            if extra:
                self._extra.setdefault(backend.id, set()).add(assignment.job.id)
            limit.dispatched(assignment.job.id, self.clock(), self._within(backend), beside=self._beside(backend),
                             extra=extra)
            if assignment.reload and backend.model_key is not None:
                backend.model_reloads += 1  # for metrics: it switches from another configuration
            future.set_result(backend)

    def _observe_load(self) -> bool:
        """Tell every ready backend's limit how loaded it is; True if a limit rose. Work is waiting
        while the queue holds some, and also when admission has refused a request for want of
        capacity since the last report (its wait would break its deadline, or the queue was full):
        admission keeps the queue short exactly when more capacity is what is missing."""
        rejected = self.scheduler.tally.rejected
        turned_away = sum(rejected[reason] for reason in TURNED_AWAY)
        waiting = len(self.scheduler.queue) > 0 or turned_away > self._turned_away
        self._turned_away = turned_away
        rose = False
        for backend in self._backends():
            if backend.state is not BackendState.READY:
                continue
            limit = self._track(backend, self.clock())
            before = limit.limit
            limit.load(self.clock(), self._within(backend), waiting=waiting, beside=self._beside(backend))
            self._show(backend, limit)
            rose = rose or limit.limit > before
        return rose

    def idle(self) -> bool:
        """Nothing queued and no backend working on a job (an answer still streaming to its client
        holds no slot: GLM-TTS answers only once synthesis is done)."""
        return not len(self.scheduler.queue) and not self.scheduler.running

    async def wait_idle(self, timeout: float) -> bool:
        """True once idle, False when ``timeout`` seconds pass first."""
        if self.idle():
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            await wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.scheduler.next_deadline()
        if at is not None:
            delay = max(0.0, at - self.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        now = self.clock()
        for job in self.scheduler.expire(now):
            future = self._waiting.pop(job.id, None)
            if future is not None and not future.done():
                future.set_exception(QueuedDeadline(job.id, shed=now < job.deadline_at))
        self.pump()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def in_service(self) -> int:
        return len(self.scheduler.running)
