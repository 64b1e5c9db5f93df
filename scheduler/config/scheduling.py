"""The sections the scheduling core is built from: limits, length classes, the cost model's priors,
deadlines, priority bands, the queue and retries (scheduler.runtime.build turns them into core
objects).

Where the core has a default of its own (the seed's cost priors, the seed's deadline tiers), the
schema takes it from there, so each is written once.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from backend.settings.base import ConfigSection, Key, Problems, raise_if
from scheduler.config.base import LABEL, ladder_problems
from scheduler.config.tenants import TenantPolicy
from scheduler.core.cost import CostPriors
from scheduler.core.deadlines import SEED_TIERS

__all__ = [
    "DEFAULT_CLASSES",
    "HIGHEST_BAND",
    "ClassConfig",
    "CostConfig",
    "DeadlinesConfig",
    "LearnedDeadlineConfig",
    "LimitsConfig",
    "PrioritiesConfig",
    "QueueConfig",
    "RetriesConfig",
    "TierConfig",
]

HIGHEST_BAND = "highest"  # classes[].band: the first of priorities.bands, whatever its name
_SEED_PRIORS = CostPriors()


class LimitsConfig(ConfigSection):
    max_body_bytes: StrictInt = Field(default=20 * 1024 * 1024, ge=1024)
    max_text_chars: StrictInt = Field(default=10_000, ge=1)
    body_timeout_s: StrictFloat = Field(default=30.0, gt=0)  # a request body must arrive whole within this
    idle_timeout_s: StrictFloat = Field(default=75.0, gt=0)  # a connection without a whole request head


class ClassConfig(ConfigSection):
    """A length class: texts of up to `max_chars` characters not in an earlier class (None: no bound)."""

    name: StrictStr = Field(pattern=LABEL)
    max_chars: StrictInt | None = Field(ge=1)
    max_in_service: StrictInt | None = Field(default=None, ge=1)  # pool-wide; None: no cap
    band: StrictStr | None = None  # a priorities.bands name or "highest": its requests queue at least this high
    extra_slots: StrictInt = Field(default=0, ge=0, le=64)  # its requests may exceed a backend's slots by this many
    min_share: StrictFloat = Field(default=0.2, ge=0, le=1)  # of backend time, kept while its requests wait


DEFAULT_CLASSES = (
    ClassConfig(name="short", max_chars=50, band=HIGHEST_BAND, extra_slots=1),
    ClassConfig(name="medium", max_chars=200),
    ClassConfig(name="long", max_chars=None),
)


class CostConfig(ConfigSection):
    """Priors of the service-time model, `base_s + per_unit_s * units`; the defaults are CostPriors'
    (the seed's 3.5 s / 80 s)."""

    base_s: StrictFloat = Field(default=_SEED_PRIORS.base_s, ge=0)
    per_unit_s: StrictFloat = Field(default=_SEED_PRIORS.per_unit_s, gt=0)
    p95_ratio: StrictFloat = Field(default=_SEED_PRIORS.p95_ratio, ge=1)
    prior_weight: StrictFloat = Field(default=_SEED_PRIORS.prior_weight, ge=0)
    window: StrictInt = Field(default=_SEED_PRIORS.window, ge=16, le=100_000)
    reload_s: StrictFloat = Field(default=_SEED_PRIORS.reload_s, ge=0)
    slow_ratio: StrictFloat = Field(default=_SEED_PRIORS.slow_ratio, gt=1)
    slow_min_samples: StrictInt = Field(default=_SEED_PRIORS.slow_min_samples, ge=1)


class TierConfig(ConfigSection):
    max_chars: StrictInt | None = Field(ge=1)
    timeout_s: StrictFloat = Field(gt=0)
    per_char_s: StrictFloat = Field(default=0.0, ge=0)  # plus this per character: a deadline that grows with the text


class LearnedDeadlineConfig(ConfigSection):
    factor: StrictFloat = Field(default=2.0, ge=1)
    buffer_s: StrictFloat = Field(default=10.0, ge=0)
    min_s: StrictFloat = Field(default=15.0, gt=0)
    max_s: StrictFloat = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _max_not_below_min(self) -> LearnedDeadlineConfig:
        if self.max_s < self.min_s:
            raise Problems([(("max_s",), f"must be >= min_s ({self.min_s})")])
        return self

    def deadline_s(self, p95_s: float) -> float:
        """clamp(p95_s * factor + buffer_s, min_s, max_s)."""
        return min(max(p95_s * self.factor + self.buffer_s, self.min_s), self.max_s)


class DeadlinesConfig(ConfigSection):
    policy: Literal["tiers", "learned"] = "tiers"
    tiers: tuple[TierConfig, ...] = tuple(  # the seed's, as the core writes them
        TierConfig(max_chars=tier.max_chars, timeout_s=tier.timeout_s, per_char_s=tier.per_char_s)
        for tier in SEED_TIERS
    )
    learned: LearnedDeadlineConfig = Field(default_factory=LearnedDeadlineConfig)
    client_header: StrictBool = True
    reject_unmeetable: StrictBool = True

    @field_validator("tiers")
    @classmethod
    def _check_tiers(cls, tiers: tuple[TierConfig, ...]) -> tuple[TierConfig, ...]:
        raise_if(ladder_problems([tier.max_chars for tier in tiers], "tier"))
        return tiers

    def tier_for(self, chars: int) -> float:
        """The `tiers` deadline, in seconds, of a text of `chars` characters."""
        tier = next(t for t in self.tiers if t.max_chars is None or chars <= t.max_chars)
        return tier.timeout_s + tier.per_char_s * chars


class PrioritiesConfig(ConfigSection):
    bands: tuple[StrictStr, ...] = ("interactive", "standard", "batch")  # highest first
    default: StrictStr = "standard"

    @field_validator("bands")
    @classmethod
    def _check_bands(cls, bands: tuple[str, ...]) -> tuple[str, ...]:
        if not bands:
            raise Problems([((), "must list at least one band")])
        problems: list[tuple[Key, str]] = []
        for i, band in enumerate(bands):
            if not re.fullmatch(LABEL, band):
                problems.append(((i,), f"band name {band!r} must match {LABEL}"))
            elif band == HIGHEST_BAND:
                problems.append(((i,), f"band name {band!r} is reserved (classes[].band: {HIGHEST_BAND} "
                                       "names the first band, whatever it is called)"))
            elif band in bands[:i]:
                problems.append(((i,), f"duplicate band {band!r} (also bands[{bands.index(band)}])"))
        raise_if(problems)
        return bands

    @model_validator(mode="after")
    def _default_is_a_band(self) -> PrioritiesConfig:
        if self.default not in self.bands:
            raise Problems([(("default",), f"{self.default!r} is not one of bands ({', '.join(self.bands)})")])
        return self


class QueueConfig(ConfigSection):
    max_size: StrictInt = Field(default=100, ge=1)
    max_per_tenant: StrictInt | None = Field(default=None, ge=1)  # None: max_size
    order: Literal["fair", "fifo"] = "fair"
    within_tenant: Literal["fifo", "shortest_first"] = "fifo"
    aging_s: StrictFloat = Field(default=30.0, gt=0)
    band_aging_s: StrictFloat = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> QueueConfig:
        problems: list[tuple[Key, str]] = []
        if self.max_per_tenant is not None and self.max_per_tenant > self.max_size:
            problems.append((("max_per_tenant",), f"must be <= max_size ({self.max_size})"))
        if self.order == "fifo" and self.within_tenant != "fifo":
            problems.append((
                ("within_tenant",), f"{self.within_tenant} needs order: fair (order: fifo is one FIFO for all)",
            ))
        raise_if(problems)
        return self

    def tenant_bound(self, policy: TenantPolicy) -> int:
        """Most waiting jobs of one tenant: its max_queued, else max_per_tenant, else max_size."""
        if policy.max_queued is not None:
            return policy.max_queued
        return self.max_size if self.max_per_tenant is None else self.max_per_tenant


class RetriesConfig(ConfigSection):
    max_attempts: StrictInt = Field(default=2, ge=1, le=10)  # 1: never retry
    budget_ratio: StrictFloat = Field(default=0.2, ge=0, le=1)
    budget_min: StrictInt = Field(default=3, ge=0)
