"""The live record of one backend: its spec, state and counters, shared by the pool that
mutates it, the supervisor that watches it, and the dispatcher and proxy that use it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from backend.settings import BackendSpec
from backend.state import BackendState
from backend.warmup import WarmupRun

__all__ = ["Backend"]


@dataclass(eq=False)
class Backend:
    """Live state of one backend, mutated only by the pool (and in_flight/served by the proxy)."""

    spec: BackendSpec
    state: BackendState = BackendState.STARTING
    pid: int | None = None
    in_flight: int = 0  # maintained by the proxy
    served: int = 0  # maintained by the proxy
    restarts: int = 0
    health_failures: int = 0  # failed health checks while up; maintained by the supervisor
    model_reloads: int = 0  # dispatches that switch its model configuration; maintained by the dispatcher
    slots: int = 1  # requests it may hold at once now; maintained by the dispatcher
    slot_mode: str = "fixed"  # fixed (backends.slots: N) or auto (learned); maintained by the dispatcher
    model_key: tuple[int, bool] | None = None  # (model_sample_rate, model_use_phoneme); None: not loaded
    last_error: str | None = None
    outlier: str | None = None  # why outlier detection flags it: ejected, or kept as the last ready backend
    warmup: WarmupRun | None = None  # its latest successful warm-up; set by the pool
    since: float = field(default_factory=time.monotonic)  # monotonic time of the last state change

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def id(self) -> str:
        return self.spec.id

    def as_json(self) -> dict[str, Any]:
        model = None
        if self.model_key is not None:
            model = {"sample_rate": self.model_key[0], "use_phoneme": self.model_key[1]}
        return {
            "id": self.id,
            "url": self.url,
            "state": self.state.value,
            "pid": self.pid,
            "in_flight": self.in_flight,
            "slots": self.slots,
            "slot_mode": self.slot_mode,
            "served": self.served,
            "restarts": self.restarts,
            "model": model,
            "last_error": self.last_error,
            "outlier": self.outlier,
            "managed": self.spec.managed,
        }
