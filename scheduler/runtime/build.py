"""From a validated configuration to the scheduling core's objects (the one place that knows both)."""

from __future__ import annotations

from scheduler.config import HIGHEST_BAND, SidecarConfig, TenantPolicy
from scheduler.core.classes import ClassRule, LengthClasses
from scheduler.core.cost import CostModel, CostPriors
from scheduler.core.deadlines import Tier, make_policy
from scheduler.core.queue import make_queue
from scheduler.core.scheduler import Scheduler
from scheduler.core.tenants import DEFAULT_TENANT, Tenant, TenantDirectory


def build_scheduler(config: SidecarConfig, *, cost: CostModel | None = None) -> Scheduler:
    """``cost``: keep a learned model across a reload of the policies."""
    c, d, q = config.cost, config.deadlines, config.queue
    if cost is None:
        cost = CostModel(CostPriors(**c.model_dump()))  # the same keys: CostConfig takes its defaults from it
    tiers = [Tier(**t.model_dump()) for t in d.tiers]
    policy = make_policy(d.policy, tiers=tiers,
                         factor=d.learned.factor, buffer_s=d.learned.buffer_s, min_s=d.learned.min_s,
                         max_s=d.learned.max_s)
    queue = make_queue(q.order, max_size=q.max_size, max_per_tenant=q.max_per_tenant,
                       within_tenant=q.within_tenant, aging_s=q.aging_s, band_aging_s=q.band_aging_s)
    bands = config.priorities.bands

    def band(name: str | None) -> int | None:
        return None if name is None else 0 if name == HIGHEST_BAND else bands.index(name)

    classes = LengthClasses([ClassRule(name=k.name, max_chars=k.max_chars, max_in_service=k.max_in_service,
                                       band=band(k.band),
                                       extra_slots=k.extra_slots, min_share=k.min_share)
                             for k in config.classes])
    return Scheduler(queue=queue, cost=cost, classes=classes, deadlines=policy, reject_unmeetable=d.reject_unmeetable)


def build_tenants(config: SidecarConfig) -> TenantDirectory:
    bands = config.priorities.bands
    t = config.tenants

    def tenant(name: str, policy: TenantPolicy, unlisted: tuple[int, ...]) -> Tenant:
        """``unlisted``: the bands of a policy that lists none."""
        allowed = tuple(sorted(bands.index(b) for b in policy.bands)) if policy.bands else unlisted
        return Tenant(name=name, weight=policy.weight, bands=allowed,
                      max_queued=config.queue.tenant_bound(policy))

    # Anonymous requests may not ask for more than the default band: the bands above it are for
    # tenants that identify themselves (or for a default tenant whose bands say so).
    below_default = tuple(range(bands.index(config.priorities.default), len(bands)))
    return TenantDirectory(
        tenants=[tenant(item.name, item, ()) for item in t.list],
        keys={key: item.name for key, item in t.by_key().items()},
        default=tenant(DEFAULT_TENANT, t.default, below_default), band_names=bands,
        default_band=config.priorities.default, require_key=t.require_key, trust_header=t.trust_header)
