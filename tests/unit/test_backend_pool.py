"""The pool's bookkeeping without starting anything: layout, lookups, report_failure, on_change."""

from __future__ import annotations

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
        "served": 0, "restarts": 0, "model": {"sample_rate": 24000, "use_phoneme": True}, "last_error": None,
        "managed": True,
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
