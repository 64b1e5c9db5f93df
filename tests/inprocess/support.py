"""What the in-process tests share: waiting for a condition, and checking nothing is left taken."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from scheduler.runtime.context import Runtime

# In-process emulators scale upstream's own timeouts no lower than this (EmulatorOptions.time_scale),
# whatever their synthesis time scale: at 0.01 a short text's timeout is 0.6 s, which a loaded CI
# machine running the sidecar, the emulator and the test on one event loop can exceed.
UPSTREAM_TIMEOUT_SCALE = 0.1


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 10.0,
                interval: float = 0.01) -> None:
    """Poll ``check`` (plain or async) until it holds; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)


async def assert_nothing_held(runtime: Runtime) -> None:
    """Every slot given back and nothing queued or in service (the dispatcher may take a moment)."""
    await until(runtime.dispatcher.idle, "the dispatcher to be idle")
    assert [b.in_flight for b in runtime.pool.backends] == [0] * len(runtime.pool.backends)
    assert len(runtime.scheduler.queue) == 0
    assert not runtime.scheduler.running
