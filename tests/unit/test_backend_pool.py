"""The pool's bookkeeping without starting anything: layout, lookups, report_failure, on_change."""

from __future__ import annotations

import logging

import pytest

from backend.pool import Backend, BackendPool
from backend.state import BackendState
from scheduler.config import parse_config

CONFIG = parse_config(
    'backends: {gpus: ["0", "1"], processes_per_gpu: 2, base_port: 20100, external: ["http://10.0.0.5:8049"]}'
).backends


def test_backends_follow_the_layout_and_start_as_starting() -> None:
    pool = BackendPool(CONFIG)
    assert [b.id for b in pool.backends] == ["gpu0-0", "gpu0-1", "gpu1-0", "gpu1-1", "ext-0"]
    assert [b.url for b in pool.backends][:2] == ["http://127.0.0.1:20100", "http://127.0.0.1:20101"]
    assert all(b.state is BackendState.STARTING for b in pool.backends)
    assert pool.ready() == []
    assert pool.get("gpu1-0") is pool.backends[2]
    assert pool.get("nope") is None


def test_as_json() -> None:
    backend = Backend(CONFIG.layout()[0])
    backend.model_key = (24000, True)
    backend.pid = 1234
    assert backend.as_json() == {
        "id": "gpu0-0", "url": "http://127.0.0.1:20100", "state": "starting", "pid": 1234, "in_flight": 0,
        "slots": 1, "slot_mode": "fixed",
        "served": 0, "restarts": 0, "model": {"sample_rate": 24000, "use_phoneme": True}, "last_error": None,
        "outlier": None, "managed": True,
    }
    external = Backend(CONFIG.layout()[-1])
    assert external.as_json()["model"] is None
    assert external.as_json()["managed"] is False
    assert external.as_json()["url"] == "http://10.0.0.5:8049"


def test_backends_compare_by_identity() -> None:
    spec = CONFIG.layout()[0]
    assert Backend(spec) != Backend(spec)
    assert len({Backend(spec), Backend(spec)}) == 2


def test_report_failure_takes_a_ready_backend_out_and_tells_the_dispatcher() -> None:
    calls: list[str] = []
    pool = BackendPool(CONFIG, on_change=lambda: calls.append("changed"))
    backend = pool.backends[1]
    backend.state = BackendState.READY
    before = backend.since
    assert pool.ready() == [backend]
    pool.report_failure(backend, "connection refused")
    assert backend.state is BackendState.UNHEALTHY
    assert backend.last_error == "connection refused"
    assert backend.since >= before
    assert calls == ["changed"]
    assert pool.ready() == []
    pool.report_failure(backend, "again")  # already out: no state change, no call
    assert calls == ["changed"]
    assert backend.last_error == "again"


def test_a_failing_on_change_does_not_break_the_pool() -> None:
    def boom() -> None:
        raise RuntimeError("dispatcher bug")

    pool = BackendPool(CONFIG, on_change=boom)
    backend = pool.backends[0]
    backend.state = BackendState.READY
    pool.report_failure(backend, "reset by peer")
    assert backend.state is BackendState.UNHEALTHY


async def test_wait_ready_gives_up_when_time_is_up_and_stop_without_start_stops_all() -> None:
    pool = BackendPool(CONFIG)
    assert await pool.wait_ready(0.0) is False
    await pool.stop()
    await pool.stop()
    assert {b.state for b in pool.backends} == {BackendState.STOPPED}


OUTLIER = parse_config(
    'backends: {gpus: ["0", "1"], base_port: 20100, outlier: {consecutive_failures: 2, min_requests: 3}}'
).backends


def fail(pool: BackendPool, backend: Backend, times: int) -> None:
    for _ in range(times):
        pool.report_outcome(backend, ok=False, latency_ratio=None)


def test_an_outlier_is_ejected_while_another_backend_is_ready(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    pool = BackendPool(OUTLIER, on_change=lambda: calls.append("changed"))
    first, second = pool.backends
    first.state = second.state = BackendState.READY
    fail(pool, first, 1)
    assert first.state is BackendState.READY and calls == []
    with caplog.at_level(logging.INFO, logger="glmtts_sidecar.pool"):
        fail(pool, first, 1)
    assert first.state is BackendState.UNHEALTHY
    assert first.outlier == "2 requests failed in a row"
    assert calls == ["changed"]
    assert "ready -> unhealthy (ejected as an outlier: 2 requests failed in a row; for 10 s)" in caplog.text
    fail(pool, first, 5)  # outcomes of requests sent before the ejection change nothing
    assert first.outlier == "2 requests failed in a row" and calls == ["changed"]


def test_the_last_ready_backend_is_flagged_but_never_ejected(caplog: pytest.LogCaptureFixture) -> None:
    pool = BackendPool(OUTLIER)
    first, second = pool.backends
    first.state, second.state = BackendState.READY, BackendState.RESTARTING
    with caplog.at_level(logging.WARNING, logger="glmtts_sidecar.pool"):
        for ratio in (9.0, 8.0, 7.0, 9.0):
            pool.report_outcome(first, ok=True, latency_ratio=ratio)
    assert first.state is BackendState.READY
    assert first.outlier == "median latency 8.0x its prediction over its last 3 requests (limit 4x)"
    assert first.as_json()["outlier"] == first.outlier
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"backend gpu0-0: outlier ({first.outlier}) but it is the last ready backend; "
                        "keeping it in rotation"]  # once, not at every request
    for _ in range(2):
        pool.report_outcome(first, ok=True, latency_ratio=1.0)
    assert first.outlier is None  # the latest requests look fine again
    for ratio in (9.0, 9.0, 9.0):
        pool.report_outcome(first, ok=True, latency_ratio=ratio)
    assert first.outlier is not None and first.state is BackendState.READY
    second.state = BackendState.READY  # now there is another: the next bad outcome ejects it
    pool.report_outcome(first, ok=True, latency_ratio=9.0)
    assert first.state is BackendState.UNHEALTHY


def test_outcomes_of_a_backend_out_of_rotation_eject_nothing() -> None:
    pool = BackendPool(OUTLIER)
    first, second = pool.backends
    first.state, second.state = BackendState.UNHEALTHY, BackendState.READY
    fail(pool, first, 3)
    assert first.state is BackendState.UNHEALTHY and first.outlier is None


def test_kill_backend_without_a_process_does_nothing_and_an_external_one_goes_out() -> None:
    pool = BackendPool(CONFIG)
    managed, external = pool.backends[0], pool.backends[-1]
    managed.state = external.state = BackendState.READY
    pool.kill_backend(managed, "request ran 300 s")
    assert managed.state is BackendState.READY and managed.last_error is None
    pool.kill_backend(external, "request ran 300 s")
    assert external.state is BackendState.UNHEALTHY and external.last_error == "request ran 300 s"


async def test_apply_before_start_only_changes_the_layout() -> None:
    calls: list[str] = []
    pool = BackendPool(CONFIG, on_change=lambda: calls.append("changed"))
    kept = pool.backends[0]
    smaller = parse_config('backends: {gpus: ["0"], processes_per_gpu: 1, base_port: 20100}').backends
    await pool.apply(smaller, drain_timeout_s=1.0)
    assert [b.id for b in pool.backends] == ["gpu0-0"]
    assert pool.backends[0] is kept and pool.config is smaller
    assert pool.get("gpu1-0") is None
    assert len(calls) == 4  # one per removal
    await pool.apply(CONFIG, drain_timeout_s=1.0)
    assert [b.id for b in pool.backends] == ["gpu0-0", "gpu0-1", "gpu1-0", "gpu1-1", "ext-0"]
    assert pool.backends[0] is kept


async def test_restart_backend_of_an_unknown_id_is_a_key_error() -> None:
    pool = BackendPool(CONFIG)
    with pytest.raises(KeyError):
        await pool.restart_backend("gpu9-0", drain_timeout_s=1.0)
    with pytest.raises(RuntimeError):
        await pool.restart_backend("gpu0-0", drain_timeout_s=1.0)  # not started
