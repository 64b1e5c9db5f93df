"""Overload: nginx, the seed's FIFO + tiers and the sidecar's policies, below and past capacity.

    python -m bench.overload [--smoke] [--arms ...] [--loads ...] [--duration S] [--out bench/reports]

One seeded open-loop trace shape (bench.loadgen: Poisson arrivals, 70/20/10 % short/medium/long
texts, three tenants offering 60/20/20 % of the load) is offered at fixed multiples of the pool's
capacity to four arms over the same emulator backends (same command, time scale and GPU ids), each
started fresh for every run on free loopback ports, warmed up, measured, then stopped:

- **nginx** -- `least_conn` over the backends (bench.nginx); the backends' own semaphores and
  timeouts (upstream's, which are the seed's tiers) are all there is.
- **seed** -- the sidecar with the seed's proposal: one FIFO queue, the seed's timeout tiers, its
  10/3 semaphores as pool-wide class caps, no early rejection, one request per backend.
- **policies-fixed** -- weighted fair queueing across tenants, shortest-predicted-first inside a
  tenant, the seed's tiers as deadlines with unmeetable ones rejected at admission; `slots: 1`.
- **policies-auto** -- the same with `slots: auto` (the sidecar finds each backend's concurrency).

Writes ``overload.md`` (verdict, tables, formulas, reproduce command), ``overload.json`` (the
summaries) and two PNG plots into the output directory. ``--smoke`` is a tiny version for the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.loadgen import Arrival, Record, Tenant, corpus_text, make_trace, replay
from bench.nginx import MISSING as NGINX_MISSING
from bench.nginx import nginx_binary, start_nginx
from bench.summary import RunSummary, summarize
from glmtts.emulator.timing import ServiceModel, throughput_at
from glmtts.text import units

# The seed's timeout tiers at time scale 1: (max chars or None, seconds). Scaled like the emulators.
SEED_TIERS: tuple[tuple[int | None, float], ...] = ((50, 60.0), (200, 300.0), (None, 600.0))
TENANTS = (
    Tenant(name="heavy", key="bench-heavy-key-0123456789", share=0.6),
    Tenant(name="light-a", key="bench-light-a-key-0123456789", share=0.2),
    Tenant(name="light-b", key="bench-light-b-key-0123456789", share=0.2),
)
ARMS = ("nginx", "seed", "policies-fixed", "policies-auto")
SIDECAR_ARMS = ARMS[1:]
MAX_SLOTS = 4  # policies-auto's bound on concurrent requests per backend


@dataclass(frozen=True, kw_only=True)
class Setup:
    """The pool and the runs: emulator time scale, pool shape, arrival window, loads, arms, seed."""

    time_scale: float
    backends: int
    duration_s: float
    loads: tuple[float, ...]
    arms: tuple[str, ...] = ARMS
    seed: int = 20240611
    warmup_rounds: int = 2
    deadlines: str = "tiers"  # the policy arms' deadlines: "tiers" (the seed's) or "learned"

    def slo_s(self, chars: int) -> float:
        """A request's SLO: its deadline tier, scaled."""
        return next(s for limit, s in SEED_TIERS if limit is None or chars <= limit) * self.time_scale

    @property
    def max_slo_s(self) -> float:
        return SEED_TIERS[-1][1] * self.time_scale

    @property
    def gpus(self) -> list[str]:
        """One emulated GPU per backend, as the seed deploys (one process per GPU)."""
        return [str(i) for i in range(self.backends)]


FULL = Setup(time_scale=0.05, backends=4, duration_s=60.0, loads=(0.5, 1.0, 1.3, 2.5))
SMOKE = Setup(time_scale=0.01, backends=2, duration_s=2.0, loads=(1.3, 2.5), warmup_rounds=1)


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """The pool's throughput on the trace's length mix, from the emulator's service-time model."""

    mean_units: float
    mean_service_s: float  # per request, at the setup's time scale, one request at a time
    short_service_s: float  # the same over the short texts only
    rps: float  # backends / mean_service_s (one request at a time per backend)


@dataclass
class RunResult:
    """One (arm, load) point: its summary and the raw records (for the plots)."""

    summary: RunSummary
    records: list[Record] = field(repr=False)
    pids: list[int] = field(default_factory=list)  # every process the run started, all stopped
    slots: dict[str, float] = field(default_factory=dict)  # sidecar arms: each backend's slots at the end


@dataclass
class BenchResult:
    setup: Setup
    capacity: Capacity
    runs: list[RunResult]
    wall_s: float
    command: str
    skipped: dict[str, str] = field(default_factory=dict)  # arm -> why it did not run


def reference_texts(setup: Setup, count: int = 5000) -> list[Arrival]:
    """Arrivals of the trace shape (same seed, same mix), enough to pin down its mean length."""
    return make_trace(seed=setup.seed, rate=1.0, duration_s=math.inf, tenants=TENANTS, max_requests=count)


def pool_capacity(setup: Setup, arrivals: Sequence[Arrival]) -> Capacity:
    """Requests per second the pool completes when never idle, one request per backend at a time:

    backends / (time_scale x E[base_s + per_unit_s x units(text)] x E[jitter]),
    with the emulator's ServiceModel (E[jitter] = exp(sigma^2 / 2), log-normal).
    """
    model = ServiceModel(time_scale=setup.time_scale)
    jitter = math.exp(model.jitter_sigma ** 2 / 2)

    def mean_s(texts: Sequence[str]) -> float:
        return sum(model.mean_seconds(units(t)) for t in texts) / len(texts) * setup.time_scale * jitter

    texts = [a.text for a in arrivals]
    mean = mean_s(texts)
    return Capacity(mean_units=sum(units(t) for t in texts) / len(texts), mean_service_s=mean,
                    short_service_s=mean_s([a.text for a in arrivals if a.cls == "short"]),
                    rps=setup.backends * throughput_at(model.throughput, 1) / mean)


def _tiers_yaml(setup: Setup) -> str:
    return ", ".join(f"{{max_chars: {'null' if limit is None else limit}, timeout_s: {seconds * setup.time_scale!r}}}"
                     for limit, seconds in SEED_TIERS)


def arm_backends(arm: str) -> dict[str, int | str]:
    """The `backends` keys sidecar arm `arm` sets beyond the pool's."""
    return {"slots": "auto", "max_slots": MAX_SLOTS} if arm == "policies-auto" else {"slots": 1}


def config_extra(arm: str, setup: Setup) -> str:
    """The YAML of sidecar arm `arm` beyond `listen` and the pool's `backends` keys."""
    s = setup.time_scale
    tenants = "\n".join(f"    - {{name: {t.name}, keys: [{t.key}], weight: {float(t.weight)!r}}}" for t in TENANTS)
    common = f"""cost: {{base_s: {0.3125 * s!r}, per_unit_s: {0.159375 * s!r}, reload_s: {20.0 * s!r}}}
tenants:
  list:
{tenants}
"""
    if arm == "seed":
        # The seed's semaphores: 10 for <= 200 chars together, 3 long; as class caps, 10 each for
        # short and medium (<= 20 together). Either way only the long cap binds on a small pool.
        return common + f"""classes:
  - {{name: short, max_chars: 50, max_in_service: 10}}
  - {{name: medium, max_chars: 200, max_in_service: 10}}
  - {{name: long, max_chars: null, max_in_service: 3}}
deadlines: {{policy: tiers, tiers: [{_tiers_yaml(setup)}], reject_unmeetable: false}}
queue: {{order: fifo}}
"""
    if arm in ("policies-fixed", "policies-auto"):
        if setup.deadlines == "learned":
            # p95 x 2 + 2 s, clamped to 5..600 s (time scale 1): about 3x a short text's service time.
            deadlines = (f"{{policy: learned, learned: {{factor: 2.0, buffer_s: {2.0 * s!r}, min_s: {5.0 * s!r}, "
                         f"max_s: {600.0 * s!r}}}, reject_unmeetable: true}}")
        else:
            deadlines = f"{{policy: tiers, tiers: [{_tiers_yaml(setup)}], reject_unmeetable: true}}"
        # Short texts queue in the top band (across tenants, still fair among them): a short one
        # never waits behind another tenant's backlog of long ones; the long cap keeps them from
        # holding every backend.
        return common + f"""deadlines: {deadlines}
queue: {{order: fair, within_tenant: shortest_first}}
classes:
  - {{name: short, max_chars: 50, band: interactive, extra_slots: 1}}
  - {{name: medium, max_chars: 200}}
  - {{name: long, max_chars: null, max_in_service: 3}}
"""
    raise ValueError(f"unknown sidecar arm {arm!r}; known: {', '.join(SIDECAR_ARMS)}")


def emulator_args(setup: Setup) -> list[str]:
    return ["--time-scale", f"{setup.time_scale:g}"]


def sidecar_yaml(arm: str, setup: Setup) -> tuple[str, int]:
    """The whole config file of sidecar arm `arm` on free loopback ports; (yaml, listen port)."""
    port = procs.free_port()
    command = ["{python}", "-m", "glmtts.emulator", "--port", "{port}", *emulator_args(setup), "--seed", "{index}"]
    keys = "".join(f"  {key}: {value}\n" for key, value in arm_backends(arm).items())
    text = f"""listen: {{host: 127.0.0.1, port: {port}}}
backends:
  command: {json.dumps(command)}
  env: {{CUDA_VISIBLE_DEVICES: "{{gpu}}"}}
  gpus: {json.dumps(setup.gpus)}
  base_port: {procs.free_ports(setup.backends)}
{keys}  health: {{interval_s: 0.5, timeout_s: 2.0, start_timeout_s: 60.0}}
  stop_grace_s: 5.0
{config_extra(arm, setup)}"""
    return text, port


def unsupported(arm: str, setup: Setup, work_dir: Path) -> str | None:
    """Why this sidecar cannot run arm `arm` (its `--check-config` answer), or None when it can."""
    text, _ = sidecar_yaml(arm, setup)
    path = work_dir / f"check-{arm}.yaml"
    path.write_text(text)
    check = subprocess.run([sys.executable, "-m", "scheduler", "--config", str(path), "--check-config"],
                           capture_output=True, text=True, cwd=procs.ROOT, check=False)
    if check.returncode == 0:
        return None
    return f"the sidecar rejects this arm's configuration: {(check.stderr or check.stdout).strip()[-500:]}"


def _form(text: str) -> tuple[str, bytes]:
    boundary = "bench-warmup-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="input_text"\r\n\r\n{text}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="index"\r\n\r\nexampleA\r\n--{boundary}--\r\n')
    return f"multipart/form-data; boundary={boundary}", body.encode()


async def warm_up(url: str, setup: Setup, key: str | None) -> set[str]:
    """Load the model on every backend behind a sidecar before anything is measured.

    The sidecar sends a job to an idle backend without the model only when the busy ones that
    have it would take longer to free up than a load, and caps each length class below the pool
    size; so each burst (one request per backend) alternates medium and long texts, whose service
    outlasts a load (140 and 210 chars). Bursts repeat until every backend has answered one and at least
    `setup.warmup_rounds` went by. Returns the backend ids seen.
    """
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    forms = [_form(corpus_text(0, 140)), _form(corpus_text(0, 210))]  # ~1.2 and ~1.6 loads long
    seen: set[str] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(i: int) -> str | None:
            content_type, body = forms[i % len(forms)]
            async with session.post(url + "/api/v1/tts", data=body,
                                    headers={**headers, "Content-Type": content_type}) as resp:
                await resp.read()
                return resp.headers.get("X-Backend") if resp.status == 200 else None

        for round_no in range(setup.warmup_rounds + 4):
            seen.update(b for b in await asyncio.gather(*(one(i) for i in range(setup.backends))) if b)
            if round_no + 1 >= setup.warmup_rounds and len(seen) >= setup.backends:
                break
    return seen


async def warm_up_direct(urls: Sequence[str], setup: Setup) -> None:
    """Load the model on every backend by asking each directly (nginx would spread them anyhow)."""
    content_type, body = _form(corpus_text(0, 140))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(url: str) -> None:
            for _ in range(setup.warmup_rounds):
                async with session.post(url + "/api/v1/tts", data=body,
                                        headers={"Content-Type": content_type}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"warm-up of {url}: HTTP {resp.status}")

        await asyncio.gather(*(one(u) for u in urls))


async def _get_json(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
            session.get(url, headers=headers) as resp:
        return await resp.json(content_type=None) if resp.status == 200 else None


def orphaned_backend_seconds(url: str, token: str | None) -> float | None:
    """`orphaned_backend_seconds` from a sidecar's GET /api/v1/queue (top level or one section
    down), read with its admin token (the counters are details); None when the endpoint or the
    field does not exist."""
    try:
        payload = asyncio.run(_get_json(url + "/api/v1/queue", token))
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    candidates = [payload] + (list(payload.values()) if isinstance(payload, dict) else [])
    for section in candidates:
        if isinstance(section, dict) and isinstance(section.get("orphaned_backend_seconds"), int | float):
            return float(section["orphaned_backend_seconds"])
    return None


EMULATOR_ORPHANED_FIELDS = ("orphaned_seconds", "orphaned_busy_seconds", "orphaned_s")


def emulator_orphaned_seconds(urls: Sequence[str]) -> float | None:
    """Sum over backends of the seconds each spent on requests whose client it had already answered
    (or lost), from GET /emulator/stats; None when an emulator does not report it."""
    total = 0.0
    for url in urls:
        try:
            stats = asyncio.run(_get_json(url + "/emulator/stats"))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        value = next((stats[k] for k in EMULATOR_ORPHANED_FIELDS if isinstance(stats, dict)
                      and isinstance(stats.get(k), int | float)), None)
        if value is None:
            return None
        total += float(value)
    return total


SLOTS_METRIC = re.compile(r'^glmtts_sidecar_backend_slots\{backend="([^"]+)"\} ([0-9.e+-]+)$', re.MULTILINE)


def backend_slots(url: str) -> dict[str, float]:
    """Each backend's slot limit now (what `slots: auto` learned), from the sidecar's /metrics."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {backend: float(value) for backend, value in SLOTS_METRIC.findall(text)}


def _settle(setup: Setup) -> None:
    # Work orphaned by a 408 keeps its backend busy until the backend answers: let it finish.
    time.sleep(min(5.0, 1.5 * ServiceModel().mean_seconds(500) * setup.time_scale))


def _replay(url: str, trace: Sequence[Arrival], setup: Setup, label: str, progress: bool) -> list[Record]:
    return asyncio.run(replay(url + "/api/v1/tts", trace, TENANTS, wall_cap_s=setup.duration_s + setup.max_slo_s + 10.0,
                              label=label, progress=sys.stderr if progress else None))


def run_nginx(setup: Setup, trace: Sequence[Arrival], label: str, work_dir: Path,
              progress: bool) -> tuple[list[Record], float | None, list[int], dict[str, float]]:
    """Emulators started here (same command, scale, GPU ids as the sidecar's) behind nginx."""
    env = procs.isolated_env(work_dir / "runtime")
    emulators = procs.start_emulators(setup.backends, emulator_args(setup), gpus=setup.gpus, env=env)
    started: list[procs.Proc] = list(emulators)
    try:
        proxy = start_nginx(work_dir / "nginx", [e.url.removeprefix("http://") for e in emulators])
        started.insert(0, proxy)
        asyncio.run(warm_up_direct([e.url for e in emulators], setup))
        records = _replay(proxy.url, trace, setup, label, progress)
        _settle(setup)
        orphaned = emulator_orphaned_seconds([e.url for e in emulators])
    finally:
        for proc in started:
            proc.stop()
    return records, orphaned, [p.pid for p in started], {}


def run_sidecar(arm: str, setup: Setup, trace: Sequence[Arrival], label: str, work_dir: Path,
                progress: bool) -> tuple[list[Record], float | None, list[int], dict[str, float]]:
    """A fresh sidecar (which starts the emulators) with arm `arm`'s configuration."""
    text, port = sidecar_yaml(arm, setup)
    service = procs.start_sidecar(text, port, work_dir, env=procs.isolated_env(work_dir / "runtime"))
    pids: list[int] = []
    try:
        pids = procs.backend_pids(service)
        seen = asyncio.run(warm_up(service.url, setup, TENANTS[0].key))
        if len(seen) < setup.backends:
            raise RuntimeError(f"warm-up reached only backends {sorted(seen)}:\n{service.output()}")
        records = _replay(service.url, trace, setup, label, progress)
        slots = backend_slots(service.url)
        _settle(setup)
        orphaned = orphaned_backend_seconds(service.url, service.admin_token)
    finally:
        service.stop()
        procs.reap(pids)
    return records, orphaned, [service.pid, *pids], slots


def run_point(setup: Setup, capacity: Capacity, arm: str, load: float, work_dir: Path,
              progress: bool = True) -> RunResult:
    """Start arm `arm` fresh, warm up, replay the trace at `load` x capacity, read orphaned backend
    seconds, stop everything; summarize what the clients saw."""
    trace = make_trace(seed=setup.seed, rate=load * capacity.rps, duration_s=setup.duration_s, tenants=TENANTS)
    label = f"{arm} {load:g}x"
    with tempfile.TemporaryDirectory(prefix=f"{arm}-", dir=work_dir) as tmp:
        if arm == "nginx":
            records, orphaned, pids, slots = run_nginx(setup, trace, label, Path(tmp), progress)
        else:
            records, orphaned, pids, slots = run_sidecar(arm, setup, trace, label, Path(tmp), progress)
    summary = summarize(records, config=arm, load=load, capacity_rps=capacity.rps, duration_s=setup.duration_s,
                        slo_s=setup.slo_s, weights={t.name: t.weight for t in TENANTS},
                        orphaned_backend_s=orphaned)
    return RunResult(summary=summary, records=records, pids=pids, slots=slots)


def run(setup: Setup, *, command: str, progress: bool = True) -> BenchResult:
    """Every arm at every load, each started fresh; the pool capacity they share. An arm this
    machine cannot run (nginx missing, a configuration the sidecar rejects) is skipped, with why."""
    started = time.monotonic()
    capacity = pool_capacity(setup, reference_texts(setup))
    runs: list[RunResult] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="glmtts-overload-") as tmp:
        for arm in setup.arms:
            why = (NGINX_MISSING if nginx_binary() is None else None) if arm == "nginx" \
                else unsupported(arm, setup, Path(tmp))
            if why is not None:
                skipped[arm] = why
                sys.stderr.write(f"[{arm}] skipped: {why}\n")
                continue
            for load in setup.loads:
                runs.append(run_point(setup, capacity, arm, load, Path(tmp), progress))
    return BenchResult(setup=setup, capacity=capacity, runs=runs, wall_s=time.monotonic() - started,
                       command=command, skipped=skipped)


def main(argv: Sequence[str] | None = None) -> None:
    from bench.overload_report import write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: 2 backends, 2 s runs, 2 loads")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"), help="directory of the report")
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--arms", nargs="+", choices=ARMS, help="only these arms")
    parser.add_argument("--loads", nargs="+", type=float, help="only these multiples of capacity")
    parser.add_argument("--deadlines", choices=("tiers", "learned"), default="tiers",
                        help="the policy arms' deadlines (the SLO that counts goodput stays the seed's tiers)")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    if args.duration is not None:
        setup = replace(setup, duration_s=args.duration)
    if args.arms:
        setup = replace(setup, arms=tuple(a for a in ARMS if a in args.arms))
    if args.loads:
        setup = replace(setup, loads=tuple(args.loads))
    setup = replace(setup, deadlines=args.deadlines)
    command = "python -m bench.overload" + " ".join(a for a in ["", *(argv or sys.argv[1:])] if a != "--quiet")
    result = run(setup, command=command, progress=not args.quiet)
    report = write_report(result, args.out)
    sys.stdout.write(report.read_text())
    sys.stderr.write(f"wrote {report} ({result.wall_s:.0f} s)\n")


if __name__ == "__main__":
    main()
