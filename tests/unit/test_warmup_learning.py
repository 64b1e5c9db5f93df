"""A backend's warm-up synthesis teaches the cost model: the pool times it (WARMING to READY), the
dispatcher hands it to the scheduler's cost model before the backend's first dispatch."""

from __future__ import annotations

import time

import pytest

from backend.pool import Backend, BackendPool
from backend.state import BackendState
from backend.warmup import WarmupRun
from glmtts.text import units
from scheduler.config import SidecarConfig
from scheduler.core.cost import CostModel
from scheduler.runtime.build import build_scheduler
from scheduler.runtime.dispatcher import Dispatcher

CONFIG = SidecarConfig()  # GPU-scale priors: the warm-up text is predicted ~2.6 s
WARMUP = CONFIG.backends.warmup


class CountingCost(CostModel):
    def __init__(self) -> None:
        super().__init__()
        self.warmups: list[tuple[float, tuple[int, bool], float]] = []

    def observe_warmup(self, units: float, key: tuple[int, bool], seconds: float) -> None:
        self.warmups.append((units, key, seconds))
        super().observe_warmup(units, key, seconds)


def warm(pool: BackendPool, backend: Backend, seconds: float) -> None:
    """What the supervisor does: WARMING, the warm-up synthesis (``seconds``), READY."""
    pool._set_state(backend, BackendState.WARMING, "health ok; warming up")
    backend.since = time.monotonic() - seconds  # as if the synthesis took that long
    pool._set_state(backend, BackendState.READY, "warmed up")


def test_the_pool_times_a_successful_warm_up() -> None:
    pool = BackendPool(CONFIG.backends)
    backend = pool.backends[0]
    assert backend.warmup is None
    warm(pool, backend, 0.25)
    run = backend.warmup
    assert run is not None
    assert run.seconds == pytest.approx(0.25, abs=0.05)
    assert (run.text, run.model_key) == (WARMUP.text, WARMUP.model_key)
    warm(pool, backend, 0.5)  # a restart warms up again: a new run
    assert backend.warmup is not run and backend.warmup.seconds == pytest.approx(0.5, abs=0.05)


def test_becoming_ready_without_a_warm_up_records_none() -> None:
    pool = BackendPool(CONFIG.backends)
    backend = pool.backends[0]
    pool._set_state(backend, BackendState.READY, "health ok")  # warm-up disabled: STARTING -> READY
    pool._set_state(backend, BackendState.UNHEALTHY, "3 health checks failed")
    pool._set_state(backend, BackendState.READY, "health ok 2 times in a row")
    assert backend.warmup is None
    pool._set_state(backend, BackendState.WARMING, "warming up")
    pool._set_state(backend, BackendState.RESTARTING, "warm-up failed")  # a failed warm-up teaches nothing
    assert backend.warmup is None


def test_the_dispatcher_teaches_each_warm_up_once_before_the_first_dispatch() -> None:
    cost = CountingCost()
    scheduler = build_scheduler(CONFIG, cost=cost)
    dispatcher = Dispatcher(scheduler, lambda: pool.backends)
    pool = BackendPool(CONFIG.backends, on_change=dispatcher.pump)
    prior = cost.predict(units(WARMUP.text), WARMUP.model_key).mean_s
    backend = pool.backends[0]
    warm(pool, backend, 0.05 * prior)  # backends far faster than the priors say, even cold
    assert cost.warmups == [(units(WARMUP.text), WARMUP.model_key, pytest.approx(0.05 * prior, abs=0.05))]
    assert cost.predict(units(WARMUP.text), WARMUP.model_key).mean_s < 0.1 * prior
    dispatcher.pump()
    dispatcher.pump()
    assert len(cost.warmups) == 1  # the same run is not taught twice
    warm(pool, pool.backends[1], 0.04 * prior)
    assert len(cost.warmups) == 2


def test_a_new_cost_model_learns_every_backends_latest_warm_up() -> None:
    scheduler = build_scheduler(CONFIG)
    backends = [Backend(spec) for spec in CONFIG.backends.layout()]
    for backend in backends:
        backend.state, backend.model_key = BackendState.READY, WARMUP.model_key
        backend.warmup = WarmupRun(seconds=0.1, text=WARMUP.text, model_key=WARMUP.model_key)
    dispatcher = Dispatcher(scheduler, lambda: backends)
    dispatcher.pump()
    fresh = CountingCost()  # a reload that changed the cost priors
    dispatcher.scheduler = build_scheduler(CONFIG, cost=fresh)
    dispatcher.pump()
    assert len(fresh.warmups) == len(backends)
