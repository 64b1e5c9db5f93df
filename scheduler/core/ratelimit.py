"""A token bucket: a tenant's request rate (``tenants.*.rate``). Pure; time is passed in.

The bucket holds up to ``burst`` tokens and gains ``per_s`` a second; a request takes one. So over
any window of ``t`` seconds at most ``burst + per_s * t`` requests are allowed, and a tenant that
was quiet may send ``burst`` at once. A refused request is told how long until a token is there
(its Retry-After); refusals take nothing, so a client hammering the limit does not push it back.

scheduler.runtime.ratelimit keeps one per tenant in the process, and runs the same arithmetic in
Redis (a Lua script) when the sidecars of a cluster share one bucket per tenant.
"""

from __future__ import annotations

__all__ = ["EPSILON", "TokenBucket"]

# A token short by no more than this is a token: sums of small refills lose a few ulps, and a
# client sending at exactly the rate must not be refused for them.
EPSILON = 1e-9


class TokenBucket:
    def __init__(self, per_s: float, burst: int) -> None:
        if per_s <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs per_s > 0 and burst >= 1, not {per_s!r}, {burst!r}")
        self.per_s = per_s
        self.burst = burst
        self._tokens = float(burst)  # a new bucket is full: a tenant's first requests are its burst
        self._at: float | None = None  # when _tokens was last brought up to date

    def take(self, now: float) -> float | None:
        """Take a token at ``now``: None when there was one (allowed), else the seconds until there is."""
        self._settle(now)
        if self._tokens >= 1.0 - EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return None
        return (1.0 - self._tokens) / self.per_s

    def tokens(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (a clock that went back adds none)."""
        if self._at is None or now <= self._at:
            return self._tokens
        return min(float(self.burst), self._tokens + (now - self._at) * self.per_s)

    def configure(self, per_s: float, burst: int) -> None:
        """A new rate (a reload), counted from the bucket's last use: a tenant whose rate was raised
        is let through at once, one whose rate was lowered is held to it at once. The tokens it has
        are kept up to the new burst: a reload neither refills nor empties a bucket."""
        if per_s <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs per_s > 0 and burst >= 1, not {per_s!r}, {burst!r}")
        self._tokens = min(float(burst), self._tokens)
        self.per_s, self.burst = per_s, burst

    def _settle(self, now: float) -> None:
        """Bring the count up to ``now``; time never runs backwards for the bucket."""
        self._tokens = self.tokens(now)
        if self._at is None or now > self._at:
            self._at = now
