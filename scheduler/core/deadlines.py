"""How long a request may take, from arrival to answer (queueing plus service).

Pure: no asyncio, no I/O; `now` is passed in. Two policies, picked by name from the config:
``tiers`` (the seed's fixed timeouts by text length) and ``learned`` (the cost model's p95 times a
factor plus a buffer, clamped). A client may shorten its budget with ``X-Request-Timeout``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from scheduler.core.cost import Prediction

POLICIES = ("tiers", "learned")
TIMEOUT_HEADER = "X-Request-Timeout"
MAX_HEADER_CHARS = 32  # a real number of seconds is short; anything longer is junk or an attack

# Plain ASCII decimals only: float() would also take "1e3", "1_0", "inf" and non-ASCII digits.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
_NON_FINITE = re.compile(r"[+-]?(?:inf|infinity|nan)", re.ASCII | re.IGNORECASE)


class DeadlinePolicy(Protocol):
    def budget_s(self, *, chars: int, prediction: Prediction) -> float:
        """Seconds from arrival to deadline for a text of `chars` characters: > 0, finite."""
        ...


@dataclass(frozen=True, kw_only=True)
class Tier:
    max_chars: int | None  # texts up to this many characters; None: any longer text
    timeout_s: float
    per_char_s: float = 0.0  # plus this many seconds per character of the text

    def budget_s(self, chars: int) -> float:
        return self.timeout_s + self.per_char_s * chars


# The seed's fixed timeouts by length: the default `deadlines.tiers` of the configuration too.
SEED_TIERS = (
    Tier(max_chars=50, timeout_s=60.0),
    Tier(max_chars=200, timeout_s=300.0),
    Tier(max_chars=None, timeout_s=600.0),
)


class TiersPolicy:
    """The first tier whose `max_chars` covers the text (the last tier, None, covers the rest) gives
    ``timeout_s + per_char_s x chars``: a fixed timeout, or one that grows with the text."""

    def __init__(self, tiers: Sequence[Tier] = SEED_TIERS) -> None:
        if not tiers or tiers[-1].max_chars is not None:
            raise ValueError("tiers: the last tier must have max_chars None (it covers longer texts)")
        bounds = [tier.max_chars for tier in tiers[:-1] if tier.max_chars is not None]
        if len(bounds) != len(tiers) - 1:
            raise ValueError("tiers: only the last tier may have max_chars None")
        if any(low >= high for low, high in itertools.pairwise(bounds)):
            raise ValueError("tiers: max_chars must increase from tier to tier")
        for tier in tiers:
            _check_positive("tiers: timeout_s", tier.timeout_s)
            if not (math.isfinite(tier.per_char_s) and tier.per_char_s >= 0):
                raise ValueError(f"tiers: per_char_s must be finite and >= 0, got {tier.per_char_s!r}")
        self.tiers = tuple(tiers)

    def budget_s(self, *, chars: int, prediction: Prediction) -> float:
        for tier in self.tiers:
            if tier.max_chars is None or chars <= tier.max_chars:
                return tier.budget_s(chars)
        raise AssertionError("unreachable: the last tier covers every length")


class LearnedPolicy:
    """``clamp(p95 × factor + buffer_s, min_s, max_s)``: generous for what is predicted slow."""

    def __init__(self, *, factor: float, buffer_s: float, min_s: float, max_s: float) -> None:
        _check_positive("factor", factor)
        _check_positive("min_s", min_s)
        _check_positive("max_s", max_s)
        if not (math.isfinite(buffer_s) and buffer_s >= 0):
            raise ValueError(f"buffer_s must be finite and >= 0, got {buffer_s!r}")
        if min_s > max_s:
            raise ValueError(f"min_s ({min_s}) must not exceed max_s ({max_s})")
        self.factor, self.buffer_s, self.min_s, self.max_s = factor, buffer_s, min_s, max_s

    def budget_s(self, *, chars: int, prediction: Prediction) -> float:
        wanted = prediction.p95_s * self.factor + self.buffer_s
        if math.isnan(wanted):
            return self.max_s
        return min(max(wanted, self.min_s), self.max_s)


def make_policy(
    name: str, *, tiers: Sequence[Tier], factor: float, buffer_s: float, min_s: float, max_s: float
) -> DeadlinePolicy:
    """The policy called `name` (one of `POLICIES`); ValueError for any other name."""
    if name == "tiers":
        return TiersPolicy(tiers)
    if name == "learned":
        return LearnedPolicy(factor=factor, buffer_s=buffer_s, min_s=min_s, max_s=max_s)
    raise ValueError(f"unknown deadline policy {name!r}: expected one of {', '.join(POLICIES)}")


def client_budget(policy_s: float, header: str | None, *, max_s: float | None = None) -> float:
    """The budget after the client's ``X-Request-Timeout`` (seconds), if any.

    The header may only shorten: the result is the least of the header, `policy_s` and `max_s`.
    A header that is not a positive, finite, plain decimal number raises ValueError naming the
    header and the problem (the proxy answers 400).
    """
    budget = policy_s if max_s is None else min(policy_s, max_s)
    if header is None:
        return budget
    text = header.strip()
    if not text:
        raise ValueError(f"{TIMEOUT_HEADER} is empty")
    if len(text) > MAX_HEADER_CHARS:
        raise ValueError(f"{TIMEOUT_HEADER} is too long ({len(text)} characters, at most {MAX_HEADER_CHARS})")
    if _NON_FINITE.fullmatch(text):
        raise ValueError(f"{TIMEOUT_HEADER} must be a finite number of seconds, got {text!r}")
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"{TIMEOUT_HEADER} must be a number of seconds, got {text!r}")
    seconds = float(text)
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_HEADER} must be positive, got {text!r}")
    return min(seconds, budget)


def timeout_message(timeout_s: float, chars: int) -> str:
    """Upstream's 408 detail; the timeout as an int when whole (60), else up to 3 decimals (2.5)."""
    shown = f"{timeout_s:.3f}".rstrip("0").rstrip(".") if math.isfinite(timeout_s) else str(timeout_s)
    return f"Request timeout after {shown} seconds. Text length: {chars} characters."


def shed_message(timeout_s: float, chars: int, predicted_s: float) -> str:
    """The 408 detail of a request taken out of the queue at its latest start: upstream's words,
    and why it was answered before its timeout."""
    return (f"{timeout_message(timeout_s, chars)} No backend was free in time: its predicted service of "
            f"{predicted_s:.3f} seconds would end after the timeout, so it was not started.")


@dataclass(frozen=True, kw_only=True)
class Deadline:
    at: float  # monotonic seconds when the request's time is up
    budget_s: float  # what it was given at arrival

    @classmethod
    def start(cls, now: float, budget_s: float) -> Deadline:
        return cls(at=now + budget_s, budget_s=budget_s)

    def remaining(self, now: float) -> float:
        return max(self.at - now, 0.0)

    def expired(self, now: float) -> bool:
        return now >= self.at


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
