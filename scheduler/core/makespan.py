"""How long a split request's pieces take on parallel slots with noisy service times (fan-out's cut).

Pure: no asyncio, no I/O, no clock; deterministic (the same inputs give the same figures).

A fanned-out answer is whole when its last piece is (docs/fanout.md). Each slot ("lane") takes the
next piece when it frees; GPU service times are noisy, multiplicatively (``glmtts.emulator``
models them log-normal, and the cost model's p95 measures their spread). With pieces all the same
size, the lane whose first piece runs slow finishes last by that piece's excess. Decreasing piece
sizes (guided self-scheduling) let the lanes that finish early take the small pieces while the slow
one finishes, so the lanes end closer together:

- :func:`noise_sigma`: the log-normal σ a prediction's mean and p95 imply;
- :func:`tail_share`: how much of the work to hold back for those small pieces, so that on
  average it fills the time between the lanes' first pieces and the slowest of them:
  the slowest of ``lanes`` first pieces of ``B`` seconds ends ``B·σ·e(lanes)`` after their mean
  (``e(n)``: the expected largest of ``n`` standard normals), so the gaps of all lanes add up to
  ``lanes·B·σ·e(lanes)`` and the share is ``σ·e / (1 + σ·e)``;
- :func:`expected_makespan`: the mean time the last lane finishes, over a fixed set of noise draws
  (common random numbers, so two cuts of one text are compared on the same luck). A cut into few
  sentences may not follow the share, and a small tail costs each of its pieces the fixed
  per-request time, so the caller weighs the tapered cut against the even one with it and keeps the
  sooner.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import cache
from statistics import NormalDist

__all__ = ["DRAWS", "expected_makespan", "largest_normal", "noise_sigma", "tail_share"]

DRAWS = 48  # noise draws per estimate: about 0.3 ms for 8 pieces on 4 lanes
P95_Z = NormalDist().inv_cdf(0.95)


def noise_sigma(mean_s: float, p95_s: float) -> float:
    """The σ of a log-normal service time whose 95th percentile is ``p95_s`` times its mean
    ``mean_s`` over: ``ln(p95 / mean) / z95``; 0 when either is not a positive finite number or the
    p95 is not above the mean."""
    if not (math.isfinite(mean_s) and math.isfinite(p95_s)) or mean_s <= 0 or p95_s <= mean_s:
        return 0.0
    return math.log(p95_s / mean_s) / P95_Z


@cache
def largest_normal(count: int) -> float:
    """The expected largest of ``count`` independent standard normals, ``∫ x·n·φ(x)·Φ(x)^(n-1) dx``
    by the trapezoid rule over [-8, 8] (0 for one; 0.5642 for two, 1.0294 for four)."""
    if count < 2:
        return 0.0
    normal, steps, low, high = NormalDist(), 4000, -8.0, 8.0
    width = (high - low) / steps
    total = 0.0
    for step in range(steps + 1):
        x = low + step * width
        weight = 0.5 if step in (0, steps) else 1.0
        total += weight * x * count * normal.pdf(x) * normal.cdf(x) ** (count - 1)
    return total * width


def tail_share(sigma: float, lanes: int) -> float:
    """The share of a split request's work to cut into small pieces behind the ``lanes`` first
    ones when service times have log-normal σ ``sigma``: ``σ·e / (1 + σ·e)``, ``e`` the expected
    largest of ``lanes`` standard normals (module docstring). 0 with one lane or no noise."""
    if lanes < 2 or not math.isfinite(sigma) or sigma <= 0:
        return 0.0
    spread = sigma * largest_normal(lanes)
    return spread / (1.0 + spread)


class _Draws:
    """Standard normal draws, one row per draw, each row from a generator of its own seed, so a
    row's values never depend on how long other rows have grown."""

    def __init__(self, rows: int) -> None:
        self._rngs = [random.Random(row) for row in range(rows)]
        self._rows: list[list[float]] = [[] for _ in range(rows)]

    def rows(self, width: int) -> list[list[float]]:
        for rng, row in zip(self._rngs, self._rows, strict=True):
            while len(row) < width:
                row.append(rng.gauss(0.0, 1.0))
        return self._rows


_DRAWS = _Draws(DRAWS)


def expected_makespan(seconds: Sequence[float], lanes: int, sigma: float) -> float:
    """The mean time the last of ``lanes`` slots finishes when pieces of mean service ``seconds``
    start in that order, each on the slot that frees first, each taking its mean times
    ``exp(σ·z)`` (z standard normal, the same :data:`DRAWS` draws on every call). Raises
    ValueError for ``lanes`` < 1 or a negative or non-finite ``sigma`` or piece."""
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if any(not math.isfinite(s) or s < 0 for s in seconds):
        raise ValueError("piece seconds must be finite numbers >= 0")
    if not seconds:
        return 0.0
    total = 0.0
    rows = _DRAWS.rows(len(seconds))
    for row in rows:
        free = [0.0] * lanes
        for mean, z in zip(seconds, row, strict=False):
            lane = free.index(min(free))
            free[lane] += mean * math.exp(sigma * z)
        total += max(free)
    return total / len(rows)
