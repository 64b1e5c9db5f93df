"""Upstream's own concurrency limits and timeouts (its ``TTSConfig`` and ``ConcurrencyManager``).

Upstream reads these from environment variables with these defaults; so does the emulator.
Requests wait on a per-length-class semaphore (no timeout while waiting), then inference runs
under a length-tiered timeout that answers 408 but does not stop the inference.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from glmtts.contract import LONG_TEXT_THRESHOLD


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    short_concurrency: int = 10
    long_concurrency: int = 3
    threshold_chars: int = LONG_TEXT_THRESHOLD  # longer texts use the long semaphore
    short_timeout_s: int = 60  # <= 50 chars
    medium_timeout_s: int = 300  # <= threshold
    long_timeout_s: int = 600
    queue_max_size: int = 100
    worker_count: int = 5
    queue_enabled: bool = False
    workers: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UpstreamConfig:
        env = os.environ if env is None else env
        return cls(
            short_concurrency=_env_int(env, "SHORT_TEXT_CONCURRENCY", 10),
            long_concurrency=_env_int(env, "LONG_TEXT_CONCURRENCY", 3),
            threshold_chars=_env_int(env, "TEXT_LENGTH_THRESHOLD", LONG_TEXT_THRESHOLD),
            short_timeout_s=_env_int(env, "SHORT_TEXT_TIMEOUT", 60),
            medium_timeout_s=_env_int(env, "MEDIUM_TEXT_TIMEOUT", 300),
            long_timeout_s=_env_int(env, "LONG_TEXT_TIMEOUT", 600),
            queue_max_size=_env_int(env, "QUEUE_MAX_SIZE", 100),
            worker_count=_env_int(env, "WORKER_COUNT", 5),
            queue_enabled=env.get("ENABLE_QUEUE_MODE", "false").lower() == "true",
            workers=_env_int(env, "WORKERS", 1),
        )

    def timeout_for(self, chars: int) -> int:
        if chars <= 50:
            return self.short_timeout_s
        if chars <= self.threshold_chars:
            return self.medium_timeout_s
        return self.long_timeout_s

    def is_long(self, chars: int) -> bool:
        return chars > self.threshold_chars

    def as_json(self) -> dict[str, Any]:
        """The ``config`` object of ``GET /api/v1/stats/concurrency``."""
        return {
            "concurrency": {
                "short_text": self.short_concurrency,
                "long_text": self.long_concurrency,
                "threshold": self.threshold_chars,
            },
            "timeout": {
                "short_text": self.short_timeout_s,
                "medium_text": self.medium_timeout_s,
                "long_text": self.long_timeout_s,
            },
            "queue": {
                "max_size": self.queue_max_size,
                "worker_count": self.worker_count,
                "enabled": self.queue_enabled,
            },
            "workers": self.workers,
        }


@dataclass
class _ClassCounter:
    limit: int
    active: int = 0
    total: int = 0
    semaphore: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.limit)

    def as_json(self) -> dict[str, int]:
        return {"active": self.active, "total": self.total, "limit": self.limit,
                "available": self.limit - self.active}


class UpstreamConcurrency:
    """Upstream's two semaphores and the counters behind ``/api/v1/stats/concurrency``."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._short = _ClassCounter(config.short_concurrency)
        self._long = _ClassCounter(config.long_concurrency)

    def _counter(self, chars: int) -> _ClassCounter:
        return self._long if self.config.is_long(chars) else self._short

    async def acquire(self, chars: int) -> None:
        counter = self._counter(chars)
        await counter.semaphore.acquire()
        counter.active += 1
        counter.total += 1

    def release(self, chars: int) -> None:
        counter = self._counter(chars)
        counter.semaphore.release()
        counter.active = max(0, counter.active - 1)

    def stats(self) -> dict[str, Any]:
        return {"short_text": self._short.as_json(), "long_text": self._long.as_json()}
