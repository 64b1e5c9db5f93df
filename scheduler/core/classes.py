"""Length classes: the rules that sort a job by its text's length, and the backend time each
class is owed.

A class may cap its jobs in service, lift them to a higher band, let them run on extra slots, and
keep a minimum share of recent backend time while they wait (``ClassShares``). Pure: time comes in
as an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Seconds over which recent rates are averaged: the admitted work per band (exponential decay,
# scheduler.core.forecast) and the backend time a class is owed (``ClassShares``). Long enough to
# smooth Poisson arrivals, short enough to follow a change of load within a minute.
RATE_WINDOW_S = 30.0


@dataclass(frozen=True, kw_only=True)
class ClassRule:
    name: str
    max_chars: int | None  # None: no upper bound (the last class)
    max_in_service: int | None = None  # pool-wide cap on jobs of this class in service
    band: int | None = None  # its jobs queue in this band or a higher one (0 = highest); None: as asked
    extra_slots: int = 0  # its jobs may run on a backend this many beyond the backend's slots
    min_share: float = 0.0  # of recent backend time, kept while its jobs wait (they go first below it)


class LengthClasses:
    def __init__(self, rules: Sequence[ClassRule]) -> None:
        if not rules or rules[-1].max_chars is not None:
            raise ValueError("the last length class must have no max_chars")
        self.rules = tuple(rules)
        self._named = {r.name: r for r in self.rules}

    def of(self, chars: int) -> ClassRule:
        return next(r for r in self.rules if r.max_chars is None or chars <= r.max_chars)

    def extra_slots(self, name: str) -> int:
        rule = self._named.get(name)
        return 0 if rule is None else rule.extra_slots

    def min_share(self, name: str) -> float:
        rule = self._named.get(name)
        return 0.0 if rule is None else rule.min_share

    def cap(self, name: str, pool_slots: int) -> int | None:
        """The class's cap on jobs in service; a capped class never fills a pool of 2+ slots. A
        class the rules do not name (a job queued before a reload renamed it) has none."""
        rule = self._named.get(name)
        if rule is None or rule.max_in_service is None:
            return None
        cap = rule.max_in_service
        return min(cap, pool_slots - 1) if pool_slots > 1 else min(cap, 1)


class ClassShares:
    """Backend time each length class is owed: a class with jobs waiting earns ``min_share`` of
    the pool's backend-seconds as time passes, and pays the predicted seconds of each job of it that
    is dispatched. A class owed time (credit > 0) is starved: its jobs go first, whatever waits in
    higher bands, until it has been paid. Credit is bounded either way by RATE_WINDOW_S of its
    share (or by the job just given): a class is not paid back for more than that, nor held back
    for having had more."""

    def __init__(self) -> None:
        self.credit: dict[str, float] = {}
        self.at: float | None = None
        self._waiting: frozenset[str] = frozenset()  # the classes that waited since ``at``
        self._backends = 0

    def copy(self) -> ClassShares:
        shares = ClassShares()
        shares.credit, shares.at = dict(self.credit), self.at
        shares._waiting, shares._backends = self._waiting, self._backends
        return shares

    def advance(self, now: float, waiting: Iterable[str], classes: LengthClasses, backends: int) -> None:
        """Credit the classes that waited since the last call; ``waiting`` and ``backends`` (ready
        backends) hold from now on."""
        if self.at is not None and now > self.at:
            elapsed = now - self.at
            for cls in self._waiting:
                rate = classes.min_share(cls) * self._backends
                if rate > 0:
                    self.credit[cls] = min(self.credit.get(cls, 0.0) + rate * elapsed, rate * RATE_WINDOW_S)
        if self.at is None or now > self.at:
            self.at = now
        self._waiting, self._backends = frozenset(waiting), backends
        for cls, credit in list(self.credit.items()):
            if cls not in self._waiting and credit > 0:
                del self.credit[cls]  # nothing waits: time it was owed is not banked

    def note(self, cls: str, work_s: float, classes: LengthClasses, backends: int) -> None:
        """A job of ``cls`` predicted to take ``work_s`` was dispatched."""
        floor = -max(classes.min_share(cls) * max(1, backends) * RATE_WINDOW_S, work_s)  # a long job is paid whole
        self.credit[cls] = max(self.credit.get(cls, 0.0) - work_s, floor)

    def starved(self, waiting: Iterable[str]) -> set[str]:
        """The classes in ``waiting`` that are owed backend time."""
        return {cls for cls in waiting if self.credit.get(cls, 0.0) > 0}
