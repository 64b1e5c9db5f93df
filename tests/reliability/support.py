"""What every reliability case shares: counting lost requests, the sidecar's event-loop lag during
the case, and recording the figures.

- ``Tally``: how each request of a case ended, as its client saw it. ``lost`` counts the admitted
  requests that got no final answer, or is None when the case admitted nothing.
- ``Admissions``: the sidecar's own count of the TTS requests it admitted, from ``/metrics``. Two
  readings bracket a case that sends raw bytes, where the client cannot tell a request the sidecar
  never took (a smuggled tail, a head never finished) from one it took and lost.
- ``case_loop_lag_s`` / ``assert_loop_lag_ok``: the worst event-loop lag during the case, from the
  sidecar's lag histogram now against its reading at the end of the previous case on the same
  sidecar (or at ``mark_loop_lag``, or at the sidecar's start).
- ``record(case, **figures)``: when ``GLMTTS_RELIABILITY_OUT`` names a file, each record is
  appended to it as one JSON line; ``python -m tests.reliability.report FILE`` then writes the
  figures table of RELIABILITY.md (``scripts/reliability`` does both).
"""

from __future__ import annotations

import enum
import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import http

OUT_ENV = "GLMTTS_RELIABILITY_OUT"
MAX_LOOP_LAG_S = 0.1  # the bound on the sidecar's event-loop lag, in every case
PREFIX = "glmtts_sidecar_"


def record(case: str, **figures: Any) -> None:
    """Keep one case's figures (a no-op unless GLMTTS_RELIABILITY_OUT is set); ``lost`` is required."""
    assert "lost" in figures, f"{case}: record() needs lost= (None when the case admits nothing)"
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    line = json.dumps({"case": case, "at": time.time(), "figures": figures}, ensure_ascii=False, default=str)
    with Path(out).open("a", encoding="utf-8") as sink:
        sink.write(line + "\n")


# --- how each request ended -------------------------------------------------------------------------


class Outcome(enum.Enum):
    """How one request ended, as its client saw it."""

    ANSWERED = "answered"  # admitted to the TTS path; a complete answer from a backend, or a deadline/502
    SERVED = "served"  # a complete 2xx/3xx the sidecar gave itself (health, metrics, admin actions)
    REFUSED = "refused"  # a complete 4xx or 503 the sidecar gave before any work: never admitted
    NO_ANSWER = "no answer"  # the connection ended before a status line
    CUT = "cut"  # an answer began, and the connection ended before its body did
    HUNG = "hung"  # nothing whole came back within the client's timeout


LOST = frozenset({Outcome.NO_ANSWER, Outcome.CUT, Outcome.HUNG})
# Answers the sidecar gives a request it admitted: its deadline passed, or every backend failed it.
AFTER_ADMISSION = frozenset({"deadline", "backend_failed"})


def reason_of(body: bytes) -> str | None:
    """The ``reason`` of a JSON error body (the sidecar's own errors carry one), else None."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    reason = payload.get("reason") if isinstance(payload, dict) else None
    return reason if isinstance(reason, str) else None


def classify(status: int, *, from_backend: bool, reason: str | None) -> Outcome:
    """The outcome of a complete answer: from a backend (it names one in ``X-Backend``) or given
    after admission (``reason``), answered; a 4xx or 503 the sidecar gave itself, refused; any
    other, served."""
    if from_backend or reason in AFTER_ADMISSION:
        return Outcome.ANSWERED
    if 400 <= status < 500 or status == 503:
        return Outcome.REFUSED
    return Outcome.SERVED


@dataclass
class Tally:
    """The outcomes of one case's requests; each request is added once."""

    outcomes: Counter[Outcome] = field(default_factory=Counter)

    def answer(self, status: int, headers: Mapping[str, str] | None = None, body: bytes = b"") -> Outcome:
        """A complete answer came back."""
        from_backend = any(name.lower() == "x-backend" for name in headers or {})
        return self.count(classify(status, from_backend=from_backend, reason=reason_of(body)))

    def fail(self, outcome: Outcome) -> Outcome:
        """No final answer came back: ``outcome`` says how (no answer, cut, hung)."""
        assert outcome in LOST, outcome
        return self.count(outcome)

    def count(self, outcome: Outcome) -> Outcome:
        self.outcomes[outcome] += 1
        return outcome

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def admitted(self) -> int:
        """Requests not refused at the edge (one that got no answer counts: it was sent whole)."""
        return self.requests - self.outcomes[Outcome.REFUSED]

    @property
    def lost(self) -> int | None:
        """Admitted requests without a final answer; None when nothing was admitted."""
        if not self.admitted:
            return None
        return sum(self.outcomes[o] for o in LOST)

    def lost_given(self, admitted_tts: int) -> int | None:
        """``lost`` where the sidecar's counters say how many TTS requests it admitted (raw bytes:
        the client cannot tell which of its unanswered requests were taken): those less the complete
        answers the client got to admitted TTS requests, and any answer cut short. None when
        nothing was admitted by either count."""
        if not self.admitted and not admitted_tts:
            return None
        unanswered = max(0, admitted_tts - self.outcomes[Outcome.ANSWERED])
        return max(unanswered, sum(self.outcomes[o] for o in LOST))

    def figures(self) -> dict[str, int]:
        """The counts by outcome, for record()."""
        return {o.value: self.outcomes[o] for o in Outcome if self.outcomes[o]}


# --- the sidecar's own counters ---------------------------------------------------------------------


def scrape(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the sidecar's /metrics: (name, labels, value)."""
    status, _, body = http("GET", base_url + "/metrics", timeout=10)
    assert status == 200, (status, body[:200])
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(body.decode())
            for s in family.samples]


# glmtts_sidecar_requests_total outcomes of admitted requests. Its "deadline" also counts bodies that
# never arrived (408 at the edge), so expiries are taken from glmtts_sidecar_deadline_expiries_total.
ADMITTED_OUTCOMES = frozenset({"ok", "failed", "backend_error", "client_gone"})
IN_HAND = frozenset({PREFIX + "queue_depth", PREFIX + "backend_in_flight"})


@dataclass(frozen=True)
class Admissions:
    """At one scrape: TTS requests the sidecar admitted and finished, and those still in its hands."""

    finished: int  # outcomes ok, failed, backend_error, client_gone, and deadline expiries
    in_hand: int  # queued, or holding a backend slot

    @classmethod
    def read(cls, base_url: str) -> Admissions:
        finished = in_hand = 0.0
        for name, labels, value in scrape(base_url):
            if name == PREFIX + "requests_total":
                finished += value if labels.get("outcome") in ADMITTED_OUTCOMES else 0.0
            elif name == PREFIX + "deadline_expiries_total":
                finished += value
            elif name in IN_HAND:
                in_hand += value
        return cls(finished=round(finished), in_hand=round(in_hand))

    def admitted_since(self, base_url: str, *, settle_s: float = 5.0) -> int:
        """TTS requests admitted from this reading until now. Work still in the sidecar's hands is
        given ``settle_s`` to finish first; what is left then counts too (it has no answer yet)."""
        deadline = time.monotonic() + settle_s
        now = Admissions.read(base_url)
        while now.in_hand > self.in_hand and time.monotonic() < deadline:
            time.sleep(0.05)
            now = Admissions.read(base_url)
        return (now.finished + now.in_hand) - (self.finished + self.in_hand)


# --- the event loop's lag during a case -----------------------------------------------------------------

LAG = PREFIX + "event_loop_lag_seconds"


@dataclass(frozen=True)
class LagHistogram:
    """The sidecar's event-loop lag histogram at one scrape."""

    started: float  # when its probe started (the histogram's _created): one process's counts
    bounds: tuple[float, ...]  # bucket upper bounds, ascending, the last +Inf
    counts: tuple[float, ...]  # cumulative sample counts, one per bound

    @classmethod
    def read(cls, base_url: str) -> LagHistogram:
        buckets: list[tuple[float, float]] = []
        started = None
        for name, labels, value in scrape(base_url):
            if name == LAG + "_bucket":
                buckets.append((float(labels["le"]), value))
            elif name == LAG + "_created":
                started = value
        assert buckets and started is not None, f"{LAG} (with _created) missing from /metrics"
        buckets.sort()
        return cls(started, tuple(b for b, _ in buckets), tuple(c for _, c in buckets))

    def worst_since(self, before: LagHistogram | None) -> float:
        """The upper bound of the highest bucket that got a sample after ``before`` (None: since the
        probe started); 0.0 when no sample came."""
        new = self._new(before)  # cumulative
        return next((bound for bound, count in zip(self.bounds, new, strict=True) if count >= new[-1] > 0), 0.0)

    def samples_since(self, before: LagHistogram | None) -> int:
        return round(self._new(before)[-1])

    def _new(self, before: LagHistogram | None) -> list[float]:
        if before is None or before.started != self.started:  # None, or another process on the address
            return list(self.counts)
        assert before.bounds == self.bounds, (before.bounds, self.bounds)
        return [now - then for now, then in zip(self.counts, before.counts, strict=True)]


_marks: dict[str, LagHistogram] = {}  # base URL -> its histogram at the end of the last case


def mark_loop_lag(base_url: str) -> None:
    """Start a case here: its loop lag is measured from now (else from the last case's end on this
    sidecar, or from its start)."""
    _marks[base_url] = LagHistogram.read(base_url)


def case_loop_lag_s(base_url: str) -> float:
    """The worst event-loop lag of the case that ends now, to within a histogram bucket (its upper
    bound; ``inf`` past the last): since ``mark_loop_lag``, the previous call for this sidecar, or
    its start. The next case starts here. A case shorter than the probe's interval waits for one
    sample to come: the loop's state at the case's end is part of the case."""
    before = _marks.get(base_url)
    now = LagHistogram.read(base_url)
    deadline = time.monotonic() + 1.0
    while before is not None and now.samples_since(before) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
        now = LagHistogram.read(base_url)
    worst = now.worst_since(before)
    _marks[base_url] = now
    return worst


def assert_loop_lag_ok(base_url: str) -> float:
    """Assert the sidecar's event loop never lagged more than ``MAX_LOOP_LAG_S`` during the case
    that ends now; return the worst lag (see ``case_loop_lag_s``)."""
    lag = case_loop_lag_s(base_url)
    assert_lag_within_bound(lag)
    return lag


def assert_lag_within_bound(lag: float, bound_s: float = MAX_LOOP_LAG_S) -> None:
    shown = "past the last bucket" if math.isinf(lag) else f"up to {lag * 1000:g} ms"
    assert lag <= bound_s, f"event-loop lag reached {shown} (bound {bound_s * 1000:g} ms)"
