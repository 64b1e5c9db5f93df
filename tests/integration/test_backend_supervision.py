"""Supervision against real processes on loopback: warm-up, crash loops, the unresponsive watchdog,
outlier ejection, graceful restarts and live layout changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from backend.state import BackendState
from tests.contract_cases import multipart
from tests.integration.test_backend_pool import EMULATOR, assert_gone, make_config, running, until
from tests.support import emulator, free_ports, get_json, http, pid_gone

S = BackendState
EXIT_AT_ONCE = ["{python}", "-c", "import sys; sys.exit(3)"]


def stats(url: str) -> dict[str, object]:
    result: dict[str, object] = get_json(url + "/emulator/stats")
    return result


def since(transitions: list[tuple[str, BackendState, float]], backend_id: str, state: BackendState) -> list[float]:
    return [t for bid, s, t in transitions if bid == backend_id and s is state]


async def test_warm_up_runs_between_health_and_ready_and_loads_the_configured_model() -> None:
    warmup = {"sample_rate": 32000, "use_phoneme": True}
    async with running(make_config([*EMULATOR, "--start-delay", "1"], gpus=["0"], warmup=warmup)) as w:
        backend = w.pool.backends[0]
        assert await w.pool.wait_ready(10)
        assert w.states(backend.id) == [S.STARTING, S.WARMING, S.READY]
        seen = stats(backend.url)
        assert seen["tts_received"] == 1 and seen["tts_completed"] == 1 and seen["model_loads"] == 1
        assert seen["last_request_id"] == "warmup-gpu0-0-1"
        assert seen["model"] == [32000, True]
        assert backend.model_key == (32000, True)
        health = get_json(backend.url + "/api/v1/health")
        assert health["model_loaded"] is True and health["model_sample_rate"] == 32000
        starting = since(w.transitions, backend.id, S.STARTING)[0]
        assert since(w.transitions, backend.id, S.WARMING)[0] - starting > 0.8  # port opens after --start-delay


async def test_without_warm_up_health_alone_makes_it_ready() -> None:
    async with running(make_config(gpus=["0"], warmup={"enabled": False})) as w:
        backend = w.pool.backends[0]
        assert await w.pool.wait_ready(10)
        assert w.states(backend.id) == [S.STARTING, S.READY]
        assert stats(backend.url)["tts_received"] == 0 and backend.model_key is None


async def test_a_failing_warm_up_is_a_failed_start_and_ends_in_a_crash_loop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="glmtts_sidecar.pool")
    config = make_config([*EMULATOR, "--fail-status", "500"], gpus=["0"], backoff_initial_s=0.05,
                         crash_loop={"max_failures": 1, "window_s": 30.0, "cooldown_s": 60.0})
    async with running(config) as w:
        backend = w.pool.backends[0]
        await until(lambda: backend.state is S.FAILED)
        assert w.states(backend.id) == [S.STARTING, S.WARMING, S.RESTARTING, S.STARTING, S.WARMING, S.FAILED]
        assert backend.last_error == "warm-up answered HTTP 500: Inference failed: emulated fault"
        assert backend.pid is None and len(w.pids) == 2
        assert any("crash loop: 2 failures within 30 s, restart #2 in 60 s" in r.getMessage() for r in caplog.records)
        began = time.monotonic()
    assert time.monotonic() - began < 1.0  # the cooldown does not hold up stop()
    for pid in w.pids:
        assert_gone(pid)


async def test_a_crash_at_start_up_backs_off_fails_cools_down_and_starts_afresh() -> None:
    config = make_config(EXIT_AT_ONCE, gpus=["0"], env={"UNUSED_PORT": "{port}"}, backoff_initial_s=0.05,
                         backoff_max_s=0.2, crash_loop={"max_failures": 3, "window_s": 10.0, "cooldown_s": 1.0})
    cpu_before = time.process_time()
    async with running(config) as w:
        backend = w.pool.backends[0]
        await until(lambda: backend.state is S.FAILED, timeout=5)
        assert w.states(backend.id) == [S.STARTING, S.RESTARTING] * 3 + [S.STARTING, S.FAILED]
        assert backend.restarts == 4 and backend.last_error == "exited with code 3"
        await asyncio.sleep(1.4)  # the cooldown, then a new round with a fresh backoff
        after = w.states(backend.id)[8:]
        assert after[:2] == [S.STARTING, S.RESTARTING], after
        failed_at = since(w.transitions, backend.id, S.FAILED)[0]
        restarted_at = since(w.transitions, backend.id, S.STARTING)[4]
        assert 0.9 < restarted_at - failed_at < 1.3
        retry_at = since(w.transitions, backend.id, S.STARTING)[5]
        assert retry_at - since(w.transitions, backend.id, S.RESTARTING)[3] < 0.2  # backoff from 0.05 s again
    cpu = time.process_time() - cpu_before
    assert len(w.pids) <= 9, len(w.pids)  # 4 spawns, 1 s of cooldown, then at most 4 more
    assert cpu < 1.0, f"the pool used {cpu:.2f} s of CPU"
    for pid in w.pids:
        assert_gone(pid)


async def test_an_unresponsive_backend_with_requests_in_flight_is_killed_and_restarted() -> None:
    config = make_config([*EMULATOR, "--hang-after", "1"], gpus=["0"], interval_s=0.1, timeout_s=0.3, fall=2,
                         start_timeout_s=20.0, stop_grace_s=5.0, watchdog={"unresponsive_s": 0.5})
    async with running(config) as w:
        backend = w.pool.backends[0]
        assert await w.pool.wait_ready(10)  # the warm-up was request 1
        first_pid = backend.pid
        assert first_pid is not None
        content_type, body = multipart(("input_text", "你好"), ("index", "exampleA"))
        hung = asyncio.ensure_future(asyncio.to_thread(
            http, "POST", backend.url + "/api/v1/tts", body=body, headers={"Content-Type": content_type}, timeout=20))
        try:
            await until(lambda: backend.state is S.UNHEALTHY, timeout=5)
            await asyncio.sleep(1.0)  # unhealthy but idle: nothing stuck, it waits for start_timeout_s
            assert backend.pid == first_pid and backend.restarts == 0
            backend.in_flight = 1  # as the proxy counts the hung request
            began = time.monotonic()
            await until(lambda: backend.state is S.RESTARTING, timeout=5)
            assert time.monotonic() - began < 2.0
            backend.in_flight = 0
            assert backend.last_error is not None
            assert backend.last_error.startswith("unresponsive: health failing for ")
            assert backend.last_error.endswith("with 1 request(s) in flight (killed by SIGKILL)")
            await until(lambda: backend.state is S.READY, timeout=10)
            assert backend.pid not in (None, first_pid) and backend.restarts == 1
            assert_gone(first_pid)
            with pytest.raises(OSError):
                await hung  # its connection died with the process
        finally:
            backend.in_flight = 0
            with contextlib.suppress(OSError):
                await hung


async def test_outliers_are_ejected_for_a_while_but_never_the_last_ready_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="glmtts_sidecar.pool")
    config = make_config(gpus=["0", "1"], interval_s=0.1,
                         outlier={"consecutive_failures": 3, "base_ejection_s": 0.5, "max_ejection_s": 5.0})
    async with running(config) as w:
        pool = w.pool
        assert await pool.wait_ready(10, count=2)
        first, second = pool.backends
        pids = [first.pid, second.pid]
        for _ in range(3):
            pool.report_outcome(first, ok=False, latency_ratio=None)
        assert first.state is S.UNHEALTHY and first.outlier == "3 requests failed in a row"
        ejected_at = time.monotonic()
        for _ in range(3):
            pool.report_outcome(second, ok=True, latency_ratio=10.0)  # slow, but it is the last one ready
        for _ in range(2):
            pool.report_outcome(second, ok=True, latency_ratio=10.0)
        assert second.state is S.READY
        assert second.outlier == "median latency 10.0x its prediction over its last 5 requests (limit 4x)"
        assert second.as_json()["outlier"] == second.outlier
        assert f"backend gpu1-0: outlier ({second.outlier}) but it is the last ready backend; keeping it in rotation" \
            in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        await until(lambda: first.state is S.READY, timeout=3)
        assert 0.45 < time.monotonic() - ejected_at < 1.5 and first.outlier is None
        pool.report_outcome(second, ok=True, latency_ratio=10.0)  # now another is ready: out it goes
        assert second.state is S.UNHEALTHY
        await until(lambda: second.state is S.READY, timeout=3)
        for _ in range(3):
            pool.report_outcome(first, ok=False, latency_ratio=None)  # its second ejection is twice as long
        assert any(m.endswith("(ejected as an outlier: 3 requests failed in a row; for 1 s)")
                   for m in (r.getMessage() for r in caplog.records))
        assert [first.pid, second.pid] == pids and first.restarts == second.restarts == 0


async def test_an_external_backend_is_warmed_up_and_a_failed_warm_up_is_retried() -> None:
    with emulator("--fail-status", "500", "--fail-count", "1") as service:
        async with running(make_config(gpus=[], external=[service.url], interval_s=0.2)) as w:
            backend = w.pool.backends[0]
            assert await w.pool.wait_ready(10)
            assert w.states(backend.id) == [S.STARTING, S.WARMING, S.UNHEALTHY, S.WARMING, S.READY]
            assert backend.restarts == 0 and backend.pid is None
            assert stats(service.url)["tts_received"] == 2
            assert backend.model_key == (24000, False)


async def test_restart_backend_drains_first_and_kill_backend_kills_at_once() -> None:
    async with running(make_config(gpus=["0", "1"], stop_grace_s=5.0)) as w:
        pool = w.pool
        assert await pool.wait_ready(10, count=2)
        first, second = pool.backends
        old_pid = first.pid
        assert old_pid is not None
        first.in_flight = 1
        restart = asyncio.ensure_future(pool.restart_backend(first.id, drain_timeout_s=30.0))
        try:
            await until(lambda: first.state is S.DRAINING)
            assert pool.ready() == [second]
            await asyncio.sleep(0.3)  # while a request is in flight it stays draining, however long
            assert first.state is S.DRAINING and first.pid == old_pid and not pid_gone(old_pid)
            first.in_flight = 0
            await asyncio.wait_for(restart, 15)
        finally:
            first.in_flight = 0
            restart.cancel()
        assert first.state is S.READY and first.pid not in (None, old_pid)
        assert w.states(first.id)[-5:] == [S.READY, S.DRAINING, S.STARTING, S.WARMING, S.READY]
        assert_gone(old_pid)
        assert stats(first.url)["tts_received"] == 1 and stats(first.url)["pid"] == first.pid

        second.in_flight = 1  # never finishes: the drain gives up after drain_timeout_s
        began = time.monotonic()
        await pool.restart_backend(second.id, drain_timeout_s=0.3)
        assert time.monotonic() - began > 0.3 and second.state is S.READY
        second.in_flight = 0
        with pytest.raises(KeyError):
            await pool.restart_backend("gpu7-0", drain_timeout_s=1.0)

        killed_pid = first.pid
        assert killed_pid is not None
        pool.kill_backend(first, "request ran 120 s past its prediction")
        assert first.state is S.UNHEALTHY  # out of rotation at once
        await until(lambda: first.state is S.READY and first.pid != killed_pid)
        assert first.last_error == "request ran 120 s past its prediction (killed by SIGKILL)"
        assert_gone(killed_pid)


async def test_apply_grows_and_shrinks_the_pool_keeping_unchanged_backends_running() -> None:
    base = free_ports(3)
    two = make_config(gpus=["0", "1"], base_port=base)
    three = make_config(gpus=["0", "1", "2"], base_port=base, warmup={"sample_rate": 32000})
    async with running(two) as w:
        pool = w.pool
        assert await pool.wait_ready(10, count=2)
        pids = {b.id: b.pid for b in pool.backends}
        w.ready.clear()
        await pool.apply(three, drain_timeout_s=5.0)
        assert [(b.id, b.spec.port, b.state) for b in pool.backends] == [
            ("gpu0-0", base, S.READY), ("gpu1-0", base + 1, S.READY), ("gpu2-0", base + 2, S.READY)]
        assert {b.id: b.pid for b in pool.backends if b.id != "gpu2-0"} == pids
        added = pool.backends[2]
        assert added.pid not in pids.values() and added.model_key == (32000, False)  # the new warm-up settings
        assert min(w.ready) == 2
        w.ready.clear()
        await pool.apply(two, drain_timeout_s=5.0)
        assert [(b.id, b.spec.port, b.pid) for b in pool.backends] == [
            ("gpu0-0", base, pids["gpu0-0"]), ("gpu1-0", base + 1, pids["gpu1-0"])]
        assert pool.get("gpu2-0") is None and min(w.ready) == 2
        assert w.states("gpu2-0")[-4:] == [S.READY, S.DRAINING, S.STOPPING, S.STOPPED]
        assert added.pid is None
        for pid in w.pids - set(pids.values()):
            assert_gone(pid)


async def test_apply_moves_backends_onto_ports_still_in_use_and_replaces_changed_launches() -> None:
    base = free_ports(3)
    old = make_config(gpus=["0", "1"], base_port=base)
    shifted = make_config(gpus=["0", "1"], base_port=base + 1)
    async with running(old) as w:
        pool = w.pool
        assert await pool.wait_ready(10, count=2)
        old_pids = {b.pid for b in pool.backends}
        w.ready.clear()
        await pool.apply(shifted, drain_timeout_s=5.0)
        assert [(b.id, b.spec.port, b.state) for b in pool.backends] == [
            ("gpu0-0", base + 1, S.READY), ("gpu1-0", base + 2, S.READY)]
        assert not old_pids & {b.pid for b in pool.backends}
        assert min(w.ready) == 1  # one at a time: gpu1-0 moves first and frees the port gpu0-0 needs
        for pid in old_pids:
            assert_gone(pid)

        moved_pids = {b.pid for b in pool.backends}
        reseeded = make_config([*EMULATOR, "--seed", "7"], gpus=["0", "1"], base_port=base + 1)
        await pool.apply(reseeded, drain_timeout_s=5.0)  # same ports, new command: replaced in place
        assert [(b.id, b.spec.port, b.state) for b in pool.backends] == [
            ("gpu0-0", base + 1, S.READY), ("gpu1-0", base + 2, S.READY)]
        assert not moved_pids & {b.pid for b in pool.backends}
