"""One connection to the cluster's Redis per sidecar (``tasks.store`` a redis:// or rediss:// URL).

The shared async tasks (scheduler.runtime.taskstore.redis_store) and the cluster-wide tenant rates
read and write through ``RedisLink.client``. ``up`` says whether Redis answered lately: a caller
that sees a command fail reports it (``failed``), and a background watcher then reconnects with
exponential backoff (doubling up to ``reconnect_max_s``) until a PING answers again; while up,
it PINGs now and then so that a Redis gone quiet is noticed without traffic. Nothing here retries
a command for its caller: a command that fails is the caller's to answer (503, a later attempt).

Redis must not evict: a task's record or body evicted to make room would be a task lost without
a trace. ``check_noeviction`` reads ``maxmemory-policy`` (CONFIG GET, or INFO memory where CONFIG
is not allowed, as on managed services) and raises ``EvictingRedis`` for anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from glmtts.loop import wait_for
from scheduler.config import TasksConfig

__all__ = ["COMMAND_HEADROOM_S", "EvictingRedis", "RedisLink"]

log = logging.getLogger("glmtts_sidecar.redis")

NOEVICTION = "noeviction"
FIRST_BACKOFF_S = 0.1  # the first wait before reconnecting; doubles up to reconnect_max_s
PING_INTERVAL_S = 1.0  # while up: how often the watcher checks that Redis still answers
# A command may take this much longer than connecting (a blocking read waits up to a second).
COMMAND_HEADROOM_S = 3.0


class EvictingRedis(Exception):
    """Redis may evict keys (its ``maxmemory-policy`` is not noeviction): tasks would be lost."""


class RedisLink:
    """The sidecar's one ``redis.asyncio.Redis`` (``client``, a pool of connections) and whether
    Redis answers (``up``). ``open`` never fails for a Redis that is down: it comes up later."""

    def __init__(self, url: str, *, connect_timeout_s: float = 2.0, reconnect_max_s: float = 30.0,
                 ping_interval_s: float = PING_INTERVAL_S) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self.ping_interval_s = ping_interval_s
        # One retry, at once, on a broken connection only: a pooled connection Redis closed when it
        # restarted fails once and is replaced. A timeout is never retried (Redis is slow or gone).
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=connect_timeout_s + COMMAND_HEADROOM_S,
            retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError], health_check_interval=0)
        self.up = False
        self._changed = asyncio.Event()  # set whenever ``up`` changes or a failure is reported
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: TasksConfig) -> RedisLink | None:
        """The link ``tasks.store`` names, or None when tasks are kept in SQLite."""
        url = config.redis_url()
        if url is None:
            return None
        return cls(url, connect_timeout_s=config.redis.connect_timeout_s,
                   reconnect_max_s=config.redis.reconnect_max_s)

    async def open(self) -> None:
        """Try Redis once, then watch it in the background (reconnecting while it is down)."""
        await self._ping()
        if not self.up:
            log.error("Redis does not answer; async tasks are unavailable until it does (retrying in the background)")
        self._watcher = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
        self._set_up(False)

    def failed(self, exc: BaseException) -> None:
        """A caller's command failed on the connection (not a refusal by Redis): Redis is taken as
        down, and the watcher reconnects."""
        if self.up:
            log.error("Redis connection lost: %s", exc)
        self._set_up(False)

    async def wait_up(self, timeout: float | None = None) -> bool:
        """Whether Redis is up, waiting up to ``timeout`` seconds (None: as long as it takes)."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while not self.up:
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self._changed.wait(), left)
        return True

    async def check_noeviction(self) -> None:
        """EvictingRedis unless Redis's maxmemory-policy is noeviction; RedisError when it cannot be read."""
        policy = await self._eviction_policy()
        if policy != NOEVICTION:
            raise EvictingRedis(
                f"Redis's maxmemory-policy is {policy!r}: it may evict task records and bodies under memory "
                f"pressure, losing accepted tasks; set maxmemory-policy {NOEVICTION} (redis.conf or CONFIG SET)")

    async def _eviction_policy(self) -> str:
        try:
            found: dict[Any, Any] = await self.client.config_get("maxmemory-policy")
        except ResponseError:  # CONFIG disabled or renamed (managed Redis): INFO says it too
            found = {}
        value = found.get("maxmemory-policy", found.get(b"maxmemory-policy"))
        if value is None:
            info: dict[Any, Any] = await self.client.info("memory")
            value = info.get("maxmemory_policy")
            if value is None:
                raise EvictingRedis("Redis does not tell its maxmemory-policy (neither CONFIG GET nor INFO memory); "
                                    f"it must be {NOEVICTION}")
        return value.decode() if isinstance(value, bytes) else str(value)

    # --- watching ------------------------------------------------------------------------------

    def _set_up(self, up: bool) -> None:
        if up and not self.up:
            log.info("Redis is up")
        self.up = up
        self._changed.set()

    async def _ping(self) -> bool:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            if self.up:
                log.error("Redis does not answer: %s", exc)
            self._set_up(False)
            return False
        self._set_up(True)
        return True

    async def _watch(self) -> None:
        """While up, PING every ``ping_interval_s`` (or at once when a caller reports a failure);
        while down, reconnect after 0.1 s, 0.2 s, ... up to ``reconnect_max_s``. Always sleeps
        between attempts: never a busy loop."""
        backoff = FIRST_BACKOFF_S
        while True:
            if self.up:
                backoff = FIRST_BACKOFF_S
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await wait_for(self._changed.wait(), self.ping_interval_s)
                if self.up:
                    await self._ping()
                continue
            # Connections of the pool may be broken (Redis restarted): start afresh.
            with contextlib.suppress(RedisError, OSError):
                await self.client.connection_pool.disconnect()
            if await self._ping():
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.reconnect_max_s)
