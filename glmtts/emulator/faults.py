"""Faults the emulator can be told to show, for testing what sits in front of it.

Set at start by flags or at run time by ``POST /emulator/faults`` (JSON, same names); the
emulator-only endpoints themselves never fail, except under ``hang``, which stops everything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class Faults:
    # Inference failures: 200 (upstream's `success: false`) or 500 (upstream's HTTPException).
    fail_status: int | None = None
    fail_count: int | None = None  # only the next N TTS requests fail; None = every one
    crash_after: int | None = None  # the process exits when TTS request N+1 arrives
    hang: bool = False  # stop answering every request, health included (connections stay open)
    hang_after: int | None = None  # start hanging when TTS request N+1 arrives
    health_flap_s: float | None = None  # health answers 503 every other period of this length

    @classmethod
    def from_json(cls, data: Any) -> Faults:
        if not isinstance(data, dict):
            raise FaultSpecError("faults must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise FaultSpecError(f"unknown fault(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        faults = cls(**data)
        faults.validate()
        return faults

    def validate(self) -> None:
        if self.fail_status not in (None, 200, 500):
            raise FaultSpecError("fail_status must be 200 or 500")
        for name in ("fail_count", "crash_after", "hang_after"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise FaultSpecError(f"{name} must be a non-negative integer")
        if not isinstance(self.hang, bool):
            raise FaultSpecError("hang must be true or false")
        flap = self.health_flap_s
        if flap is not None and (isinstance(flap, bool) or not isinstance(flap, int | float) or flap <= 0):
            raise FaultSpecError("health_flap_s must be a positive number")

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
