"""Event-loop lag: how late the loop wakes a timer, the delay every request sees on top of its own.

A probe task sleeps ``interval_s`` again and again; whatever it oversleeps is time the loop spent
on something else (a blocking call, a long synchronous stretch, CPU starvation). The worst since
start and a histogram go to ``/metrics`` as ``glmtts_sidecar_event_loop_lag_max_seconds`` and
``glmtts_sidecar_event_loop_lag_seconds``. The histogram's buckets are fine below 100 ms, so two
scrapes tell the worst lag between them to within a bucket: the reliability suite asserts it per
case that way, and an alert watches the share of samples above 100 ms. Its ``_created`` sample is
when the probe started, which tells one process's counts from another's.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025,
               0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class LoopLagProbe:
    """Measures event-loop lag every ``interval_s`` while started; its figures are plain attributes."""

    def __init__(self, interval_s: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = interval_s
        self._clock = clock
        self._wall_clock = wall_clock
        self.started_at: float | None = None  # wall-clock seconds of the first start()
        self.max_s = 0.0
        self.last_s = 0.0
        self.samples = 0
        self.total_s = 0.0
        self.bucket_counts = [0] * (len(LAG_BUCKETS) + 1)  # the last one: above every bound
        self._task: asyncio.Task[None] | None = None

    def observe(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.last_s = lag_s
        self.max_s = max(self.max_s, lag_s)
        self.samples += 1
        self.total_s += lag_s
        self.bucket_counts[bisect.bisect_left(LAG_BUCKETS, lag_s)] += 1

    def start(self) -> None:
        if self._task is None:
            if self.started_at is None:
                self.started_at = self._wall_clock()
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            before = self._clock()
            await asyncio.sleep(self.interval_s)
            self.observe(self._clock() - before - self.interval_s)


class LoopLagCollector(Collector):
    """The probe's figures at scrape time."""

    def __init__(self, probe: LoopLagProbe, prefix: str) -> None:
        self._probe = probe
        self._prefix = prefix

    def collect(self) -> Iterable[Metric]:
        probe = self._probe
        worst = GaugeMetricFamily(
            self._prefix + "event_loop_lag_max_seconds",
            f"Worst event-loop lag since start: how much later than asked the loop woke a {probe.interval_s:g} s "
            "timer. Every request waiting on the loop was delayed as much.")
        worst.add_metric([], probe.max_s)
        yield worst
        cumulative, buckets = 0, []
        for bound, count in zip((*LAG_BUCKETS, float("inf")), probe.bucket_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        histogram = HistogramMetricFamily(
            self._prefix + "event_loop_lag_seconds",
            f"Event-loop lag, sampled every {probe.interval_s:g} s: seconds the loop woke a timer late.")
        histogram.add_metric([], buckets, probe.total_s)
        if probe.started_at is not None:
            histogram.add_sample(histogram.name + "_created", {}, probe.started_at)
        yield histogram
