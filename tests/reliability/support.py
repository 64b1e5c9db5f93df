"""What every reliability case shares: recording its figures, and reading the sidecar's loop lag.

Each case calls ``record(case, **figures)`` with what it measured (statuses, times, bytes, lost
requests, the sidecar's worst event-loop lag). When ``GLMTTS_RELIABILITY_OUT`` names a file, each
record is appended to it as one JSON line; ``python -m tests.reliability.report FILE`` then writes
the figures table of RELIABILITY.md (``scripts/reliability`` does both).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from tests.support import http

OUT_ENV = "GLMTTS_RELIABILITY_OUT"
MAX_LOOP_LAG_S = 0.1  # the bound on the sidecar's event-loop lag, in every case
_LAG_MAX = re.compile(r"^glmtts_sidecar_event_loop_lag_max_seconds ([0-9.eE+-]+)$", re.MULTILINE)


def record(case: str, **figures: Any) -> None:
    """Keep one case's figures (a no-op unless GLMTTS_RELIABILITY_OUT is set)."""
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    line = json.dumps({"case": case, "at": time.time(), "figures": figures}, ensure_ascii=False, default=str)
    with Path(out).open("a", encoding="utf-8") as sink:
        sink.write(line + "\n")


def loop_lag_max_s(base_url: str) -> float:
    """The sidecar's worst event-loop lag since it started, from its /metrics."""
    status, _, body = http("GET", base_url + "/metrics", timeout=10)
    assert status == 200, (status, body[:200])
    match = _LAG_MAX.search(body.decode())
    assert match, "glmtts_sidecar_event_loop_lag_max_seconds missing from /metrics"
    return float(match.group(1))


def assert_loop_lag_ok(base_url: str) -> float:
    """Assert the sidecar's event loop never lagged ``MAX_LOOP_LAG_S`` or more; return the worst lag."""
    lag = loop_lag_max_s(base_url)
    assert lag < MAX_LOOP_LAG_S, f"event-loop lag reached {lag * 1000:.0f} ms (bound {MAX_LOOP_LAG_S * 1000:.0f} ms)"
    return lag
