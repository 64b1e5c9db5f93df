"""Passive outlier detection of one backend, from the outcomes of the requests it served.

Active health checks see a process that answers `/health`; they miss one that answers health but
fails or crawls through real work (a throttled GPU, a corrupted model). The proxy reports every
finished request here; a backend whose recent requests went badly is ejected for a while, each
ejection twice as long as the one before (capped), like Envoy's outlier detection. Pure: the clock
is injected. Whether an ejection may happen (never the last ready backend) is the pool's decision.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

from backend.settings import OutlierConfig

__all__ = ["OutlierDetector"]


class OutlierDetector:
    """The verdict of one backend's latest outcomes, and its ejection schedule."""

    def __init__(self, config: OutlierConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._config = config
        self._failures = 0  # failed requests in a row
        self._ratios: deque[float] = deque(maxlen=config.min_requests)
        self._ejections = 0  # ejections so far: the next lasts base * 2**this
        self._until: float | None = None  # end of the current ejection
        self._last_end: float | None = None  # when the last ejection ended

    @property
    def config(self) -> OutlierConfig:
        return self._config

    @config.setter
    def config(self, config: OutlierConfig) -> None:
        self._config = config
        self._ratios = deque(self._ratios, maxlen=config.min_requests)

    def record(self, *, ok: bool, latency_ratio: float | None) -> str | None:
        """Count one finished request; returns why the backend is an outlier now, or None.

        `latency_ratio` (actual / predicted service) counts only with `ok`. Outcomes that arrive
        while ejected are of requests sent before the ejection: they are ignored (None).
        """
        if self.ejected:
            return None
        if ok:
            self._failures = 0
            if latency_ratio is not None:
                self._ratios.append(latency_ratio)
        else:
            self._failures += 1
        return self.verdict()

    def verdict(self) -> str | None:
        """Why the latest outcomes make an outlier, or None while they look fine."""
        config = self._config
        if self._failures >= config.consecutive_failures:
            return f"{self._failures} requests failed in a row"
        if len(self._ratios) >= config.min_requests:
            median = statistics.median(self._ratios)
            if median > config.latency_ratio:
                return (f"median latency {median:.1f}x its prediction over its last {len(self._ratios)} "
                        f"requests (limit {config.latency_ratio:g}x)")
        return None

    @property
    def ejected(self) -> bool:
        return self._until is not None and self._clock() < self._until

    @property
    def ejected_until(self) -> float | None:
        """The end of the current (or just expired, not yet released) ejection; None when none."""
        return self._until

    def eject(self) -> float:
        """Start an ejection now; returns its length: base x 2^(ejections so far), capped.

        The count starts again from zero once a whole `max_ejection_s` passed without an ejection.
        """
        now, config = self._clock(), self._config
        if self._last_end is not None and now - self._last_end >= config.max_ejection_s:
            self._ejections = 0
        seconds = min(config.base_ejection_s * 2.0 ** min(self._ejections, 62), config.max_ejection_s)
        self._ejections += 1
        self._until = now + seconds
        return seconds

    def release(self) -> None:
        """End the ejection and forget the outcomes that caused it: the backend starts with a clean slate."""
        if self._until is not None:
            self._last_end = min(self._clock(), self._until)
        self._until = None
        self.reset()

    def reset(self) -> None:
        """Forget the latest outcomes (a new process), keeping the ejection count."""
        self._failures = 0
        self._ratios.clear()
