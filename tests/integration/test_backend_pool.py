"""The backend pool against real processes on loopback: emulators, crashing commands, a dying parent."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backend.pool import BackendPool
from backend.state import BackendState
from scheduler.config import BackendsConfig, parse_config
from tests.support import ROOT, emulator, free_ports, http, pid_gone

S = BackendState
EMULATOR = ["{python}", "-m", "glmtts.emulator", "--port", "{port}", "--time-scale", "0.01"]


def make_config(
    command: Sequence[str] = EMULATOR, *, gpus: Sequence[str] = ("0", "1"), env: dict[str, str] | None = None,
    external: Sequence[str] = (), interval_s: float = 0.1, timeout_s: float = 1.0, start_timeout_s: float = 10.0,
    backoff_initial_s: float = 0.1, backoff_max_s: float = 1.0, stop_grace_s: float = 3.0,
    rise: int = 2, fall: int = 3, base_port: int | None = None, crash_loop: dict[str, float] | None = None,
    **sections: object,
) -> BackendsConfig:
    """A pool config on free loopback ports; `sections`: more `backends` keys (warmup, outlier, ...)."""
    backends = {
        "command": list(command), "gpus": list(gpus), "env": env or {}, "external": list(external),
        "base_port": base_port or free_ports(max(len(gpus), 1)),
        "health": {"interval_s": interval_s, "timeout_s": timeout_s, "start_timeout_s": start_timeout_s,
                   "rise": rise, "fall": fall},
        "restart": {"backoff_initial_s": backoff_initial_s, "backoff_max_s": backoff_max_s,
                    "crash_loop": crash_loop or {}},
        "stop_grace_s": stop_grace_s, **sections,
    }
    return parse_config(json.dumps({"listen": {"port": 0}, "backends": backends})).backends


@dataclass
class Watched:
    """A started pool plus what it did: every transition (id, state, since), every pid it had, and
    how many backends were ready after each change."""

    pool: BackendPool
    transitions: list[tuple[str, BackendState, float]] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    ready: list[int] = field(default_factory=list)
    _last: dict[str, BackendState] = field(default_factory=dict)

    def record(self) -> None:
        self.ready.append(len(self.pool.ready()))
        for b in self.pool.backends:
            if b.pid is not None:
                self.pids.add(b.pid)
            if self._last.get(b.id) is not b.state:
                self._last[b.id] = b.state
                self.transitions.append((b.id, b.state, b.since))

    def states(self, backend_id: str) -> list[BackendState]:
        return [state for bid, state, _ in self.transitions if bid == backend_id]


@contextlib.asynccontextmanager
async def running(config: BackendsConfig, *, log_output: bool = False) -> AsyncIterator[Watched]:
    pool = BackendPool(config, log_output=log_output, on_change=lambda: watched.record())
    watched = Watched(pool)
    watched.record()
    try:
        await pool.start()
        watched.record()
        yield watched
    finally:
        await pool.stop()
        for pid in watched.pids:  # only if the pool failed at its job; the test then fails below
            if not pid_gone(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie


async def test_two_backends_get_ready_restart_after_sigkill_and_stop_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="glmtts_sidecar")
    async with running(make_config(), log_output=True) as w:
        pool = w.pool
        first, second = pool.backends
        assert first.state is S.STARTING and first.pid is not None and second.pid is not None
        assert await pool.wait_ready(15, count=2)
        assert [b.as_json()["state"] for b in pool.backends] == ["ready", "ready"]
        old_pid, other_pid = first.pid, second.pid
        assert old_pid != other_pid

        os.kill(old_pid, signal.SIGKILL)
        await until(lambda: first.state is S.READY and first.pid not in (None, old_pid))
        assert first.restarts == 1 and first.last_error == "killed by SIGKILL"
        assert w.states(first.id) == [S.STARTING, S.WARMING, S.READY, S.RESTARTING, S.STARTING, S.WARMING, S.READY]
        assert second.pid == other_pid and second.restarts == 0 and second.state is S.READY
        assert_gone(old_pid)
        pids = [first.pid, second.pid]
    assert {b.state for b in pool.backends} == {S.STOPPED} and all(b.pid is None for b in pool.backends)
    for pid in [*pids, old_pid]:
        assert_gone(pid)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("[gpu0-0] ======== Running on") for m in messages)
    assert any(m.startswith("backend gpu0-0: ready -> restarting (killed by SIGKILL") for m in messages)
    assert any(m.startswith("backend gpu1-0: starting -> warming (health ok after") for m in messages)
    assert any(m.startswith("backend gpu1-0: warming -> ready (warmed up in") for m in messages)


async def test_slow_start_stays_starting_until_the_port_opens() -> None:
    async with running(make_config([*EMULATOR, "--start-delay", "1.0"], gpus=["0"])) as w:
        backend = w.pool.backends[0]
        await asyncio.sleep(0.7)  # the behaviour: still starting 0.7 s in, with a 1 s start delay
        assert backend.state is S.STARTING and backend.restarts == 0
        began = time.monotonic()
        assert await w.pool.wait_ready(10)
        assert time.monotonic() - began > 0.1
        assert w.states(backend.id) == [S.STARTING, S.WARMING, S.READY]


async def test_a_command_that_exits_at_once_backs_off_with_growing_delays() -> None:
    config = make_config(["{python}", "-c", "import sys; sys.exit(3)"], gpus=["0"], env={"UNUSED_PORT": "{port}"},
                         backoff_initial_s=0.1, backoff_max_s=10.0)
    cpu_before = time.process_time()
    async with running(config) as w:
        await asyncio.sleep(2.0)  # the window the spawns are counted in
        backend = w.pool.backends[0]
        spawns = sum(1 for bid, state, _ in w.transitions if state is S.STARTING)
        assert backend.last_error == "exited with code 3"
    cpu = time.process_time() - cpu_before
    # Nominal delays 0.1, 0.2, 0.4, 0.8 (±20%): five spawns in 2 s, not hundreds.
    assert 3 <= spawns <= 7, w.transitions
    assert cpu < 1.0, f"the pool used {cpu:.2f} s of CPU in 2 s"
    times = [since for _, state, since in w.transitions if state in (S.RESTARTING, S.STARTING)]
    waits = [times[i + 1] - times[i] for i in range(1, len(times) - 1, 2)]  # RESTARTING -> next STARTING
    assert len(waits) >= 2 and all(b > a for a, b in itertools.pairwise(waits)), waits
    assert waits[0] < 0.3
    for pid in w.pids:
        assert_gone(pid)


async def test_stop_is_prompt_during_a_backoff_sleep() -> None:
    config = make_config(["{python}", "-c", "pass"], gpus=["0"], env={"P": "{port}"},
                         backoff_initial_s=30.0, backoff_max_s=30.0)
    async with running(config) as w:
        await until(lambda: w.pool.backends[0].state is S.RESTARTING)
        began = time.monotonic()
    assert time.monotonic() - began < 1.0
    assert w.pool.backends[0].state is S.STOPPED


async def test_a_backend_ignoring_sigterm_is_killed_after_the_grace_with_its_children() -> None:
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child_pids: list[int] = []
    logger = logging.getLogger("glmtts_sidecar.backend")

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            words = record.getMessage().split()
            if words[1:2] == ["child"]:
                child_pids.append(int(words[2]))

    handler = Grab()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        config = make_config(["{python}", "-c", script], gpus=["0"], env={"P": "{port}"}, stop_grace_s=0.5)
        async with running(config, log_output=True) as w:
            await until(lambda: bool(child_pids))
            leader = w.pool.backends[0].pid
            assert leader is not None
            began = time.monotonic()
        assert 0.4 < time.monotonic() - began < 3.0
        assert_gone(leader)
        await until(lambda: pid_gone(child_pids[0]), timeout=3.0)  # the group went with it
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        for pid in child_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_backend_never_healthy_is_restarted_after_the_start_timeout() -> None:
    config = make_config([*EMULATOR, "--hang"], gpus=["0"], timeout_s=0.2, start_timeout_s=1.0,
                         stop_grace_s=0.5)
    async with running(config) as w:
        backend = w.pool.backends[0]
        first_pid = backend.pid
        await until(lambda: backend.restarts >= 1, timeout=5.0)
        assert backend.last_error is not None
        assert backend.last_error.startswith("no healthy answer within 1 s (health timed out")
        assert w.states(backend.id)[:2] == [S.STARTING, S.RESTARTING]
        assert first_pid is not None
        assert_gone(first_pid)


async def test_a_backend_that_hangs_after_ready_is_restarted_once_unhealthy_too_long() -> None:
    config = make_config(gpus=["0"], interval_s=0.05, timeout_s=0.2, start_timeout_s=1.0, stop_grace_s=0.5)
    async with running(config) as w:
        backend = w.pool.backends[0]
        assert await w.pool.wait_ready(10)
        first_pid = backend.pid
        await asyncio.to_thread(http, "POST", f"{backend.url}/emulator/faults", body=b'{"hang": true}',
                                headers={"Content-Type": "application/json"})
        await until(lambda: backend.state is S.READY and backend.pid != first_pid, timeout=8.0)
        assert w.states(backend.id) == [S.STARTING, S.WARMING, S.READY, S.UNHEALTHY, S.RESTARTING, S.STARTING,
                                        S.WARMING, S.READY]
        assert backend.restarts == 1
        assert first_pid is not None
        assert_gone(first_pid)


async def test_health_failures_and_proxy_reports_move_between_ready_and_unhealthy() -> None:
    config = make_config([*EMULATOR, "--health-flap", "0.6"], gpus=["0"], interval_s=0.05)
    async with running(config) as w:
        backend = w.pool.backends[0]
        pid = backend.pid
        assert await w.pool.wait_ready(10)
        # Health answers 503 for 0.6 s of every 1.2 s: three failures in a row, then good again.
        await until(lambda: w.states(backend.id)[-3:] == [S.READY, S.UNHEALTHY, S.READY], timeout=5.0)
        assert backend.restarts == 0 and backend.pid == pid
        assert backend.last_error == "health answered HTTP 503"
    w.transitions.clear()

    async with running(make_config(gpus=["0"], interval_s=5.0, rise=1)) as w:
        backend = w.pool.backends[0]
        assert await w.pool.wait_ready(10)
        w.pool.report_failure(backend, "connection reset")
        assert backend.state is S.UNHEALTHY and backend.last_error == "connection reset"
        # The supervisor re-checks now rather than after interval_s (5 s).
        await until(lambda: backend.state is S.READY, timeout=2.0)


async def test_an_external_backend_is_only_health_checked() -> None:
    with emulator() as service:
        config = make_config(gpus=[], external=[service.url], interval_s=0.05)
        async with running(config) as w:
            backend = w.pool.backends[0]
            assert backend.id == "ext-0" and backend.pid is None
            assert await w.pool.wait_ready(10)
            await asyncio.to_thread(service.stop)
            await until(lambda: backend.state is S.UNHEALTHY, timeout=5.0)
            await asyncio.sleep(0.3)  # six health intervals in which nothing may restart it
            assert backend.state is S.UNHEALTHY and backend.restarts == 0 and backend.pid is None


PARENT = """
import asyncio, sys
from backend.pool import BackendPool
from scheduler.config import parse_config

async def main():
    pool = BackendPool(parse_config(sys.argv[1]).backends, log_output=False)
    await pool.start()
    assert await pool.wait_ready(20)
    print(pool.backends[0].pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_backends_die_with_a_sigkilled_parent() -> None:
    config = make_config(gpus=["0"])
    text = json.dumps({"listen": {"port": 0}, "backends": config.model_dump(mode="json")})
    parent = subprocess.Popen([sys.executable, "-c", PARENT, text], cwd=ROOT, stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    backend_pid: int | None = None
    try:
        assert parent.stdout is not None
        readable, _, _ = select.select([parent.stdout], [], [], 20)
        assert readable, "the parent did not report its backend"
        backend_pid = int(parent.stdout.readline())
        os.kill(backend_pid, 0)  # alive
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 5
        while not pid_gone(backend_pid):
            assert time.monotonic() < deadline, "the backend outlived its parent"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(5)
        if parent.stdout is not None:
            parent.stdout.close()
        if backend_pid is not None and not pid_gone(backend_pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(backend_pid, signal.SIGKILL)

