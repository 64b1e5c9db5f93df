"""scheduler.runtime.dispatcher: the futures of a fanned-out request's pieces.

The first batch is admitted as one request and dispatched together; later pieces wait as
continuations; each piece's future is withdrawn, finished and requeued on its own. The event loop
runs, but nothing sleeps and nothing opens a socket: the clock is a hand-advanced value.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from backend.pool import Backend
from backend.state import BackendState
from scheduler.config import SidecarConfig
from scheduler.core.admission import Reason, Rejection
from scheduler.core.concurrency import SlotPolicy
from scheduler.core.queue import Job
from scheduler.core.scheduler import Scheduler
from scheduler.runtime.build import build_scheduler
from scheduler.runtime.dispatcher import Dispatcher

K24 = (24000, False)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(n: int) -> list[Backend]:
    backends = [Backend(spec) for spec in SidecarConfig().backends.layout()[:n]]
    for i, backend in enumerate(backends):
        backend.state, backend.pid, backend.model_key = BackendState.READY, 100 + i, K24
    return backends


def setup(n: int, *, slots: int = 1) -> tuple[Dispatcher, Scheduler, list[Backend], Clock]:
    clock = Clock()
    backends = pool(n)
    scheduler = build_scheduler(SidecarConfig())
    dispatcher = Dispatcher(scheduler, lambda: backends, slots=SlotPolicy(fixed=slots), clock=clock)
    dispatcher.pump()  # the pool's first change notice
    return dispatcher, scheduler, backends, clock


def request(scheduler: Scheduler, clock: Clock, id: str = "r", *, n: int = 3,
            tenant: str = "t") -> tuple[Job, list[Job]]:
    parent = scheduler.make_job(id=id, chars=600, units=600.0, model_key=K24, now=clock.now, tenant=tenant)
    pieces = [scheduler.make_piece(parent, id=f"{id}.{i}", chars=200, units=200.0) for i in range(n)]
    return parent, pieces


async def test_the_first_batch_is_dispatched_together_one_future_per_piece_in_order() -> None:
    dispatcher, scheduler, backends, clock = setup(2, slots=2)
    parent, pieces = request(scheduler, clock, n=4)
    assert scheduler.free_slots(parent, clock.now, dispatcher.views()) == 4
    futures = dispatcher.offer_pieces(parent, pieces)
    assert not isinstance(futures, Rejection) and len(futures) == 4
    assert all(f.done() for f in futures)  # one pump dispatched them all
    got = [await f for f in futures]
    assert [scheduler.running[p.id].backend_id for p in pieces] == [b.id for b in got]
    assert sorted(b.id for b in got) == sorted(b.id for b in backends for _ in range(2))
    assert all(b.in_flight == 2 for b in backends)
    assert scheduler.tally.admitted == 1 and scheduler.tally.dispatched == 4
    for piece, backend in zip(pieces, got, strict=True):
        clock.now += 1.0
        dispatcher.finish(piece, backend, ok=True)
    assert dispatcher.idle() and all(b.in_flight == 0 for b in backends)
    assert scheduler.tally.completed == 4
    dispatcher.close()


async def test_a_refused_request_queues_no_piece_and_waits_on_nothing() -> None:
    dispatcher, scheduler, backends, clock = setup(1)
    for backend in backends:
        backend.state = BackendState.FAILED
    parent, pieces = request(scheduler, clock)
    refused = dispatcher.offer_pieces(parent, pieces)
    assert isinstance(refused, Rejection) and refused.reason is Reason.NO_BACKEND
    assert len(scheduler.queue) == 0 and not dispatcher._waiting
    assert scheduler.tally.rejected == {"no_backend": 1} and scheduler.tally.admitted == 0
    dispatcher.close()


async def test_a_later_piece_waits_as_a_continuation_and_goes_before_new_requests() -> None:
    dispatcher, scheduler, _, clock = setup(2)
    parent, pieces = request(scheduler, clock, n=3, tenant="x")
    first = dispatcher.offer_pieces(parent, pieces[:2])
    assert not isinstance(first, Rejection)
    holders = [await f for f in first]
    newcomer = scheduler.make_job(id="new", chars=600, units=600.0, model_key=K24, now=clock.now, tenant="y")
    new_future = dispatcher.offer(newcomer)
    assert not isinstance(new_future, Rejection) and not new_future.done()
    clock.now += 1.0
    later = dispatcher.add_piece(pieces[2])
    assert not later.done() and pieces[2].continues
    dispatcher.finish(pieces[0], holders[0], ok=True)  # the slot goes to the request already started
    assert later.done() and (await later) is holders[0] and not new_future.done()
    dispatcher.finish(pieces[1], holders[1], ok=True)
    assert (await new_future) is holders[1]
    assert scheduler.tally.admitted == 2
    dispatcher.close()


async def test_withdrawing_a_queued_piece_leaves_nothing_and_an_assigned_one_gives_its_slot_back() -> None:
    dispatcher, scheduler, backends, clock = setup(1)
    parent, pieces = request(scheduler, clock, n=3)
    futures = dispatcher.offer_pieces(parent, pieces[:2])
    assert not isinstance(futures, Rejection)
    running, queued = futures
    assert running.done() and not queued.done()
    later = dispatcher.add_piece(pieces[2])
    for piece, future in ((pieces[1], queued), (pieces[2], later)):
        future.cancel()  # the client left
        dispatcher.withdraw(piece, future)
    assert len(scheduler.queue) == 0 and scheduler.next_deadline() is None
    assert not dispatcher._waiting and scheduler.tally.cancelled == 2
    dispatcher.withdraw(pieces[0], running)  # assigned already: its slot comes back
    assert backends[0].in_flight == 0 and dispatcher.idle()
    dispatcher.close()


async def test_a_piece_whose_backend_failed_is_requeued_ahead_of_new_work() -> None:
    dispatcher, scheduler, _, clock = setup(2)
    parent, pieces = request(scheduler, clock, n=2, tenant="x")
    first = dispatcher.offer_pieces(parent, pieces)
    assert not isinstance(first, Rejection)
    holders = [await f for f in first]
    newcomer = scheduler.make_job(id="new", chars=600, units=600.0, model_key=K24, now=clock.now, tenant="y")
    new_future = dispatcher.offer(newcomer)
    assert not isinstance(new_future, Rejection)
    # Its slot is free again: the piece, not the newer request of a tenant charged less, takes it.
    again = dispatcher.requeue(pieces[1], holders[1])
    assert again.done() and not new_future.done() and pieces[1].continues
    assert (await asyncio.wait_for(again, 1.0)) is holders[1]
    dispatcher.close()
