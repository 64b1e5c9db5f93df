"""Admission: answer now what would otherwise time out later. Pure.

A job is turned away, with the reason named and a Retry-After predicted from the backlog, when
no backend can serve (503), the queue or the tenant's share of it is full (429), or -- when the
policy says so -- its predicted wait plus service already exceeds its deadline (429).

Two exceptions keep a wrong prediction from locking admission: a job that would start at once is
never refused for its wait (it has none); and when nothing runs and nothing waits, a job that
would start at once is admitted even if its predicted service alone exceeds its deadline, as long
as no completion has confirmed the prediction for its configuration and the deadline would be met
were the prediction ``LEARN_FACTOR`` times too slow: its own completion is what corrects the cost
model, and refusing everything would teach it nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Reason(Enum):
    NO_BACKEND = "no_backend"  # nothing is running or starting
    QUEUE_FULL = "queue_full"  # the total bound
    TENANT_QUEUE_FULL = "tenant_queue_full"  # this tenant's bound
    DEADLINE_UNMEETABLE = "deadline_unmeetable"  # predicted wait + service > deadline


# An unconfirmed prediction may be this many times too slow (a prior for a GPU in front of a far
# faster backend): a job whose deadline that would meet may be admitted to learn from.
LEARN_FACTOR = 20.0

STATUS = {
    Reason.NO_BACKEND: 503,
    Reason.QUEUE_FULL: 429,
    Reason.TENANT_QUEUE_FULL: 429,
    Reason.DEADLINE_UNMEETABLE: 429,
}


@dataclass(frozen=True, kw_only=True)
class Rejection:
    reason: Reason
    detail: str
    retry_after_s: float | None  # None: trying again will not help

    @property
    def status(self) -> int:
        return STATUS[self.reason]


@dataclass(frozen=True, kw_only=True)
class Outlook:
    """What the scheduler predicts for one job if it were admitted now."""

    can_serve: bool  # some backend is ready or starting
    queued: int
    max_queued: int
    tenant_queued: int
    tenant_max: int
    wait_s: float  # predicted time until its service begins: in the queue, then a model reload if it needs one
    starts_now: bool  # it would be dispatched at once: a slot it may use is free and nothing goes first
    idle: bool  # nothing is running or queued
    confirmed: bool  # completions back the cost model's prediction for its configuration
    service_s: float  # predicted service time (mean)
    budget_s: float  # deadline minus now
    next_free_s: float  # predicted time until any slot frees (a place opens in a full queue)
    tenant_next_s: float  # predicted time until this tenant's next queued job leaves the queue (when it is full)


def admit(outlook: Outlook, *, reject_unmeetable: bool) -> Rejection | None:
    """None to admit, else why not and when to try again."""
    o = outlook
    if not o.can_serve:
        return Rejection(reason=Reason.NO_BACKEND, detail="No backend is running or starting",
                         retry_after_s=max(1.0, o.next_free_s))
    if o.queued >= o.max_queued:
        return Rejection(reason=Reason.QUEUE_FULL,
                         detail=f"The queue is full ({o.queued} requests waiting)",
                         retry_after_s=o.next_free_s)
    if o.tenant_queued >= o.tenant_max:
        return Rejection(reason=Reason.TENANT_QUEUE_FULL,
                         detail=f"Your requests fill your share of the queue ({o.tenant_queued} waiting)",
                         retry_after_s=o.tenant_next_s)
    if not reject_unmeetable or _learns(o):
        return None
    if o.service_s > o.budget_s:
        return Rejection(reason=Reason.DEADLINE_UNMEETABLE,
                         detail=(f"Predicted service {o.service_s:.1f} s alone exceeds the {o.budget_s:.1f} s "
                                 "deadline"), retry_after_s=None)
    if not o.starts_now and o.wait_s + o.service_s > o.budget_s:
        return Rejection(
            reason=Reason.DEADLINE_UNMEETABLE,
            detail=(f"Predicted wait {o.wait_s:.1f} s plus service {o.service_s:.1f} s exceeds the "
                    f"{o.budget_s:.1f} s deadline"),
            # Once the backlog ahead has drained by the excess, it would fit.
            retry_after_s=o.wait_s + o.service_s - o.budget_s)
    return None


def _learns(o: Outlook) -> bool:
    """Admitted whatever its prediction: the one way to correct a prediction no completion backs."""
    return o.starts_now and o.idle and not o.confirmed and o.service_s <= o.budget_s * LEARN_FACTOR
