"""Crash-loop detection: too many failures of one backend within a sliding window of time.

Backoff alone keeps retrying forever at its ceiling; a backend that cannot start (a bad checkpoint,
a missing GPU) should instead be left alone for a cooldown, visibly FAILED. Pure: `now` is passed in.
"""

from __future__ import annotations

from collections import deque

from backend.settings import CrashLoopConfig

__all__ = ["CrashLoop"]


class CrashLoop:
    """Failure times of one backend; a crash loop is more than `max_failures` within `window_s`."""

    def __init__(self, config: CrashLoopConfig) -> None:
        self.config = config
        self._failures: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Count a failure (an exit, a failed start or warm-up) at `now`; True if it makes a crash loop."""
        self._failures.append(now)
        self._forget_before(now - self.config.window_s)
        return len(self._failures) > self.config.max_failures

    def count(self, now: float) -> int:
        """Failures within the window ending at `now`."""
        self._forget_before(now - self.config.window_s)
        return len(self._failures)

    def reset(self) -> None:
        """Forget every failure (after a cooldown: the next start begins a new count)."""
        self._failures.clear()

    def _forget_before(self, cutoff: float) -> None:
        while self._failures and self._failures[0] <= cutoff:
            self._failures.popleft()
