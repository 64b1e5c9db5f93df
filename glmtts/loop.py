"""The event loop our servers run on (uvloop where installed, a core dependency, else asyncio's),
and ``wait_for``: ``asyncio.wait_for`` that never loses a cancellation.

Before Python 3.12, ``asyncio.wait_for`` returns the awaited result when the task running it is
cancelled in the same loop turn as that awaitable completes (an event set just before a
shutdown cancels its waiter, say): the cancellation is lost, and a loop that only a
cancellation stops (a watcher, a claim loop) then runs on, so that its owner's close waits
forever. Python 3.12 rebuilt ``wait_for`` on ``asyncio.timeout`` and cancels reliably; there
``wait_for`` here is the standard one. The package code calls this one (ruff's TID251 bans
``asyncio.wait_for`` there).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["new_event_loop", "wait_for"]

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def wait_for(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``awaitable``'s result, or ``asyncio.TimeoutError`` after ``timeout`` seconds (None: no
    limit), as ``asyncio.wait_for``: on a timeout or a cancellation the awaitable is cancelled and
    has finished when this returns or raises. A cancellation of the caller always raises
    CancelledError, even when it comes as the awaitable completes."""
    if sys.version_info >= (3, 12):
        return await asyncio.wait_for(awaitable, timeout)  # noqa: TID251 (reliable from 3.12 on)
    if timeout is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    try:
        if timeout > 0:
            await asyncio.wait({task}, timeout=timeout)
        if task.done():
            return task.result()
        task.cancel()  # the time is up (with none left, a coroutine is cancelled before it starts)
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait({task})  # not running once this raises (a second cancellation ends the wait)
        if task.done() and not task.cancelled():
            task.exception()  # its outcome goes with the cancellation (retrieved, so never logged as lost)
        raise
    if task.cancelled():
        raise asyncio.TimeoutError
    return task.result()  # it answered its cancellation with a result (or an exception)
