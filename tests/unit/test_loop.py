"""glmtts.loop.wait_for: asyncio.wait_for's contract, and a cancellation is never lost.

Before Python 3.12, asyncio.wait_for returns the awaited result when the task running it is
cancelled in the same loop turn as the awaitable completes: a loop that only a cancellation ends
(RedisLink's watcher waiting on its event, say) then runs on and its owner's close waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from glmtts.loop import wait_for

Waiter = Callable[[Awaitable[Any], float | None], Awaitable[Any]]


async def watcher_cancelled_as_its_event_is_set(waiter: Waiter, turns: int, patience: float) -> bool:
    """A loop waiting on an event the way a watcher does; the event is set, ``turns`` loop turns
    pass, and the loop's task is cancelled. Whether the task ended within ``patience`` seconds
    (False: it runs on; a task that ends does so within a few loop turns)."""
    event = asyncio.Event()
    started = asyncio.Event()

    async def watch() -> None:
        while True:
            event.clear()
            started.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await waiter(event.wait(), 30.0)

    task = asyncio.ensure_future(watch())
    await started.wait()
    event.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=patience)
    if not done:
        task.cancel()  # asyncio's wait_for lost the first one: end it for good
        await asyncio.wait({task}, timeout=5.0)
        return False
    assert task.cancelled()
    return True


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 4])
async def test_a_cancellation_that_comes_as_the_awaited_event_is_set_ends_the_loop(turns: int) -> None:
    assert await watcher_cancelled_as_its_event_is_set(wait_for, turns, patience=10.0)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for cancels reliably from Python 3.12 on")
async def test_asyncio_wait_for_before_3_12_loses_that_cancellation() -> None:
    # Why glmtts.loop.wait_for exists (and ruff bans asyncio.wait_for in the packages).
    ended = [await watcher_cancelled_as_its_event_is_set(asyncio.wait_for, turns, patience=0.2) for turns in range(5)]
    assert not all(ended)


async def test_the_result_and_the_exception_come_through() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("no")

    assert await wait_for(answer(), 5.0) == 42
    assert await wait_for(answer(), None) == 42
    with pytest.raises(ValueError, match="no"):
        await wait_for(fail(), 5.0)


async def test_on_a_timeout_the_awaitable_is_cancelled_and_finished() -> None:
    finished: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            finished.append("cleaned up")

    with pytest.raises(asyncio.TimeoutError):
        await wait_for(forever(), 0.01)
    assert finished == ["cleaned up"]


@pytest.mark.parametrize("timeout", [0.0, -1.0])
async def test_no_time_left_times_out_without_running_the_awaitable(timeout: float) -> None:
    ran: list[bool] = []

    async def body() -> None:
        ran.append(True)

    with pytest.raises(asyncio.TimeoutError):
        await wait_for(body(), timeout)
    assert ran == []


async def test_an_awaitable_that_answers_its_cancellation_gives_its_answer() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "answered anyway"
        return "never"

    assert await wait_for(stubborn(), 0.01) == "answered anyway"  # as asyncio.wait_for does


async def test_cancelling_the_caller_cancels_the_awaitable_first() -> None:
    finished: list[str] = []
    entered = asyncio.Event()

    async def inner() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # its cleanup takes a turn: the caller still waits for it
            finished.append("inner")

    async def caller() -> None:
        try:
            await wait_for(inner(), 30.0)
        finally:
            finished.append("caller")

    task = asyncio.ensure_future(caller())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == ["inner", "caller"]


async def test_an_exception_that_comes_with_the_cancellation_is_not_reported_as_lost() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        future: asyncio.Future[None] = loop.create_future()
        entered = asyncio.Event()

        async def inner() -> None:
            entered.set()
            await future

        task = asyncio.ensure_future(wait_for(inner(), 30.0))
        await entered.wait()
        future.set_exception(ValueError("at the same time"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [c for c in reported if "never retrieved" in str(c.get("message"))] == []
