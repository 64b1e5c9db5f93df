"""Predicted service seconds of a TTS request, learned online per model configuration.

Pure: no asyncio, no I/O; callers pass every number in.

Per model key the service time is ``a + b·units`` (``glmtts.text`` cost units). The line starts at
the configured priors (the seed's ~3.5 s at ~20 units and ~80 s at ~500) and is learned from the
last ``window`` completed requests in two steps:

1. **Level**, from the first completion on: the factor ``s`` on the prior line that the data
   support, a Huber M-estimate of ``log(actual / prior line)`` (k = 1.345 robust scales, the
   scale being 1.4826·median |deviation|, or the prior's own spread ``log(p95_ratio) / z95``
   until three completions show theirs), with the prior as ``prior_weight`` pseudo-observations
   at factor 1. Each completion more than ``DISAGREE_FACTOR`` times slower or faster than the
   prior halves the prior's weight: a prior 20x off in either direction is outvoted by the third
   such completion, while one cold or stuck request among agreeing ones moves the level by a
   few percent.
2. **Line**, once a key has ``REFIT_EVERY`` completions, refitted every ``REFIT_EVERY`` more: an
   iteratively reweighted least-squares fit, with
   - *relative* residuals (``(actual - predicted) / predicted``): GPU timing noise is
     multiplicative, so a 10 % miss on an 80 s text must weigh what a 10 % miss on a 3 s text does;
   - Huber weights (as above) bounding the pull of any one sample;
   - the prior line *scaled to the level* as ``prior_weight`` pseudo-observations at 20 and 500
     units: the prior's shape holds while the data cover few lengths, and fades (Huber weights
     again) where data of many lengths disagree with it;
   - ``a >= 0`` and ``b > 0``: a negative intercept falls back to a line through the origin, and a
     non-increasing line to the prior line scaled to the data, so predictions are never negative
     and never decrease with length.
   Before that, the line is the prior's times the level.

A backend's warm-up synthesis (``observe_warmup``) ran cold and may have loaded the model first,
so it bounds a warm request's time from above: one faster than the prior line lowers the prior
the level starts from (the median of the key's recent warm-ups), a slower one teaches nothing.

The p95 is the mean times the 95th percentile of actual/predicted over the window, blended with
the prior ``p95_ratio`` by ``prior_weight``.

Each backend also keeps the median of its recent actual/predicted ratios: a backend that runs well
above its peers' line is reported by ``slow_backends``.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from statistics import median
from typing import TYPE_CHECKING

from scheduler.core.makespan import noise_sigma

if TYPE_CHECKING:
    from scheduler.core.queue import ModelKey

REFIT_EVERY = 8  # a key's line is fitted from this many completions on, then after every this many more
ANCHOR_UNITS = (20.0, 500.0)  # where the prior's pseudo-observations sit: the seed's short and long texts
BACKEND_WINDOW_PER_MIN = 4  # a backend's ratio window is this many times slow_min_samples (capped by window)
DISAGREE_FACTOR = 2.0  # a completion this many times slower or faster than the prior halves its weight
WARMUP_MEMORY = 8  # warm-ups per key whose median may lower its prior
CONFIRM_SAMPLES = 3  # latest completions that must agree with a prediction for it to count as confirmed

_HUBER_K = 1.345  # 95 % efficiency when the noise is Gaussian
_MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation, for Gaussian noise
_MIN_REL_SCALE = 0.02  # noise below 2 % counts as 2 %, so near-exact data keep finite weights
_MIN_PRED_S = 0.05  # floor on a prediction used as a divisor (a zero-unit text on a zero-intercept line)
_MIN_PRIOR_SCALE = 1e-3  # the scaled-prior fallback never predicts less than 0.1 % of the prior
_MAX_RATIO = 1e6  # actual/prior ratios are taken within [1/_MAX_RATIO, _MAX_RATIO] (a 0 s answer has no log)
_MAX_ITER = 50
_REL_TOL = 1e-7


@dataclass(frozen=True, kw_only=True)
class CostPriors:
    """Starting line and learning knobs. The defaults are the seed's measurements, written only here:
    the `cost` section of the configuration takes its defaults from this class."""

    base_s: float = 0.3125  # intercept a: 0.3125 + 0.159375·20 = 3.5 s, ·500 = 80 s
    per_unit_s: float = 0.159375  # slope b, seconds per cost unit
    p95_ratio: float = 1.3  # p95 / mean before any data
    prior_weight: float = 10.0  # how many observations the prior is worth
    window: int = 256  # completions per key the fit remembers
    reload_s: float = 20.0  # a backend switching model configuration (dispatch weighs it)
    slow_ratio: float = 1.5  # a backend's median actual/predicted above this is slow
    slow_min_samples: int = 10  # ... once it has this many completions

    def __post_init__(self) -> None:
        for f in fields(self):
            if not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be finite")
        checks = {
            "base_s": self.base_s >= 0,
            "per_unit_s": self.per_unit_s > 0,
            "p95_ratio": self.p95_ratio >= 1,
            "prior_weight": self.prior_weight >= 0,
            "window": self.window >= REFIT_EVERY,
            "reload_s": self.reload_s >= 0,
            "slow_ratio": self.slow_ratio > 0,
            "slow_min_samples": self.slow_min_samples >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")


@dataclass(frozen=True, kw_only=True)
class Prediction:
    mean_s: float  # expected service seconds
    p95_s: float  # 95 % of such requests finish within this


@dataclass(frozen=True, kw_only=True)
class _Fit:
    a: float
    b: float
    p95_ratio: float


class _KeyState:
    def __init__(self, window: int) -> None:
        self.units: deque[float] = deque(maxlen=window)
        self.actual: deque[float] = deque(maxlen=window)
        self.warmups: deque[float] = deque(maxlen=WARMUP_MEMORY)  # warm-up seconds / prior line
        self.total = 0  # accepted completions, ever
        self.pending = 0  # accepted since the last fit
        self.fit: _Fit | None = None  # None: to be fitted

    def stale(self) -> bool:
        """Whether the fit must be redone: after every completion while the key has fewer than
        REFIT_EVERY, then after every REFIT_EVERY; after a warm-up."""
        return self.fit is None or (self.pending > 0 and (self.total <= REFIT_EVERY or self.pending >= REFIT_EVERY))


class CostModel:
    """Service-time predictions per model key, learned from completed requests.

    The proxy calls `predict` when a request arrives and `observe` when its backend answered
    (successfully or not, but not for requests that never ran). Not thread-safe: one event loop.
    """

    def __init__(self, priors: CostPriors | None = None) -> None:
        self.priors = priors or CostPriors()
        self._prior_fit = _Fit(a=self.priors.base_s, b=self.priors.per_unit_s, p95_ratio=self.priors.p95_ratio)
        self._keys: dict[ModelKey, _KeyState] = {}
        backend_window = min(self.priors.window, BACKEND_WINDOW_PER_MIN * self.priors.slow_min_samples)
        self._backend_window = max(backend_window, self.priors.slow_min_samples)
        self._backends: dict[str, deque[float]] = {}
        self.fit_count = 0  # refits so far, all keys (tests check the caching)

    @property
    def reload_s(self) -> float:
        return self.priors.reload_s

    def predict(self, units: float, key: ModelKey) -> Prediction:
        """Mean and p95 service seconds of a text of `units` under `key`; non-decreasing in units."""
        if math.isnan(units):
            raise ValueError("units is NaN")
        fit = self._fit(key)
        mean = fit.a + fit.b * max(units, 0.0)
        return Prediction(mean_s=mean, p95_s=mean * fit.p95_ratio)

    def observe(self, units: float, key: ModelKey, actual_s: float, *, backend_id: str | None = None) -> None:
        """Learn from one completed request; non-finite or negative inputs are ignored."""
        if not (math.isfinite(units) and math.isfinite(actual_s) and units >= 0 and actual_s >= 0):
            return
        if backend_id is not None:
            # Judge the backend against the line as it stood before this sample moved it.
            predicted = max(self.predict(units, key).mean_s, _MIN_PRED_S)
            ratios = self._backends.setdefault(backend_id, deque(maxlen=self._backend_window))
            ratios.append(actual_s / predicted)
        state = self._state(key)
        state.units.append(units)
        state.actual.append(actual_s)
        state.total += 1
        state.pending += 1

    def observe_warmup(self, units: float, key: ModelKey, seconds: float) -> None:
        """A backend's warm-up synthesis of a text of ``units`` under ``key`` succeeded in
        ``seconds``. It ran cold, maybe after loading the model: an upper bound on a warm request,
        which lowers the key's prior when it is faster than the prior line and teaches nothing
        otherwise. Non-finite or negative inputs are ignored."""
        if not (math.isfinite(units) and math.isfinite(seconds) and units >= 0 and seconds >= 0):
            return
        state = self._state(key)
        state.warmups.append(_ratio(seconds, self._prior_line(units)))
        state.fit = None

    def _state(self, key: ModelKey) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(self.priors.window)
        return state

    def _prior_line(self, units: float) -> float:
        return self.priors.base_s + self.priors.per_unit_s * units

    def confirmed(self, key: ModelKey) -> bool:
        """Whether completions back the prediction for ``key``: over its latest (up to)
        CONFIRM_SAMPLES, the median of actual / predicted now is within DISAGREE_FACTOR of 1."""
        state = self._keys.get(key)
        if state is None or not state.units:
            return False
        latest = itertools.islice(zip(reversed(state.units), reversed(state.actual), strict=True), CONFIRM_SAMPLES)
        ratio = median(y / max(self.predict(u, key).mean_s, _MIN_PRED_S) for u, y in latest)
        return 1 / DISAGREE_FACTOR <= ratio <= DISAGREE_FACTOR

    def samples(self, key: ModelKey) -> int:
        """Completions observed for `key` so far (the fit uses the last `window` of them)."""
        state = self._keys.get(key)
        return state.total if state else 0

    def backend_factor(self, backend_id: str) -> float:
        """Median actual/predicted over the backend's recent completions; 1.0 until it has enough."""
        ratios = self._backends.get(backend_id)
        if ratios is None or len(ratios) < self.priors.slow_min_samples:
            return 1.0
        return median(ratios)

    def slow_backends(self) -> set[str]:
        """Backends with enough completions whose factor exceeds `slow_ratio`."""
        return {backend for backend in self._backends if self.backend_factor(backend) > self.priors.slow_ratio}

    def forget_backend(self, backend_id: str) -> None:
        """Drop a backend's history (it restarted: its old speed says nothing about the new process)."""
        self._backends.pop(backend_id, None)

    def describe(self) -> dict[str, dict[str, float | int]]:
        """Per key ``"<sample_rate>:<use_phoneme>"``: the line in use, its p95 ratio and samples."""
        out: dict[str, dict[str, float | int]] = {}
        for key in sorted(self._keys):
            fit = self._fit(key)
            name = f"{key[0]}:{str(key[1]).lower()}"
            out[name] = {"a_s": fit.a, "b_s_per_unit": fit.b, "p95_ratio": fit.p95_ratio, "samples": self.samples(key)}
        return out

    def _fit(self, key: ModelKey) -> _Fit:
        state = self._keys.get(key)
        if state is None:
            return self._prior_fit
        if state.stale():
            previous = state.fit or self._prior_fit
            state.fit = _fit_key(state, self.priors, start=(previous.a, previous.b))
            state.pending = 0
            self.fit_count += 1
        assert state.fit is not None
        return state.fit


def _fit_key(state: _KeyState, priors: CostPriors, *, start: tuple[float, float]) -> _Fit:
    """The key's line and p95 ratio (see the module docstring)."""
    level = _level(state.units, state.actual, state.warmups, priors)
    if len(state.units) < REFIT_EVERY:
        a, b = priors.base_s * level, priors.per_unit_s * level
    else:
        a, b = _fit_line(state.units, state.actual, priors, level=level, start=start)
    return _Fit(a=a, b=b, p95_ratio=_p95_ratio(state.units, state.actual, a, b, priors))


def _ratio(actual: float, predicted: float) -> float:
    if predicted <= 0:
        return _MAX_RATIO if actual > 0 else 1.0
    return min(max(actual / predicted, 1 / _MAX_RATIO), _MAX_RATIO)


def _level(units: Sequence[float], actual: Sequence[float], warmups: Sequence[float], priors: CostPriors) -> float:
    """The factor on the prior line that the completions support (step 1 of the module docstring)."""
    # A warm-up faster than the prior line lowers the level the prior stands for; a slower one
    # (a model load, a cold start) says nothing about warm requests.
    home = min(0.0, math.log(median(warmups))) if warmups else 0.0
    logs = [math.log(_ratio(y, priors.base_s + priors.per_unit_s * u)) for u, y in zip(units, actual, strict=True)]
    if not logs:
        return math.exp(home)
    disagreeing = sum(1 for x in logs if abs(x - home) > math.log(DISAGREE_FACTOR))
    prior_weight = priors.prior_weight * 0.5 ** disagreeing
    middle = median(logs)
    if len(logs) >= 3:
        scale = _MAD_TO_SIGMA * median(abs(x - middle) for x in logs)
    else:
        scale = noise_sigma(1.0, priors.p95_ratio)  # the prior's own log-scale spread
    cut = _HUBER_K * max(scale, _MIN_REL_SCALE)
    level = middle
    for _ in range(_MAX_ITER):
        total = weights = 0.0
        for x, w in itertools.chain(((x, 1.0) for x in logs), [(home, prior_weight)]):
            off = abs(x - level)
            w *= 1.0 if off <= cut else cut / off
            total += w * x
            weights += w
        new = total / weights
        done = abs(new - level) <= _REL_TOL
        level = new
        if done:
            break
    return math.exp(level)


def _fit_line(units: Sequence[float], actual: Sequence[float], priors: CostPriors, *, level: float = 1.0,
              start: tuple[float, float] | None = None) -> tuple[float, float]:
    """Robust fit of ``actual ≈ a + b·units`` (step 2 of the module docstring), the prior line
    times ``level`` as pseudo-observations.

    `start` is where the iteration begins (the previous fit makes it converge in a few steps);
    the result does not depend on it beyond the tolerance.
    """
    anchors = [(u, level * (priors.base_s + priors.per_unit_s * u)) for u in ANCHOR_UNITS]
    anchor_weight = priors.prior_weight / len(anchors)
    a, b = start or (priors.base_s, priors.per_unit_s)
    for _ in range(_MAX_ITER):
        preds = [max(a + b * u, _MIN_PRED_S) for u in units]
        rel = [(y - p) / p for y, p in zip(actual, preds, strict=True)]
        cut = _HUBER_K * max(_MAD_TO_SIGMA * median(abs(r) for r in rel), _MIN_REL_SCALE) if rel else math.inf
        rows: list[tuple[float, float, float]] = []  # (units, seconds, weight)
        for u, y, p, r in zip(units, actual, preds, rel, strict=True):
            huber = 1.0 if abs(r) <= cut else cut / abs(r)
            rows.append((u, y, huber / (p * p)))  # divided by p² to make the squared error relative
        for u, y in anchors:
            p = max(a + b * u, _MIN_PRED_S)
            r = abs(y - p) / p
            rows.append((u, y, anchor_weight * (1.0 if r <= cut else cut / r) / (p * p)))
        new_a, new_b = _constrained_wls(rows, priors)
        done = abs(new_a - a) <= _REL_TOL * max(abs(a), 1e-3) and abs(new_b - b) <= _REL_TOL * abs(b)
        a, b = new_a, new_b
        if done:
            break
    return a, b


def _p95_ratio(units: Sequence[float], actual: Sequence[float], a: float, b: float, priors: CostPriors) -> float:
    """The 95th percentile of actual / (a + b·units), blended with the prior's by prior_weight."""
    ratios = sorted(y / max(a + b * u, _MIN_PRED_S) for u, y in zip(units, actual, strict=True))
    n = len(ratios)
    observed = _quantile(ratios, 0.95) if ratios else priors.p95_ratio
    blended = (n * observed + priors.prior_weight * priors.p95_ratio) / (n + priors.prior_weight) if n else observed
    return max(1.0, blended)


def _constrained_wls(rows: Sequence[tuple[float, float, float]], priors: CostPriors) -> tuple[float, float]:
    # Weighted least squares for a + b·u with a >= 0 and b > 0, falling back step by step.
    s0 = su = suu = sy = suy = 0.0
    for u, y, w in rows:
        s0 += w
        su += w * u
        suu += w * u * u
        sy += w * y
        suy += w * u * y
    det = s0 * suu - su * su
    if s0 > 0 and det > 1e-12 * s0 * suu:
        b = (s0 * suy - su * sy) / det
        a = (sy - b * su) / s0
        if a >= 0 and b > 0:
            return a, b
    if suu > 0:  # intercept went negative (or all texts had one length): a line through the origin
        b = suy / suu
        if b > 0:
            return 0.0, b
    # Nothing grows with length: keep the prior's shape, scaled to the data's level.
    num = den = 0.0
    for u, y, w in rows:
        prior = priors.base_s + priors.per_unit_s * u
        num += w * y * prior
        den += w * prior * prior
    scale = max(num / den, _MIN_PRIOR_SCALE) if den > 0 else 1.0
    return priors.base_s * scale, priors.per_unit_s * scale


def _quantile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between order statistics (numpy's default).
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
