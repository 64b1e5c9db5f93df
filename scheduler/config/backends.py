"""The `backends` section as the scheduler reads it: the backend layer's settings
(backend.settings), plus what `slots` means to the dispatcher."""

from __future__ import annotations

from backend import settings
from scheduler.core.concurrency import AdaptiveSettings, SlotPolicy

__all__ = ["BackendsConfig"]


class BackendsConfig(settings.BackendsConfig):
    """backend.settings.BackendsConfig, validated the same; no keys of its own."""

    def slot_policy(self) -> SlotPolicy:
        """`slots` and its knobs, as the dispatcher uses them."""
        if self.slots != "auto":
            return SlotPolicy(fixed=self.slots)
        adaptive = self.adaptive
        return SlotPolicy(fixed=None, adaptive=AdaptiveSettings(
            max_slots=self.max_slots, min_gain=adaptive.min_gain, samples=adaptive.samples,
            reprobe_s=adaptive.reprobe_s, latency_headroom=adaptive.latency_headroom))
