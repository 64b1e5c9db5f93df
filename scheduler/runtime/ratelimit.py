"""Tenants' request rates (``tenants.default.rate``, ``tenants.list[].rate``), checked by the intake
once a request is attributed to its tenant.

Without Redis each sidecar keeps one token bucket per tenant (scheduler.core.ratelimit): a tenant
gets its rate from each sidecar. With Redis (``tasks.store`` a redis:// URL) the sidecars of a
cluster share one bucket per tenant under ``{cluster}:rate:{tenant}``, taken by one atomic Lua
script that reads Redis's own clock (``TIME``), so the rate holds cluster-wide whatever the
sidecars' clocks say. The key expires once the bucket would be full again: an idle tenant costs
no memory.

When Redis is down, or slower than ``REDIS_TIMEOUT_S``, each sidecar falls back to its own bucket
at the tenant's full rate (it fails open: during an outage a tenant may get up to N times its
rate across N sidecars) and asks Redis again ``RETRY_REDIS_S`` later, so requests do not each
wait out the timeout. An outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from glmtts.loop import wait_for
from scheduler.config.tenants import RateConfig, TenantsConfig
from scheduler.core.ratelimit import TokenBucket
from scheduler.core.tenants import DEFAULT_TENANT

__all__ = ["REDIS_TIMEOUT_S", "RETRY_REDIS_S", "Link", "LocalRates", "RateLimiter", "RedisRates", "rate_key",
           "rate_of"]

log = logging.getLogger("glmtts_sidecar.ratelimit")

REDIS_TIMEOUT_S = 0.1  # a rate check waits this long for Redis before the local bucket decides
RETRY_REDIS_S = 1.0  # after Redis failed, local buckets decide this long before Redis is asked again
MAX_TTL_MS = 7 * 86400 * 1000  # a bucket slower than this to refill would be no request rate at all

# KEYS[1]: the bucket; ARGV: per_s, burst, the key's TTL in ms. Returns the seconds until a token
# ("0": one was taken). The arithmetic is TokenBucket's (its EPSILON too); numbers are stored with
# 17 digits so they come back exactly.
SCRIPT = """
local per_s = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = tokens + (now - at) * per_s
  at = now
end
if tokens > burst then
  tokens = burst
end
local wait = 0
if tokens >= 1 - 1e-9 then
  tokens = math.max(0, tokens - 1)
else
  wait = (1 - tokens) / per_s
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', at))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return string.format('%.17g', wait)
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


class Link(Protocol):
    """The sidecar's Redis connection as the limiter uses it (scheduler.runtime.redislink.RedisLink)."""

    @property
    def client(self) -> Redis: ...

    @property
    def up(self) -> bool: ...  # False while the link knows Redis to be unreachable

    def failed(self, exc: BaseException) -> None: ...  # a command failed on the connection: Redis may be gone


def rate_key(cluster: str, tenant: str) -> str:
    """The Redis key of a tenant's shared bucket."""
    return f"{cluster}:rate:{tenant}"


def rate_of(tenants: TenantsConfig, name: str) -> RateConfig | None:
    """The configured rate of the tenant called ``name`` (None: unlimited, or no such tenant)."""
    if name == DEFAULT_TENANT:
        return tenants.default.rate
    return next((t.rate for t in tenants.list if t.name == name), None)


class LocalRates:
    """One bucket per tenant in this process. A changed rate (a reload) applies at once, from the
    tenant's last request on (TokenBucket.configure); a tenant whose rate is removed loses its bucket."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, tenant: str, rate: RateConfig | None, now: float) -> float | None:
        """None: allowed; else the seconds until the tenant has a token."""
        if rate is None:
            self._buckets.pop(tenant, None)
            return None
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket(rate.per_s, rate.burst)
        elif (bucket.per_s, bucket.burst) != (rate.per_s, rate.burst):
            bucket.configure(rate.per_s, rate.burst)
        return bucket.take(now)


class RedisRates:
    """Buckets in Redis, one per key, taken by the script (EVALSHA; EVAL when Redis lost its
    script cache, e.g. after a restart, which loads it again)."""

    async def take(self, client: Redis, key: str, rate: RateConfig) -> float | None:
        """None: allowed; else the seconds until the bucket has a token. Raises Redis's errors."""
        ttl_ms = min(MAX_TTL_MS, math.ceil(rate.burst / rate.per_s * 1000) + 1000)
        args = (repr(float(rate.per_s)), str(rate.burst), str(ttl_ms))
        try:
            # redis-py types its commands for the sync and async clients at once; this one is async.
            answer = await cast(Awaitable[Any], client.evalsha(SCRIPT_SHA, 1, key, *args))
        except NoScriptError:
            answer = await cast(Awaitable[Any], client.eval(SCRIPT, 1, key, *args))
        wait = float(answer)
        return wait if wait > 0 else None


class RateLimiter:
    """What the intake asks for every attributed request: may this tenant send one more now?

    ``clock``: monotonic seconds for the local buckets (the dispatcher's). ``redis_timeout_s``: how
    long a request waits for Redis before the local bucket decides; ``retry_redis_s``: how long
    after a failure Redis is left alone."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, redis_timeout_s: float = REDIS_TIMEOUT_S,
                 retry_redis_s: float = RETRY_REDIS_S) -> None:
        self.local = LocalRates()
        self.shared = RedisRates()
        self.clock = clock
        self.redis_timeout_s = redis_timeout_s
        self.retry_redis_s = retry_redis_s
        self._outage_since: float | None = None  # set while local buckets stand in for Redis's
        self._next_try = -math.inf  # Redis is not asked before this time (after a failure)

    @property
    def degraded(self) -> bool:
        """True while Redis is configured but the local buckets decide (an outage)."""
        return self._outage_since is not None

    async def take(self, tenant: str, rate: RateConfig | None, *, link: Link | None = None,
                   cluster: str = "glmtts") -> float | None:
        """None: allowed; else the seconds until the tenant may send again (its Retry-After).
        ``link``: Redis, whose bucket is shared by every sidecar of ``cluster`` (None: this process's)."""
        if rate is None:
            return self.local.take(tenant, None, self.clock())
        if link is not None and self._may_ask(link):
            try:
                wait = await wait_for(self.shared.take(link.client, rate_key(cluster, tenant), rate),
                                      self.redis_timeout_s)
            except asyncio.TimeoutError:  # caught first: an OSError too, from Python 3.11 on
                self._failed(f"Redis did not answer within {self.redis_timeout_s:g} s")  # slow, not gone
            except (RedisConnectionError, OSError) as exc:
                link.failed(exc)  # the connection broke: the link watches Redis until it is back
                self._failed(f"Redis failed: {type(exc).__name__}: {exc}")
            except RedisError as exc:
                self._failed(f"Redis failed: {type(exc).__name__}: {exc}")
            else:
                self._recovered()
                return wait
        return self.local.take(tenant, rate, self.clock())

    def _may_ask(self, link: Link) -> bool:
        if not link.up:
            self._outage("the Redis link is down")
            return False
        return self.clock() >= self._next_try

    def _failed(self, why: str) -> None:
        self._next_try = self.clock() + self.retry_redis_s
        self._outage(why)

    def _outage(self, why: str) -> None:
        if self._outage_since is None:
            self._outage_since = self.clock()
            log.warning("tenant request rates: %s; each sidecar now enforces them on its own (a tenant may get "
                        "up to its rate from every sidecar) until Redis answers again", why)

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.info("tenant request rates: Redis answers again after %.1f s; rates are cluster-wide again",
                     self.clock() - self._outage_since)
            self._outage_since = None
