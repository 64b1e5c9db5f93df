"""The event-loop lag probe: its arithmetic with injected lags, and that it sees a real blocked loop."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from scheduler.runtime.looplag import LAG_BUCKETS, LoopLagCollector, LoopLagProbe


def test_observe_keeps_max_sum_and_buckets() -> None:
    probe = LoopLagProbe()
    for lag in (0.0005, 0.02, 0.3, -0.001):  # a clock hiccup below zero counts as no lag
        probe.observe(lag)
    assert probe.max_s == 0.3 and probe.samples == 4 and probe.last_s == 0.0
    assert probe.total_s == pytest.approx(0.3205)
    assert sum(probe.bucket_counts) == 4
    assert probe.bucket_counts[0] == 2  # 0.0005 and 0 are <= 0.5 ms
    assert probe.bucket_counts[LAG_BUCKETS.index(0.02)] == 1  # a bound holds what equals it
    assert probe.bucket_counts[LAG_BUCKETS.index(0.5)] == 1


def test_exposition_is_a_cumulative_histogram_and_a_max_gauge() -> None:
    probe = LoopLagProbe()
    probe.observe(0.2)
    probe.observe(3.0)  # above the last bound: only +Inf holds it
    registry = CollectorRegistry()
    registry.register(LoopLagCollector(probe, "x_"))
    text = generate_latest(registry).decode()
    assert "x_event_loop_lag_max_seconds 3.0" in text
    assert 'x_event_loop_lag_seconds_bucket{le="0.1"} 0.0' in text
    assert 'x_event_loop_lag_seconds_bucket{le="0.25"} 1.0' in text
    assert 'x_event_loop_lag_seconds_bucket{le="2.5"} 1.0' in text
    assert 'x_event_loop_lag_seconds_bucket{le="+Inf"} 2.0' in text
    assert "x_event_loop_lag_seconds_count 2.0" in text


def test_buckets_tell_lags_under_the_bound_apart_and_keep_the_alerts_bounds() -> None:
    """Two scrapes tell the worst lag between them to within a bucket: each bound up to 100 ms is at
    most twice the one below it. The bounds dashboards and alerts use stay."""
    assert list(LAG_BUCKETS) == sorted(set(LAG_BUCKETS))
    assert {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5} <= set(LAG_BUCKETS)
    fine = [b for b in LAG_BUCKETS if b <= 0.1]
    assert fine[0] <= 0.0005 and all(upper <= 2 * lower for lower, upper in itertools.pairwise(fine))


async def test_created_is_when_the_probe_first_started() -> None:
    starts = iter([1_700_000_000.25, 1_800_000_000.0])
    probe = LoopLagProbe(wall_clock=lambda: next(starts))
    registry = CollectorRegistry()
    registry.register(LoopLagCollector(probe, "x_"))
    assert "x_event_loop_lag_seconds_created" not in generate_latest(registry).decode()
    for _ in range(2):  # a second start keeps the first one's time
        probe.start()
        await probe.stop()
    assert "x_event_loop_lag_seconds_created 1.70000000025e+09" in generate_latest(registry).decode()


def test_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        LoopLagProbe(interval_s=0)


async def test_a_blocked_loop_shows_as_lag() -> None:
    probe = LoopLagProbe(interval_s=0.01)
    probe.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # noqa: ASYNC251 -- block the loop on purpose: the probe fires ~0.2 s late
        await asyncio.sleep(0.05)
    finally:
        await probe.stop()
    assert probe.samples >= 2
    assert probe.max_s >= 0.15
