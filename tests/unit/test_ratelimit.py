"""Tenants' request rates: the pure token bucket (scheduler.core.ratelimit) and the limiter around
it (scheduler.runtime.ratelimit) with a fake Redis client and a fake clock -- no sockets, no sleeps
beyond one bounded timeout."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from scheduler.config.tenants import RateConfig, TenantsConfig
from scheduler.core.ratelimit import TokenBucket
from scheduler.runtime.ratelimit import SCRIPT, SCRIPT_SHA, LocalRates, RateLimiter, rate_key, rate_of

REPO = Path(__file__).resolve().parents[2]


# --- the pure bucket --------------------------------------------------------------------------


def test_a_new_bucket_allows_its_burst_then_says_when_the_next_token_comes() -> None:
    bucket = TokenBucket(per_s=2.0, burst=3)
    assert [bucket.take(10.0) for _ in range(3)] == [None, None, None]
    assert bucket.take(10.0) == pytest.approx(0.5)
    assert bucket.take(10.2) == pytest.approx(0.3)  # a refusal takes nothing: the wait only shrinks
    assert bucket.take(10.5) is None
    assert bucket.take(10.5) == pytest.approx(0.5)


def test_an_idle_bucket_fills_up_to_its_burst_and_no_further() -> None:
    bucket = TokenBucket(per_s=1.0, burst=2)
    assert bucket.take(0.0) is None and bucket.take(0.0) is None
    assert bucket.tokens(1000.0) == 2.0
    assert [bucket.take(1000.0) for _ in range(3)][2] == pytest.approx(1.0)


def test_a_clock_that_goes_back_adds_no_tokens() -> None:
    bucket = TokenBucket(per_s=1.0, burst=1)
    assert bucket.take(100.0) is None
    assert bucket.take(50.0) == pytest.approx(1.0)
    assert bucket.take(100.5) == pytest.approx(0.5)  # counted from 100, not from 50


def test_a_new_rate_counts_from_the_last_request_keeping_tokens_up_to_the_new_burst() -> None:
    bucket = TokenBucket(per_s=1.0, burst=5)
    assert bucket.take(0.0) is None  # 4 left
    bucket.configure(per_s=10.0, burst=2)
    assert bucket.tokens(0.0) == 2.0  # not refilled to 5, not emptied
    assert bucket.take(0.0) is None and bucket.take(0.0) is None
    assert bucket.take(0.0) == pytest.approx(0.1)  # the new rate's wait
    bucket.configure(per_s=0.5, burst=2)  # lowered: held to it from the last request on
    assert bucket.take(1.0) == pytest.approx(1.0)
    bucket.configure(per_s=100.0, burst=2)  # raised: the time since the last request counts at the new rate
    assert bucket.take(1.1) is None  # (at 0.5 a second it would have been 0.55 tokens)


@pytest.mark.parametrize("per_s,burst", [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_bucket_that_could_never_allow_is_refused(per_s: float, burst: int) -> None:
    with pytest.raises(ValueError, match="per_s > 0 and burst >= 1"):
        TokenBucket(per_s=per_s, burst=burst)


rates = st.floats(min_value=0.01, max_value=1000.0, allow_nan=False, allow_infinity=False)
# Gaps between requests in units of one token's time: mostly faster than the rate, so the bucket
# is often empty and the bound is what is tested, with idle stretches in between.
gaps = st.one_of(
    st.lists(st.floats(min_value=0.0, max_value=1.2), min_size=50, max_size=400),  # sustained pressure
    st.lists(st.one_of(st.floats(min_value=0.0, max_value=1.5), st.floats(min_value=0.0, max_value=20.0)),
             min_size=1, max_size=300))  # bursts and idle stretches


def test_a_client_hammering_the_limit_gets_exactly_its_burst_plus_its_rate() -> None:
    bucket = TokenBucket(per_s=7.0, burst=5)
    allowed = sum(bucket.take(i * 0.001) is None for i in range(10_001))  # 10 s, every millisecond
    assert allowed == 5 + 70


@settings(max_examples=200, deadline=None)
@given(per_s=rates, burst=st.integers(min_value=1, max_value=50), steps=gaps)
def test_no_window_ever_allows_more_than_burst_plus_rate_times_its_length(per_s: float, burst: int,
                                                                         steps: list[float]) -> None:
    bucket = TokenBucket(per_s=per_s, burst=burst)
    allowed: list[float] = []
    now = 0.0
    for gap in steps:
        now += gap / per_s
        if bucket.take(now) is None:
            allowed.append(now)
    # The window [allowed[i], allowed[j]] holds j - i + 1 allowed requests: with a_k = k - per_s * allowed[k],
    # the bound for every i <= j is a_j - min(a_i) + 1 <= burst.
    lowest = float("inf")
    for k, at in enumerate(allowed):
        lowest = min(lowest, k - per_s * at)
        assert k - per_s * at - lowest + 1 <= burst + 1e-6, f"over the bound at request {k}"


@settings(max_examples=200, deadline=None)
@given(per_s=rates, burst=st.integers(min_value=1, max_value=50), steps=gaps)
def test_a_client_that_waits_its_retry_after_is_allowed(per_s: float, burst: int, steps: list[float]) -> None:
    bucket = TokenBucket(per_s=per_s, burst=burst)
    now = 0.0
    for gap in steps:
        now += gap / per_s
        wait = bucket.take(now)
        if wait is not None:
            assert 0 < wait <= 1 / per_s + 1e-9
            now += wait * (1 + 1e-9) + 1e-12
            assert bucket.take(now) is None


def test_the_bucket_is_pure() -> None:
    check = "import sys, scheduler.core.ratelimit; print([m for m in ('asyncio', 'aiohttp') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


# --- per-process buckets and the configuration --------------------------------------------------


def test_tenants_have_their_own_buckets_and_a_changed_rate_applies_at_once() -> None:
    local = LocalRates()
    slow = RateConfig(per_s=1.0, burst=1)
    assert local.take("acme", slow, 0.0) is None
    assert local.take("acme", slow, 0.0) == pytest.approx(1.0)
    assert local.take("bulk", slow, 0.0) is None  # another tenant's bucket
    assert local.take("acme", RateConfig(per_s=4.0, burst=1), 0.1) == pytest.approx(0.15)
    assert all(local.take("acme", None, 0.0) is None for _ in range(10))  # unlimited again
    assert local.take("acme", slow, 0.0) is None  # a fresh bucket once limited again


def test_each_tenant_has_its_configured_rate() -> None:
    tenants = TenantsConfig.model_validate({
        "default": {"rate": {"per_s": 2.0, "burst": 4}},
        "list": [{"name": "acme", "keys": ["acme-key-0123456789"], "rate": {"per_s": 5.0}},
                 {"name": "bulk", "keys": ["bulk-key-0123456789"]}]})
    assert rate_of(tenants, "default") == RateConfig(per_s=2.0, burst=4)
    assert rate_of(tenants, "acme") == RateConfig(per_s=5.0, burst=1)
    assert rate_of(tenants, "bulk") is None
    assert rate_of(tenants, "gone") is None
    assert rate_key("glmtts", "acme") == "glmtts:rate:acme"


# --- the limiter: Redis first, the local bucket when Redis fails --------------------------------


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeRedis:
    """Answers the script as Redis would: from a TokenBucket per key, on the test's clock; or fails."""

    clock: Clock
    fail: BaseException | None = None
    delay_s: float = 0.0
    scripts: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    async def evalsha(self, sha: str, numkeys: int, key: str, *args: str) -> bytes:
        self.calls.append("evalsha")
        await self._maybe_fail()
        if sha not in self.scripts:
            raise NoScriptError("NOSCRIPT No matching script. Please use EVAL.")
        return self._run(key, *args)

    async def eval(self, script: str, numkeys: int, key: str, *args: str) -> bytes:
        self.calls.append("eval")
        await self._maybe_fail()
        self.scripts.add(SCRIPT_SHA if script == SCRIPT else "other")
        return self._run(key, *args)

    async def _maybe_fail(self) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail

    def _run(self, key: str, per_s: str, burst: str, ttl_ms: str) -> bytes:
        assert int(ttl_ms) >= int(burst) / float(per_s) * 1000  # the key outlives the refill
        bucket = self.buckets.setdefault(key, TokenBucket(float(per_s), int(burst)))
        wait = bucket.take(self.clock())
        return repr(wait or 0.0).encode()


@dataclass
class FakeLink:
    client: Any
    up: bool = True
    reported: list[BaseException] = field(default_factory=list)

    def failed(self, exc: BaseException) -> None:
        self.reported.append(exc)


RATE = RateConfig(per_s=1.0, burst=2)


def degraded(limiter: RateLimiter) -> bool:
    """Read afresh at each call (mypy would hold an asserted property's value)."""
    return limiter.degraded


async def test_with_redis_the_shared_bucket_decides_and_the_script_is_loaded_once() -> None:
    clock = Clock()
    redis = FakeRedis(clock)
    limiter = RateLimiter(clock=clock)
    link = FakeLink(redis)
    answers = [await limiter.take("acme", RATE, link=link, cluster="c1") for _ in range(3)]
    assert answers[:2] == [None, None] and answers[2] == pytest.approx(1.0)
    assert redis.calls == ["evalsha", "eval", "evalsha", "evalsha"]  # NOSCRIPT once, then cached
    assert set(redis.buckets) == {"c1:rate:acme"}
    assert limiter.local.take("acme", RATE, clock()) is None  # the local bucket was not touched
    assert not degraded(limiter)


async def test_when_redis_fails_the_local_bucket_decides_and_the_outage_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    redis = FakeRedis(clock, fail=RedisConnectionError("Connection refused"))
    limiter = RateLimiter(clock=clock, retry_redis_s=1.0)
    link = FakeLink(redis)
    with caplog.at_level(logging.INFO, logger="glmtts_sidecar.ratelimit"):
        answers = [await limiter.take("acme", RATE, link=link) for _ in range(5)]
        assert link.reported == [redis.fail]  # the link is told its connection failed
        # Full rate locally: the burst, then the local wait.
        assert answers[:2] == [None, None] and all(a == pytest.approx(1.0) for a in answers[2:])
        assert redis.calls == ["evalsha"]  # left alone for retry_redis_s, not asked per request
        assert degraded(limiter)
        clock.now += 1.0
        await limiter.take("acme", RATE, link=link)
        assert redis.calls == ["evalsha", "evalsha"]  # asked again, failed again: still one warning
        redis.fail = None
        clock.now += 1.0
        assert await limiter.take("acme", RATE, link=link) is None  # Redis's bucket, full
        assert not degraded(limiter)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Connection refused" in warnings[0].getMessage()
    assert next(r.getMessage() for r in caplog.records if r.levelno == logging.INFO).startswith(
        "tenant request rates: Redis answers again after 2.0 s")


async def test_a_slow_redis_is_given_a_short_timeout_then_the_local_bucket_decides() -> None:
    clock = Clock()
    redis = FakeRedis(clock, delay_s=5.0)
    limiter = RateLimiter(clock=clock, redis_timeout_s=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    link = FakeLink(redis)
    assert await limiter.take("acme", RATE, link=link) is None
    assert loop.time() - started < 2.0
    assert degraded(limiter) and redis.calls == ["evalsha"]
    assert link.reported == []  # slow is not gone: the link's other users keep it


async def test_a_link_that_is_down_is_not_asked() -> None:
    clock = Clock()
    redis = FakeRedis(clock)
    limiter = RateLimiter(clock=clock)
    link = FakeLink(redis, up=False)
    answers = [await limiter.take("acme", RATE, link=link) for _ in range(3)]
    assert answers[:2] == [None, None] and answers[2] == pytest.approx(1.0)
    assert redis.calls == [] and degraded(limiter)
    link.up = True
    assert await limiter.take("acme", RATE, link=link) is None
    assert redis.calls and not degraded(limiter)


async def test_an_unlimited_tenant_never_reaches_redis() -> None:
    clock = Clock()
    redis = FakeRedis(clock)
    limiter = RateLimiter(clock=clock)
    assert all([await limiter.take("acme", None, link=FakeLink(redis)) is None for _ in range(20)])
    assert redis.calls == []
