"""Health of a backend: one probe (`GET {url}{health.path}`, as upstream answers it), and the
rise/fall hysteresis that turns a series of probes into in or out of rotation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from backend.settings import HealthConfig
from backend.transport import BackendTimeout, BackendUnavailable, Transport

__all__ = ["HealthResult", "HealthTracker", "ModelKey", "parse_health", "probe_health"]

ModelKey = tuple[int, bool]  # (model_sample_rate, model_use_phoneme) of the loaded model

_MAX_BODY_BYTES = 64 * 1024  # a health answer is ~150 bytes; never read an unbounded body


@dataclass(frozen=True, kw_only=True)
class HealthResult:
    healthy: bool
    model_key: ModelKey | None = None  # None when no model is loaded (or the answer was unhealthy)
    error: str | None = None  # why it is not healthy, for logs and `last_error`


def parse_health(status: int, body: bytes) -> HealthResult:
    """Healthy iff 200 and a JSON object with `status == "healthy"`."""
    if status != 200:
        return HealthResult(healthy=False, error=f"health answered HTTP {status}")
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return HealthResult(healthy=False, error="health answer is not JSON")
    if not isinstance(data, dict):
        return HealthResult(healthy=False, error="health answer is not a JSON object")
    if data.get("status") != "healthy":
        return HealthResult(healthy=False, error=f"health status is {data.get('status')!r}")
    return HealthResult(healthy=True, model_key=_model_key(data))


def _model_key(data: dict[str, Any]) -> ModelKey | None:
    rate, phoneme = data.get("model_sample_rate"), data.get("model_use_phoneme")
    if data.get("model_loaded") is not True:
        return None
    if isinstance(rate, int) and not isinstance(rate, bool) and isinstance(phoneme, bool):
        return (rate, phoneme)
    return None


async def probe_health(transport: Transport, base_url: str, config: HealthConfig) -> HealthResult:
    """One probe, bounded by `config.timeout_s`, on a connection of its own; never raises for
    network or protocol failures."""
    try:
        reply = await transport.open("GET", base_url + config.path, timeout=config.timeout_s, fresh=True)
        try:
            body = bytearray()
            async for chunk in reply.iter_chunked(_MAX_BODY_BYTES + 1):
                body += chunk
                if len(body) > _MAX_BODY_BYTES:
                    return HealthResult(healthy=False, error="health answer is too large")
            return parse_health(reply.status, bytes(body))
        finally:
            reply.release()
    except BackendTimeout:
        return HealthResult(healthy=False, error=f"health timed out after {config.timeout_s:g} s")
    except BackendUnavailable as exc:
        return HealthResult(healthy=False, error=f"health failed: {_describe(exc.__cause__ or exc)}")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HealthTracker:
    """Rise/fall hysteresis: out after `fall` failed probes in a row, back after `rise` good ones.

    Starts healthy (a backend is tracked from READY on). `now` is passed in, so it is pure.
    """

    def __init__(self, *, rise: int, fall: int) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"need rise >= 1 and fall >= 1, got {rise} and {fall}")
        self.rise = rise
        self.fall = fall
        self.healthy = True
        self.good_streak = 0
        self.bad_streak = 0
        self.unhealthy_since: float | None = None  # when `healthy` last became False

    def record(self, ok: bool, now: float) -> bool:
        """Count one probe; True when `healthy` changed."""
        if ok:
            self.good_streak, self.bad_streak = self.good_streak + 1, 0
            if not self.healthy and self.good_streak >= self.rise:
                self.healthy, self.unhealthy_since = True, None
                return True
            return False
        self.good_streak, self.bad_streak = 0, self.bad_streak + 1
        if self.healthy and self.bad_streak >= self.fall:
            self.mark_down(now)
            return True
        return False

    def mark_down(self, now: float) -> None:
        """Out now, whatever the streak (the proxy saw the backend fail): `rise` good probes bring it back."""
        self.good_streak = 0
        if self.healthy:
            self.healthy, self.unhealthy_since = False, now
