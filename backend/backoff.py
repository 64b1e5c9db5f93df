"""Delays between restarts of one backend: doubling, capped, jittered, reset after a stable run."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["JITTER", "STABLE_AFTER_S", "Backoff"]

JITTER = 0.2  # each delay is its nominal value ±20%, so backends that died together restart apart
STABLE_AFTER_S = 30.0  # a backend that was ready this long starts again from the initial delay


class Backoff:
    """The restart schedule of one backend; `rand` returns floats in [0, 1) (injected in tests)."""

    def __init__(
        self, initial_s: float, max_s: float, *, rand: Callable[[], float] = random.random
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s} and {max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self._rand = rand
        self._nominal = initial_s

    @property
    def nominal_s(self) -> float:
        """The un-jittered delay the next restart will wait."""
        return self._nominal

    def reset(self) -> None:
        self._nominal = self.initial_s

    def next_delay(self, *, ready_for_s: float = 0.0) -> float:
        """The delay before the next restart; `ready_for_s`: how long the life that ended was ready."""
        if ready_for_s >= STABLE_AFTER_S:
            self.reset()
        nominal = self._nominal
        self._nominal = min(nominal * 2, self.max_s)
        return nominal * (1 + JITTER * (2 * self._rand() - 1))
