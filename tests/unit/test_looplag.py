"""The event-loop lag probe: its arithmetic with injected lags, and that it sees a real blocked loop."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from scheduler.looplag import LAG_BUCKETS, LoopLagCollector, LoopLagProbe


def test_observe_keeps_max_sum_and_buckets() -> None:
    probe = LoopLagProbe()
    for lag in (0.0005, 0.02, 0.3, -0.001):  # a clock hiccup below zero counts as no lag
        probe.observe(lag)
    assert probe.max_s == 0.3 and probe.samples == 4 and probe.last_s == 0.0
    assert probe.total_s == pytest.approx(0.3205)
    assert sum(probe.bucket_counts) == 4
    assert probe.bucket_counts[0] == 2  # 0.0005 and 0 are <= 1 ms
    assert probe.bucket_counts[LAG_BUCKETS.index(0.025)] == 1
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
