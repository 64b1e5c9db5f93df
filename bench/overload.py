"""Overload: the seed's FIFO + tiered timeouts against the sidecar's policies, below and past capacity.

    python -m bench.overload [--smoke] [--out bench/reports]

One seeded open-loop trace shape (bench.loadgen: Poisson arrivals, 70/20/10 % short/medium/long
texts, three tenants offering 60/20/20 % of the load) is offered at fixed multiples of the pool's
capacity to two sidecar configurations, each started fresh for every run over emulator backends
on free loopback ports, warmed up, measured, then stopped:

- **fifo-tiers** -- the seed's proposal: one FIFO queue, the seed's timeout tiers, its length
  semaphores as pool-wide class caps, no early rejection.
- **policies** -- weighted fair queueing across tenants, shortest-predicted-first inside a tenant,
  the same tiers with unmeetable deadlines rejected at admission.

Writes ``overload.md`` (tables, formulas, reproduce command), ``overload.json`` (the summaries)
and two PNG plots into the output directory. ``--smoke`` is a tiny version for the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench.loadgen import Arrival, Record, Tenant, corpus_text, make_trace, replay
from bench.summary import RunSummary, summarize
from glmtts.emulator.timing import ServiceModel, throughput_at
from glmtts.text import units
from tests.support import backend_pids, free_port, free_port_range, pid_gone, start_sidecar

# The seed's timeout tiers at time scale 1: (max chars or None, seconds). Scaled like the emulators.
SEED_TIERS: tuple[tuple[int | None, float], ...] = ((50, 60.0), (200, 300.0), (None, 600.0))
TENANTS = (
    Tenant(name="heavy", key="bench-heavy-key-0123456789", share=0.6),
    Tenant(name="light-a", key="bench-light-a-key-0123456789", share=0.2),
    Tenant(name="light-b", key="bench-light-b-key-0123456789", share=0.2),
)
CONFIGS = ("fifo-tiers", "policies")


@dataclass(frozen=True, kw_only=True)
class Setup:
    """The pool and the runs: emulator time scale, pool shape, arrival window, loads, trace seed."""

    time_scale: float
    backends: int
    slots: int
    duration_s: float
    loads: tuple[float, ...]
    seed: int = 20240611
    warmup_rounds: int = 2
    configs: tuple[str, ...] = CONFIGS

    def slo_s(self, chars: int) -> float:
        """A request's SLO: its deadline tier, scaled."""
        return next(s for limit, s in SEED_TIERS if limit is None or chars <= limit) * self.time_scale

    @property
    def max_slo_s(self) -> float:
        return SEED_TIERS[-1][1] * self.time_scale


FULL = Setup(time_scale=0.05, backends=4, slots=1, duration_s=90.0, loads=(0.5, 1.0, 1.5))
SMOKE = Setup(time_scale=0.01, backends=2, slots=1, duration_s=4.0, loads=(0.5, 1.5))


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """The pool's throughput on the trace's length mix, from the emulator's service-time model."""

    mean_units: float
    mean_service_s: float  # per request, at the setup's time scale, one request at a time
    rps: float  # backends * throughput(slots) / mean_service_s


@dataclass
class RunResult:
    """One (configuration, load) point: its summary and the raw records (for the plots)."""

    summary: RunSummary
    records: list[Record] = field(repr=False)
    pids: list[int] = field(default_factory=list)  # the sidecar's and its backends', all stopped


@dataclass
class BenchResult:
    setup: Setup
    capacity: Capacity
    runs: list[RunResult]
    wall_s: float
    command: str


def reference_texts(setup: Setup, count: int = 5000) -> list[str]:
    """Texts of the trace shape (same seed, same mix), enough to pin down its mean length."""
    return [a.text for a in make_trace(seed=setup.seed, rate=1.0, duration_s=math.inf, tenants=TENANTS,
                                       max_requests=count)]


def pool_capacity(setup: Setup, texts: Sequence[str]) -> Capacity:
    """Requests per second the pool completes when never idle:

    backends x throughput(slots) / (time_scale x E[base_s + per_unit_s x units(text)] x E[jitter]),
    with the emulator's ServiceModel (throughput(1) = 1; E[jitter] = exp(sigma^2 / 2), log-normal).
    """
    model = ServiceModel(time_scale=setup.time_scale)
    mean_units = sum(units(t) for t in texts) / len(texts)
    jitter = math.exp(model.jitter_sigma ** 2 / 2)
    mean_s = sum(model.mean_seconds(units(t)) for t in texts) / len(texts) * setup.time_scale * jitter
    rps = setup.backends * throughput_at(model.throughput, setup.slots) / mean_s
    return Capacity(mean_units=mean_units, mean_service_s=mean_s, rps=rps)


def config_extra(name: str, setup: Setup) -> str:
    """The YAML sections (beyond listen/backends) of configuration `name` at the setup's time scale."""
    s = setup.time_scale
    tiers = ", ".join(f"{{max_chars: {'null' if limit is None else limit}, timeout_s: {seconds * s!r}}}"
                      for limit, seconds in SEED_TIERS)
    tenants = "\n".join(f"    - {{name: {t.name}, keys: [{t.key}], weight: {float(t.weight)!r}}}" for t in TENANTS)
    common = f"""cost: {{base_s: {0.3125 * s!r}, per_unit_s: {0.159375 * s!r}, reload_s: {20.0 * s!r}}}
tenants:
  list:
{tenants}
"""
    if name == "fifo-tiers":
        # The seed's semaphores: 10 for <= 200 chars together, 3 long; as class caps, 10 each for
        # short and medium (<= 20 together). Either way only the long cap binds on a small pool.
        return common + f"""classes:
  - {{name: short, max_chars: 50, max_in_service: 10}}
  - {{name: medium, max_chars: 200, max_in_service: 10}}
  - {{name: long, max_chars: null, max_in_service: 3}}
deadlines: {{policy: tiers, tiers: [{tiers}], reject_unmeetable: false}}
queue: {{order: fifo}}
"""
    if name == "policies":
        return common + f"""deadlines: {{policy: tiers, tiers: [{tiers}], reject_unmeetable: true}}
queue: {{order: fair, within_tenant: shortest_first}}
"""
    raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")


def sidecar_yaml(name: str, setup: Setup) -> tuple[str, int]:
    """The whole config file of configuration `name` on free loopback ports; (yaml, listen port)."""
    port = free_port()
    command = ["{python}", "-m", "glmtts.emulator", "--port", "{port}", "--time-scale", f"{setup.time_scale:g}",
               "--seed", "{index}"]
    text = f"""listen: {{host: 127.0.0.1, port: {port}}}
backends:
  command: {json.dumps(command)}
  gpus: {json.dumps([str(i) for i in range(setup.backends)])}
  base_port: {free_port_range(setup.backends)}
  slots: {setup.slots}
  health: {{interval_s: 0.5, timeout_s: 2.0, start_timeout_s: 60.0}}
  stop_grace_s: 5.0
{config_extra(name, setup)}"""
    return text, port


def _form(text: str) -> tuple[str, bytes]:
    boundary = "bench-warmup-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="input_text"\r\n\r\n{text}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="index"\r\n\r\nexampleA\r\n--{boundary}--\r\n')
    return f"multipart/form-data; boundary={boundary}", body.encode()


async def warm_up(url: str, setup: Setup, key: str | None) -> set[str]:
    """Load the model on every backend (lazy load + slow first request) before anything is measured.

    The sidecar sends a job to an idle backend without the model only when the busy ones that
    have it would take longer to free up than a load, and caps each length class below the pool
    size; so each burst (one request per slot) alternates medium and long texts, whose service
    outlasts a load (140 and 210 chars). Bursts repeat until every backend has answered one and at least
    `setup.warmup_rounds` went by. Returns the backend ids seen.
    """
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    forms = [_form(corpus_text(0, 140)), _form(corpus_text(0, 210))]  # ~1.2 and ~1.6 loads long
    seen: set[str] = set()
    burst = setup.backends * setup.slots
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(i: int) -> str | None:
            content_type, body = forms[i % len(forms)]
            async with session.post(url + "/api/v1/tts", data=body,
                                    headers={**headers, "Content-Type": content_type}) as resp:
                await resp.read()
                return resp.headers.get("X-Backend") if resp.status == 200 else None

        for round_no in range(setup.warmup_rounds + 4):
            seen.update(b for b in await asyncio.gather(*(one(i) for i in range(burst))) if b)
            if round_no + 1 >= setup.warmup_rounds and len(seen) >= setup.backends:
                break
    return seen


def orphaned_backend_seconds(url: str) -> float | None:
    """`orphaned_backend_seconds` from GET /api/v1/queue (top level or one section down); None when
    the endpoint or the field does not exist."""

    async def fetch() -> Any:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.get(url + "/api/v1/queue") as resp:
            return await resp.json(content_type=None) if resp.status == 200 else None

    try:
        payload = asyncio.run(fetch())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    candidates = [payload] + (list(payload.values()) if isinstance(payload, dict) else [])
    for section in candidates:
        if isinstance(section, dict) and isinstance(section.get("orphaned_backend_seconds"), int | float):
            return float(section["orphaned_backend_seconds"])
    return None


def _reap(pids: Sequence[int], timeout: float = 15.0) -> None:
    """Make sure the backends the sidecar started are gone (it stops them; SIGKILL any straggler)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(pid_gone(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if not pid_gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run_point(setup: Setup, capacity: Capacity, config: str, load: float, work_dir: Path,
              progress: bool = True) -> RunResult:
    """Start a fresh sidecar + emulators with `config`, warm up, replay the trace at `load` x
    capacity, read orphaned backend seconds, stop everything; summarize what the clients saw."""
    trace: list[Arrival] = make_trace(seed=setup.seed, rate=load * capacity.rps, duration_s=setup.duration_s,
                                      tenants=TENANTS)
    text, port = sidecar_yaml(config, setup)
    service = start_sidecar(text, port, work_dir)
    pids: list[int] = []
    try:
        pids = backend_pids(service)
        seen = asyncio.run(warm_up(service.url, setup, TENANTS[0].key))
        if len(seen) < setup.backends:
            raise RuntimeError(f"warm-up reached only backends {sorted(seen)}:\n{service.output()[-3000:]}")
        records = asyncio.run(replay(service.url + "/api/v1/tts", trace, TENANTS,
                                     wall_cap_s=setup.duration_s + setup.max_slo_s + 10.0,
                                     label=f"{config} {load:g}x", progress=sys.stderr if progress else None))
        # Work orphaned by a 408 keeps its backend busy until the backend answers: let it finish.
        time.sleep(min(5.0, 1.5 * ServiceModel().mean_seconds(500) * setup.time_scale))
        orphaned = orphaned_backend_seconds(service.url)
    finally:
        service.stop()
        _reap(pids)
        with contextlib.suppress(OSError):
            service.log_path.unlink()
    summary = summarize(records, config=config, load=load, capacity_rps=capacity.rps, duration_s=setup.duration_s,
                        slo_s=setup.slo_s, weights={t.name: t.weight for t in TENANTS},
                        orphaned_backend_s=orphaned)
    return RunResult(summary=summary, records=records, pids=[service.pid, *pids])


def run(setup: Setup, *, command: str, progress: bool = True) -> BenchResult:
    """Every configuration at every load, each on a fresh sidecar; the pool capacity they share."""
    started = time.monotonic()
    capacity = pool_capacity(setup, reference_texts(setup))
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="glmtts-overload-") as tmp:
        for config in setup.configs:
            for load in setup.loads:
                runs.append(run_point(setup, capacity, config, load, Path(tmp), progress))
    return BenchResult(setup=setup, capacity=capacity, runs=runs, wall_s=time.monotonic() - started,
                       command=command)


def main(argv: Sequence[str] | None = None) -> None:
    from bench.overload_report import write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: 2 backends, ~4 s runs, 2 loads")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"), help="directory of the report")
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, help="only these configurations")
    parser.add_argument("--loads", nargs="+", type=float, help="only these multiples of capacity")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    if args.duration is not None:
        setup = replace(setup, duration_s=args.duration)
    if args.configs:
        setup = replace(setup, configs=tuple(args.configs))
    if args.loads:
        setup = replace(setup, loads=tuple(args.loads))
    command = "python -m bench.overload" + " ".join(a for a in ["", *(argv or sys.argv[1:])] if a != "--quiet")
    result = run(setup, command=command, progress=not args.quiet)
    report = write_report(result, args.out)
    sys.stdout.write(report.read_text())
    sys.stderr.write(f"wrote {report} ({result.wall_s:.0f} s)\n")


if __name__ == "__main__":
    main()
