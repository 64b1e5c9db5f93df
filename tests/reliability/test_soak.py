"""Soak: a sidecar over emulator backends at 80 % of the pool's capacity, watched for slow decay.

An open-loop Poisson trace (bench.loadgen) of mixed short, medium and long texts from three
tenants (two API keys and the default tenant) runs for the whole duration, with a few prompt
reads on the side. Every few seconds the sidecar's RSS, open file descriptors and worst event-loop
lag are sampled. After a warm-up, nothing may creep: RSS grows < 10 %, the descriptors come back to
where they were, the p99 latency of the last window stays near the first window's, and every
request gets a definite answer (200, or 429 when a bound is hit; never a 5xx or no answer).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from bench.loadgen import TIMEOUT_REASON, LengthClass, Record, Tenant, make_trace, outcome_counts, replay
from glmtts.emulator.timing import ServiceModel, throughput_at
from glmtts.text import units
from tests.reliability.support import (
    MAX_LOOP_LAG_S,
    LagHistogram,
    Outcome,
    Tally,
    assert_loop_lag_ok,
    classify,
    record,
)
from tests.support import Service, sidecar_config, start_sidecar

# Latency, RSS and loop lag under load: in the "serial" xdist group (tests/conftest.py), never
# beside the suite's other heavy or timing-sensitive tests.
pytestmark = pytest.mark.xdist_group("serial")

TIME_SCALE = 0.03  # emulated GPU seconds x 0.03: a short text ~0.15 s, a 300-character one ~1.4 s
BACKENDS = 2
LOAD = 0.8  # of the pool's capacity
SAMPLE_EVERY_S = 5.0
RSS_GROWTH_BOUND = 0.10
FD_SLACK = 8  # descriptors the sidecar may hold beyond its count at the end of warm-up
P99_FACTOR, P99_SLACK_S = 1.5, 0.5
SEED = 20261130

MIX = (
    LengthClass(name="short", min_chars=10, max_chars=50, share=0.75),
    LengthClass(name="medium", min_chars=51, max_chars=200, share=0.15),
    LengthClass(name="long", min_chars=201, max_chars=300, share=0.10),
)
TENANTS = (
    Tenant(name="alpha", key="soak-alpha-key-0123456789", share=0.5, weight=2.0),
    Tenant(name="beta", key="soak-beta-key-0123456789", share=0.3),
    Tenant(name="default", key=None, share=0.2),
)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """One soak: how long the load runs, how much of it is warm-up, how wide a p99 window is."""

    duration_s: float
    warmup_s: float
    window_s: float
    label: str


PLANS = {
    120: Plan(duration_s=120.0, warmup_s=20.0, window_s=50.0, label="2 min"),
    1800: Plan(duration_s=1800.0, warmup_s=120.0, window_s=240.0, label="30 min"),
}


@dataclass(frozen=True)
class Sample:
    at_s: float  # since the load began
    rss_kib: int
    fds: int
    loop_lag_s: float  # the worst since the previous sample (the first: since the sidecar started)


@dataclass
class Watch:
    samples: list[Sample] = field(default_factory=list)
    prompt_reads: int = 0
    prompt_failures: list[str] = field(default_factory=list)


def pool_rps(texts: Sequence[str], time_scale: float, backends: int) -> float:
    """Requests per second the pool completes when never idle, one request per backend at a time,
    from the emulator's service model (as bench.overload's pool_capacity): backends /
    (time_scale x E[base_s + per_unit_s x units] x E[jitter])."""
    model = ServiceModel(time_scale=time_scale)
    jitter = math.exp(model.jitter_sigma ** 2 / 2)
    mean_s = sum(model.mean_seconds(units(t)) for t in texts) / len(texts) * time_scale * jitter
    return backends * throughput_at(model.throughput, 1) / mean_s


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def p99(values: Sequence[float]) -> float:
    """The nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def window_p99s(records: Sequence[Record], plan: Plan) -> list[tuple[float, float, int]]:
    """(window start, p99 latency of its answered requests, count) for consecutive windows after
    warm-up, by intended send time; the last window ends where the trace does."""
    out = []
    start = plan.warmup_s
    while start + plan.window_s <= plan.duration_s + 1e-9:
        inside = [r.latency_s for r in records if start <= r.intended_s < start + plan.window_s and r.status == 200]
        if inside:
            out.append((start, p99(inside), len(inside)))
        start += plan.window_s
    return out


async def watch(service: Service, stop: asyncio.Event, began: float, into: Watch) -> None:
    """Sample the sidecar every SAMPLE_EVERY_S until ``stop``; read the prompts on the side."""
    loop = asyncio.get_running_loop()
    previous: LagHistogram | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while True:
            histogram = await asyncio.to_thread(LagHistogram.read, service.url)
            lag, previous = histogram.worst_since(previous), histogram
            into.samples.append(Sample(loop.time() - began, rss_kib(service.pid), fd_count(service.pid), lag))
            for path in ("/api/v1/prompts", "/api/v1/prompts/exampleA"):
                try:
                    async with session.get(service.url + path) as resp:
                        await resp.read()
                        if resp.status != 200:
                            into.prompt_failures.append(f"GET {path}: {resp.status}")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    into.prompt_failures.append(f"GET {path}: {exc!r}")
                into.prompt_reads += 1
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
                return
            except asyncio.TimeoutError:
                pass


async def run_load(service: Service, plan: Plan, rate: float) -> tuple[list[Record], Watch]:
    trace = make_trace(seed=SEED, rate=rate, duration_s=plan.duration_s, tenants=TENANTS, mix=MIX)
    watched = Watch()
    stop = asyncio.Event()
    began = asyncio.get_running_loop().time()
    watcher = asyncio.ensure_future(watch(service, stop, began, watched))
    try:
        records = await replay(service.url + "/api/v1/tts", trace, TENANTS, wall_cap_s=plan.duration_s + 20.0,
                               label=f"soak {plan.label}", progress=None)
    finally:
        stop.set()
        await asyncio.wait_for(watcher, 30)
    return records, watched


def tally_of(records: Sequence[Record]) -> Tally:
    """The outcomes of the trace's requests: each gets a whole answer, or is cut, or hangs."""
    tally = Tally()
    for r in records:
        if r.status is not None:
            tally.count(classify(r.status, from_backend=r.backend is not None, reason=r.reason))
        elif r.reason == TIMEOUT_REASON:
            tally.fail(Outcome.HUNG)
        else:  # the client's own error: a body cut short, or the connection gone before a status
            tally.fail(Outcome.CUT if r.reason == "client_ClientPayloadError" else Outcome.NO_ANSWER)
    return tally


def settled_fds(pid: int, target: int, timeout_s: float = 10.0) -> int:
    """The descriptor count once the client's connections are closed (polled until <= target)."""
    deadline = time.monotonic() + timeout_s
    count = fd_count(pid)
    while count > target and time.monotonic() < deadline:
        time.sleep(0.2)
        count = fd_count(pid)
    return count


# Both soaks need minutes of load by design (slow decay shows only over time): `-m slow` runs them.
@pytest.mark.parametrize("seconds", [
    pytest.param(120, id="2min", marks=[pytest.mark.slow]),
    pytest.param(1800, id="30min", marks=[pytest.mark.slow, pytest.mark.timeout(2400)]),
])
def test_soak_at_80_percent(tmp_path: Path, seconds: int) -> None:
    plan = PLANS[seconds]
    reference = make_trace(seed=SEED, rate=1.0, duration_s=math.inf, tenants=TENANTS, mix=MIX, max_requests=5000)
    capacity = pool_rps([a.text for a in reference], TIME_SCALE, BACKENDS)
    rate = LOAD * capacity
    tenants = "\n".join(f"    - {{name: {t.name}, keys: [{t.key}], weight: {t.weight!r}}}" for t in TENANTS if t.key)
    text, port = sidecar_config(backends=BACKENDS, time_scale=TIME_SCALE, warmup=True,
                                extra=f"tenants:\n  list:\n{tenants}\n")
    service = start_sidecar(text, port, tmp_path)
    try:
        fds_idle = fd_count(service.pid)
        records, watched = asyncio.run(run_load(service, plan, rate))
        fds_after = settled_fds(service.pid, fds_idle)
        rss_after = rss_kib(service.pid)
        lag = assert_loop_lag_ok(service.url)
        assert service.alive(), service.output()[-3000:]
    finally:
        service.stop()

    counts = outcome_counts(records)
    tally = tally_of(records)
    answered = [r for r in records if r.status is not None]
    rejected = sum(1 for r in records if r.status == 429)
    failed = [r for r in records if not (r.ok or r.status == 429)]
    after_warmup = [s for s in watched.samples if s.at_s >= plan.warmup_s]
    assert after_warmup, watched.samples
    first = after_warmup[0]
    rss_growth = (rss_after - first.rss_kib) / first.rss_kib
    windows = window_p99s(records, plan)
    assert len(windows) >= 2, windows
    p99_first, p99_last = windows[0][1], windows[-1][1]
    record(f"soak: {plan.label} at 80 %", requests=len(records), answered=len(answered), rejected=rejected,
           errors=len(failed), offered_rps=round(rate, 2), capacity_rps=round(capacity, 2),
           outcomes=counts, prompt_reads=watched.prompt_reads,
           rss_start_mib=round(first.rss_kib / 1024, 1), rss_end_mib=round(rss_after / 1024, 1),
           rss_max_mib=round(max(s.rss_kib for s in watched.samples) / 1024, 1),
           rss_growth_pct=round(100 * rss_growth, 2), fds_idle=fds_idle, fds_start=first.fds,
           fds_max=max(s.fds for s in watched.samples), fds_end=fds_after,
           p99_first_s=round(p99_first, 3), p99_last_s=round(p99_last, 3),
           p99_windows_s=[round(w[1], 3) for w in windows], loop_lag_ms=round(lag * 1000, 1), lost=tally.lost)
    print(f"soak {plan.label}: {len(records)} requests at {rate:.2f}/s (capacity {capacity:.2f}/s): {counts}; "
          f"RSS {first.rss_kib} -> {rss_after} KiB; fds idle {fds_idle}, start {first.fds}, end {fds_after}; "
          f"p99 windows {[round(w[1], 3) for w in windows]}; loop lag {lag * 1000:.1f} ms")

    assert len(answered) == len(records) and tally.lost == 0, f"{tally.figures()}: {counts}"
    assert not failed, f"{len(failed)} requests failed: {counts}; first: {failed[:3]}"
    assert not watched.prompt_failures, watched.prompt_failures[:5]
    assert rss_growth < RSS_GROWTH_BOUND, (
        f"RSS grew {100 * rss_growth:.1f} % after warm-up ({first.rss_kib} -> {rss_after} KiB): "
        f"{[(round(s.at_s), s.rss_kib) for s in watched.samples]}")
    assert fds_after <= first.fds + FD_SLACK, (
        f"open descriptors {first.fds} after warm-up, {fds_after} at the end: "
        f"{[(round(s.at_s), s.fds) for s in watched.samples]}")
    assert p99_last <= P99_FACTOR * p99_first + P99_SLACK_S, f"p99 by window: {windows}"
    assert max(s.loop_lag_s for s in watched.samples) <= MAX_LOOP_LAG_S
