"""How long emulated inference takes, and how concurrent requests in one process share it.

Calibration (UPSTREAM_API.md, the seed): ~3.5 s for a short text (~20 chars) and ~80 s for a long
one (~500 chars) on one GPU, so ``seconds = a + b * units`` with b = (80 - 3.5) / (500 - 20) and
a = 3.5 - 20 b. Concurrency inside one process (measurements/h200-calibration.md, threads rows):
total throughput x1.0, x1.3, x1.5 at 1, 2, 4 concurrent requests, each request slower
accordingly; that is processor sharing with a throughput curve. Processes sharing one GPU slow each
other down on top of that (glmtts.emulator.gpu), which reaches the processor as its ``speed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from glmtts.loop import wait_for

SHORT_CHARS, SHORT_SECONDS = 20, 3.5
LONG_CHARS, LONG_SECONDS = 500, 80.0
PER_UNIT_S = (LONG_SECONDS - SHORT_SECONDS) / (LONG_CHARS - SHORT_CHARS)
BASE_S = SHORT_SECONDS - SHORT_CHARS * PER_UNIT_S
# Total throughput of one process at 1, 2, 3, 4 concurrent requests (3 interpolated); flat after.
MEASURED_THROUGHPUT = (1.0, 1.3, 1.4, 1.5)


@dataclass(frozen=True, kw_only=True)
class ServiceModel:
    """Emulated service seconds at ``time_scale`` 1 (a real GPU); multiply by time_scale to run."""

    base_s: float = BASE_S
    per_unit_s: float = PER_UNIT_S
    jitter_sigma: float = 0.05  # log-normal spread of one request around the mean
    cold_factor: float = 3.0  # the first request after a model load (measured ~3x)
    load_s: float = 20.0  # a model (re)load: "tens of seconds on a GPU"
    time_scale: float = 1.0
    throughput: tuple[float, ...] = MEASURED_THROUGHPUT

    def mean_seconds(self, units: float) -> float:
        return self.base_s + self.per_unit_s * units

    def work_seconds(self, units: float, *, seed: int, text: str, cold: bool) -> float:
        """Scaled solo service time of one request: deterministic for the same seed and text."""
        digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "big"))
        jitter = math.exp(rng.gauss(0.0, self.jitter_sigma)) if self.jitter_sigma > 0 else 1.0
        factor = self.cold_factor if cold else 1.0
        return self.mean_seconds(units) * jitter * factor * self.time_scale

    def load_seconds(self) -> float:
        return self.load_s * self.time_scale


def throughput_at(curve: Sequence[float], k: int) -> float:
    """Total throughput multiplier with ``k`` requests in service (k >= 1)."""
    return curve[min(k, len(curve)) - 1]


class ProcessorShares:
    """The bookkeeping of processor sharing, without waiting: ``clock`` decides what time it is.

    k active jobs each progress at ``throughput_at(k) / k`` of solo speed, times ``speed``: the
    share of its GPU this process gets from outside (1.0 alone; see glmtts.emulator.gpu). Any
    change of k or ``speed`` first books the progress made at the old rate, so work integrates
    correctly over any sequence of rate changes.
    """

    def __init__(self, curve: Sequence[float] = MEASURED_THROUGHPUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not curve or any(c <= 0 for c in curve):
            raise ValueError("throughput curve must be non-empty and positive")
        self._curve = tuple(curve)
        self._clock = clock
        self._remaining: dict[int, float] = {}
        self._last = clock()
        self._speed = 1.0
        self._ids = itertools.count()

    @property
    def active(self) -> int:
        return len(self._remaining)

    @property
    def speed(self) -> float:
        return self._speed

    def rate(self) -> float:
        """Solo-seconds of work each active job gets done per second now (0 when idle)."""
        k = len(self._remaining)
        return throughput_at(self._curve, k) / k * self._speed if k else 0.0

    def advance(self) -> None:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        if self._remaining and elapsed > 0:
            done = elapsed * self.rate()
            for job in self._remaining:
                self._remaining[job] -= done

    def add(self, work: float) -> int:
        self.advance()
        job = next(self._ids)
        self._remaining[job] = work
        return job

    def remove(self, job: int) -> None:
        self.advance()
        del self._remaining[job]

    def remaining(self, job: int) -> float:
        self.advance()
        return self._remaining[job]

    def set_speed(self, speed: float) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.advance()
        self._speed = speed


class SharedProcessor(ProcessorShares):
    """Processor sharing in real time: ``run`` returns once its job's work is done."""

    def __init__(self, curve: Sequence[float] = MEASURED_THROUGHPUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(curve, clock)
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def set_speed(self, speed: float) -> None:
        if speed != self.speed:
            super().set_speed(speed)
            self._notify()  # waiting jobs recompute when they finish

    async def run(self, work: float) -> None:
        """Occupy a share of the processor until ``work`` solo-seconds are done."""
        job = self.add(work)
        self._notify()
        try:
            while True:
                left = self.remaining(job)
                if left <= 1e-6:
                    return
                changed = self._changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await wait_for(changed.wait(), left / self.rate())
        finally:
            self.remove(job)
            self._notify()
