"""scheduler.runtime.dispatcher: each backend's slot limit, fixed or learned, kept through restarts and reloads."""

from __future__ import annotations

from dataclasses import dataclass

from backend.pool import Backend
from backend.state import BackendState
from scheduler.config import SidecarConfig
from scheduler.core.admission import Rejection
from scheduler.core.concurrency import AdaptiveLimit, AdaptiveSettings, SlotPolicy
from scheduler.runtime.build import build_scheduler
from scheduler.runtime.dispatcher import Dispatcher, QueuedDeadline

AUTO = SlotPolicy(fixed=None, adaptive=AdaptiveSettings(samples=2, max_slots=3))


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(n: int = 2) -> list[Backend]:
    backends = [Backend(spec) for spec in SidecarConfig().backends.layout()[:n]]
    for i, backend in enumerate(backends):
        backend.state, backend.pid, backend.model_key = BackendState.READY, 100 + i, (24000, False)
    return backends


def test_fixed_slots_are_the_same_for_every_backend() -> None:
    backends = pool()
    dispatcher = Dispatcher(build_scheduler(SidecarConfig()), lambda: backends, slots=3)
    dispatcher.pump()  # the pool's first change notice: the dispatcher tracks its backends
    assert [v.slots for v in dispatcher.views()] == [3, 3]
    assert [(b.slots, b.slot_mode) for b in backends] == [(3, "fixed"), (3, "fixed")]


def test_auto_starts_at_one_and_a_restart_starts_it_again() -> None:
    backends = pool()
    dispatcher = Dispatcher(build_scheduler(SidecarConfig()), lambda: backends, slots=AUTO)
    dispatcher.pump()  # the pool's first change notice: the dispatcher tracks its backends
    assert [v.slots for v in dispatcher.views()] == [1, 1]
    limit = dispatcher.limit(backends[0])
    assert isinstance(limit, AdaptiveLimit)
    limit.limit = 3  # as if learned
    dispatcher.pump()  # the next event shows it on the backend
    assert [v.slots for v in dispatcher.views()] == [3, 1]
    assert backends[0].as_json()["slots"] == 3 and backends[0].as_json()["slot_mode"] == "auto"
    backends[0].pid = 999  # a new process
    dispatcher.pump()  # the pool's change notice
    assert [v.slots for v in dispatcher.views()] == [1, 1]
    limit.limit = 2
    backends[0].state = BackendState.RESTARTING
    dispatcher.pump()
    assert dispatcher.views()[0].slots == 1


def test_reading_the_limits_changes_nothing() -> None:
    """Metrics scrapes and status pages read the limits: only the dispatcher's events change them."""
    first, joined = pool(2)
    backends = [first]
    dispatcher = Dispatcher(build_scheduler(SidecarConfig()), lambda: backends, slots=AUTO)
    dispatcher.pump()  # the pool's first change notice: the dispatcher tracks its backends
    limit = dispatcher.limit(first)
    assert isinstance(limit, AdaptiveLimit)
    limit.limit = 3  # as if learned
    dispatcher.pump()
    epoch = limit._epoch
    first.pid, first.state = 999, BackendState.RESTARTING  # a new process, not noticed yet
    backends.append(joined)  # a backend that joined the pool, not noticed yet
    for _ in range(2):
        states = dispatcher.slot_states()
        assert states[first.id]["slots"] == 3 and states[joined.id]["slots"] == 1
        assert [v.slots for v in dispatcher.views()] == [3, 1]
        assert dispatcher.limit(first) is limit
        assert dispatcher.limit(joined) is not dispatcher.limit(joined)  # a fresh one each time, kept nowhere
    assert (limit.limit, limit._epoch) == (3, epoch)
    assert first.slots == 3 and joined.slot_mode == "fixed"  # as the last event showed them
    dispatcher.pump()  # the pool's change notice
    assert limit.limit == 1 and limit._epoch > epoch and first.slots == 1
    assert dispatcher.limit(joined) is dispatcher.limit(joined) and joined.slot_mode == "auto"


def test_a_reload_keeps_what_was_learned_unless_the_policy_changed() -> None:
    backends = pool(1)
    dispatcher = Dispatcher(build_scheduler(SidecarConfig()), lambda: backends, slots=AUTO)
    dispatcher.pump()  # the pool's first change notice: the dispatcher tracks its backends
    limit = dispatcher.limit(backends[0])
    dispatcher.slots = SlotPolicy(fixed=None, adaptive=AdaptiveSettings(samples=2, max_slots=3))  # equal
    assert dispatcher.limit(backends[0]) is limit
    dispatcher.slots = 2
    assert dispatcher.views()[0].slots == 2 and backends[0].slot_mode == "fixed"
    dispatcher.slots = AUTO
    assert dispatcher.views()[0].slots == 1 and backends[0].slot_mode == "auto"


async def test_completions_teach_the_backends_limit() -> None:
    clock = Clock()
    backends = pool(1)
    scheduler = build_scheduler(SidecarConfig())
    dispatcher = Dispatcher(scheduler, lambda: backends, slots=AUTO, clock=clock)
    priors = scheduler.cost.priors
    for i in range(4):  # a warm-up cohort, then one at a time, each twice its solo estimate by the prior line
        job = scheduler.make_job(id=f"j{i}", chars=20, units=20.0, model_key=(24000, False), now=clock.now)
        future = dispatcher.offer(job)
        assert not isinstance(future, Rejection)
        backend = await future
        assert backend.in_flight == 1
        clock.now += 2 * (priors.base_s + priors.per_unit_s * 20.0)
        dispatcher.finish(job, backend, ok=True)
    limit = dispatcher.slot_states()[backends[0].id]
    assert limit["mode"] == "auto" and limit["levels"]["1"]["stretch"] == 2.0
    dispatcher.close()


def test_a_refusal_for_want_of_capacity_counts_as_work_waiting() -> None:
    """Admission that keeps the queue short by refusing must not hide saturation from slots: auto."""
    clock = Clock()
    backends = pool(1)
    scheduler = build_scheduler(SidecarConfig())
    dispatcher = Dispatcher(scheduler, lambda: backends, slots=AUTO, clock=clock)
    seen: list[bool] = []

    class Spy(AdaptiveLimit):
        def load(self, now: float, in_flight: int, *, waiting: bool, beside: int = 0) -> None:
            seen.append(waiting)

    dispatcher._limits[backends[0].id] = Spy(AUTO.adaptive, now=clock.now)
    dispatcher.pump()
    scheduler.tally.rejected["tenant_queue_full"] += 1  # the tenant's own bound: not the pool's capacity
    dispatcher.pump()
    scheduler.tally.rejected["deadline_unmeetable"] += 1
    dispatcher.pump()
    dispatcher.pump()  # nothing refused since the last look
    scheduler.tally.rejected["queue_full"] += 2
    dispatcher.pump()
    assert seen == [False, False, True, False, True]
    dispatcher.close()


async def test_a_request_past_the_limit_on_an_extra_slot_is_not_what_the_limit_measures() -> None:
    clock = Clock()
    backends = pool(1)
    config = SidecarConfig()  # the short class has one extra slot
    scheduler = build_scheduler(config)
    dispatcher = Dispatcher(scheduler, lambda: backends, slots=AUTO, clock=clock)
    dispatcher.pump()  # the pool's first change notice: the dispatcher tracks its backends
    limit = dispatcher.limit(backends[0])
    assert isinstance(limit, AdaptiveLimit) and limit.limit == 1
    jobs = [scheduler.make_job(id=f"j{i}", chars=20, units=20.0, model_key=(24000, False), now=clock.now)
            for i in range(2)]
    futures = [dispatcher.offer(job) for job in jobs]
    assert not any(isinstance(f, Rejection) for f in futures)
    for future in futures:
        assert not isinstance(future, Rejection)
        await future
    assert backends[0].in_flight == 2  # the second on the short class's extra slot
    # Both teach the slowdown with company; only j0 is a member of the level's cohort.
    assert set(limit._runs) == {"j0", "j1"} and limit._in_flight == 1 and limit._beside == 1
    assert limit._runs["j1"].extra and not limit._runs["j1"].cohort and set(limit._cohort) == {"j0"}
    clock.now += 1.0
    dispatcher.finish(jobs[1], backends[0], ok=True)
    assert limit._in_flight == 1 and backends[0].in_flight == 1
    dispatcher.finish(jobs[0], backends[0], ok=True)
    assert limit._in_flight == 0 and backends[0].in_flight == 0
    dispatcher.close()


async def test_a_job_still_queued_at_its_latest_start_is_answered_then_as_shed() -> None:
    clock = Clock()
    backends = pool(1)
    scheduler = build_scheduler(SidecarConfig())
    dispatcher = Dispatcher(scheduler, lambda: backends, slots=SlotPolicy(fixed=1), clock=clock)
    jobs = [scheduler.make_job(id=f"j{i}", chars=300, units=300.0, model_key=(24000, False), now=clock.now,
                               client_budget_s=250.0) for i in range(2)]
    running = dispatcher.offer(jobs[0])
    queued = dispatcher.offer(jobs[1])
    assert not isinstance(running, Rejection) and not isinstance(queued, Rejection)
    await running
    latest = jobs[1].deadline_at - jobs[1].predicted_s
    clock.now = latest - 0.001
    dispatcher._on_deadline()
    assert not queued.done()
    clock.now = latest
    dispatcher._on_deadline()
    assert queued.done() and isinstance(queued.exception(), QueuedDeadline)
    exc = queued.exception()
    assert isinstance(exc, QueuedDeadline) and exc.shed
    assert scheduler.tally.shed == 1 and scheduler.tally.expired_queued == 0
    dispatcher.close()
