"""A retry budget, as Envoy's: retries may add at most ``ratio`` of recent requests, but
``min_concurrent`` retries in flight are always allowed. Pure; time is passed in."""

from __future__ import annotations

from collections import deque


class RetryBudget:
    def __init__(self, *, ratio: float = 0.2, min_concurrent: int = 3, window_s: float = 10.0) -> None:
        self.ratio = ratio
        self.min_concurrent = min_concurrent
        self.window_s = window_s
        self._requests: deque[float] = deque()
        self.active = 0  # retries in flight

    def _trim(self, now: float) -> None:
        while self._requests and self._requests[0] <= now - self.window_s:
            self._requests.popleft()

    def record_request(self, now: float) -> None:
        self._requests.append(now)
        self._trim(now)

    def try_acquire(self, now: float) -> bool:
        """Take a retry permit if the budget allows; give it back with ``release``."""
        self._trim(now)
        if self.active < max(self.min_concurrent, int(self.ratio * len(self._requests))):
            self.active += 1
            return True
        return False

    def release(self) -> None:
        self.active = max(0, self.active - 1)
