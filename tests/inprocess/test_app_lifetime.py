"""The app's lifetime: one cleanup context per resource, so a start that fails half way still
closes what had started before it (the backend client's session, the loop-lag probe) and never
touches what had not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from backend.pool import BackendPool
from scheduler.config import SidecarConfig, parse_config
from scheduler.http.app import build_app
from scheduler.runtime.looplag import LoopLagProbe
from scheduler.runtime.tasks import TaskService

CONFIG = "backends: {gpus: [], external: ['http://127.0.0.1:9']}\nadmin: {token: admin-token-0123456789abcdef}\n"


class PoolStartFailed(RuntimeError):
    pass


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[aiohttp.ClientSession]]:
    """Every aiohttp client session opened meanwhile."""
    opened: list[aiohttp.ClientSession] = []
    init = aiohttp.ClientSession.__init__

    def recording(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(aiohttp.ClientSession, "__init__", recording)
    yield opened


def lag_probes_running() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if not t.done()
            and getattr(t.get_coro(), "__qualname__", "") == LoopLagProbe._run.__qualname__]


def config(state_dir: Path) -> SidecarConfig:
    return parse_config(CONFIG + f"tasks: {{state_dir: {json.dumps(str(state_dir))}}}\n")


async def test_a_pool_that_fails_to_start_leaves_no_session_and_no_probe(
        monkeypatch: pytest.MonkeyPatch, sessions: list[aiohttp.ClientSession], tmp_path: Path) -> None:
    started: list[str] = []
    stopped: list[str] = []
    probe_start, probe_stop = LoopLagProbe.start, LoopLagProbe.stop

    def start_probe(self: LoopLagProbe) -> None:
        started.append("lag")
        probe_start(self)

    async def stop_probe(self: LoopLagProbe) -> None:
        stopped.append("lag")
        await probe_stop(self)

    async def fail(self: BackendPool) -> None:
        started.append("pool")
        raise PoolStartFailed("no backend can start")

    async def pool_stop(self: BackendPool) -> None:
        stopped.append("pool")

    async def tasks_start(self: TaskService) -> None:
        started.append("tasks")

    monkeypatch.setattr(LoopLagProbe, "start", start_probe)
    monkeypatch.setattr(LoopLagProbe, "stop", stop_probe)
    monkeypatch.setattr(BackendPool, "start", fail)
    monkeypatch.setattr(BackendPool, "stop", pool_stop)
    monkeypatch.setattr(TaskService, "start", tasks_start)
    runner = web.AppRunner(build_app(config(tmp_path)))
    with pytest.raises(PoolStartFailed):
        await runner.setup()
    assert started == ["lag", "pool"] and lag_probes_running() and sessions
    await runner.cleanup()  # what web.run_app does after a failed start
    assert sessions and all(s.closed for s in sessions), sessions
    assert lag_probes_running() == []
    # The pool's own cleanup is the one that stops what its failed start may have spawned.
    assert stopped == ["pool", "lag"]


async def test_a_started_app_closes_everything_in_reverse_order(
        monkeypatch: pytest.MonkeyPatch, sessions: list[aiohttp.ClientSession], tmp_path: Path) -> None:
    events: list[str] = []
    pool_start, pool_stop = BackendPool.start, BackendPool.stop
    tasks_close = TaskService.close

    async def starting(self: BackendPool) -> None:
        events.append("pool started")
        await pool_start(self)

    async def stopping(self: BackendPool) -> None:
        events.append("pool stopped")
        await pool_stop(self)

    async def closing_tasks(self: TaskService) -> None:
        events.append("tasks closed")
        await tasks_close(self)

    monkeypatch.setattr(BackendPool, "start", starting)
    monkeypatch.setattr(BackendPool, "stop", stopping)
    monkeypatch.setattr(TaskService, "close", closing_tasks)
    runner = web.AppRunner(build_app(config(tmp_path)))
    await runner.setup()
    assert events == ["pool started"] and lag_probes_running()
    await runner.cleanup()
    assert events == ["pool started", "tasks closed", "pool stopped"]
    assert sessions and all(s.closed for s in sessions), sessions
    assert lag_probes_running() == []
