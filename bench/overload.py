"""Overload: nginx, the seed's proposal and the sidecar as an operator would configure it, in work.

    python -m bench.overload [--traces mix bimodal] [--backends 2 4] [--arms ...] [--loads ...]
        [--curve default|flat] [--no-flat] [--slo dynamic|lenient] [--duration S] [--preroll S] [--time-scale S]
        [--oracle-loads ...] [--seed-pools ...] [--smoke] [--out DIR]

A seeded open-loop trace (bench.loadgen: Poisson arrivals, three tenants offering 60/20/20 %, a
length mix of `MIXES`) is offered at multiples of a pool's capacity to each arm, over emulator
backends with 25 % service noise and upstream's own 10/3 semaphores in every process. Each run
starts its arm fresh on free loopback ports, warms it up, replays the trace, lets orphaned work
settle, reads the counters and stops everything. The capacity of a pool is `backends` solo-seconds
of work per second; load L offers L times that much work per second.

Arms (the report shows each sidecar arm's whole YAML):

- **nginx** -- `least_conn` over the emulators (bench.nginx), nothing else.
- **seed** -- the sidecar as the seed proposed: one FIFO queue, deadlines = the SLO, no early
  rejection, 13 requests per backend and no class caps, so upstream's semaphores are the only limit.
- **sidecar-high** / **sidecar-low** -- what an operator writes: backends, deadlines = the SLO,
  tenants, and cost priors 2x (high) or 0.5x (low) the emulator's true model; all else default.
- **oracle-slotsN** -- the operator config with perfect priors and `backends.slots: N` (N = 1..4);
  the oracle at a load is the best of the four.
- **slots1** (flat-curve run only) -- the operator config, priors 2x high, `backends.slots: 1`.

Writes ``overload.md`` (verdicts, tables, configurations, reproduce command), ``overload.json``
(every summary, configuration and verdict) and PNG plots into ``--out``. ``--smoke`` is a tiny
version for the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.loadgen import MIXES, Arrival, Record, corpus_text, make_trace, replay
from bench.markdown import reproduce
from bench.nginx import MISSING as NGINX_MISSING
from bench.nginx import nginx_binary, start_nginx
from bench.overload_spec import (
    ARM_SLOTS,
    ARMS,
    CAP_MARGIN_S,
    CURVES,
    DEFAULT_ARMS,
    DEFAULT_LOADS,
    FANOUT_ARMS,
    FLAT_ARMS,
    NGINX,
    PRIOR_ERROR,
    RUN_OVERHEAD_S,
    SEED,
    SIDECAR_ARMS,
    SLO_POLICIES,
    SMOKE,
    TENANTS,
    BenchResult,
    Cell,
    CellResult,
    Plan,
    RunResult,
    Setup,
    arrival_rate,
    deadline_tiers,
    emulator_args,
)
from bench.summary import summarize
from glmtts.emulator.timing import BASE_S, LONG_CHARS, PER_UNIT_S, ServiceModel
from glmtts.form import encode_multipart, multipart_content_type
from glmtts.text import units


def mean_work_s(setup: Setup, trace: str, count: int = 5000) -> float:
    """Work per request of the trace's mix: over `count` arrivals of its shape (same seed)."""
    arrivals = make_trace(seed=setup.seed, rate=1.0, duration_s=math.inf, tenants=TENANTS, max_requests=count,
                          mix=MIXES[trace])
    return sum(setup.work_s(units(a.text)) for a in arrivals) / len(arrivals)


def _flow(value: Any) -> str:
    """`value` as YAML flow style (JSON is YAML; None is null)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return json.dumps(round(value, 12) if isinstance(value, float) else value)


PRODUCTION_EXAMPLE = procs.ROOT / "config" / "glmtts-production.yaml"


def production_fanout() -> dict[str, Any]:
    """The production example's `fanout` section, switched on (`enabled: true`) whatever it says:
    what an operator who turns fan-out on runs (an example without the section: the defaults)."""
    section = procs.config_sections(PRODUCTION_EXAMPLE.read_text()).get("fanout")
    return {**(section if isinstance(section, dict) else {}), "enabled": True}


def sidecar_yaml(arm: str, setup: Setup, cell: Cell, *, port: int, base_port: int) -> str:
    """The whole config file of sidecar arm `arm` (listen on `port`, backends from `base_port`)."""
    if arm in FANOUT_ARMS:
        base = sidecar_yaml(FANOUT_ARMS[arm], setup, cell, port=port, base_port=base_port)
        return base + f"fanout: {_flow(production_fanout())}\n"
    if arm not in SIDECAR_ARMS:
        raise ValueError(f"unknown sidecar arm {arm!r}; known: {', '.join([*SIDECAR_ARMS, *FANOUT_ARMS])}")
    command = ["{python}", "-m", "glmtts.emulator", "--port", "{port}", *emulator_args(setup, cell.curve),
               "--seed", "{index}"]
    slots = f"  slots: {ARM_SLOTS[arm]}\n" if arm in ARM_SLOTS else ""
    deadlines: dict[str, Any] = {"policy": "tiers", "tiers": deadline_tiers(setup.slo, setup.time_scale)}
    if arm == SEED:
        deadlines["reject_unmeetable"] = False
    error = PRIOR_ERROR[arm]
    cost = {"base_s": BASE_S * error * setup.time_scale, "per_unit_s": PER_UNIT_S * error * setup.time_scale}
    tenants = "".join(f"    - {_flow({'name': t.name, 'keys': [t.key], 'weight': t.weight})}\n" for t in TENANTS)
    text = f"""listen: {{host: 127.0.0.1, port: {port}}}
backends:
  command: {_flow(command)}
  env: {{CUDA_VISIBLE_DEVICES: "{{gpu}}"}}
  gpus: {_flow(cell.gpus)}
  base_port: {base_port}
  health: {{interval_s: 0.5, timeout_s: 2.0, start_timeout_s: 60.0}}
{slots}deadlines: {_flow(deadlines)}
cost: {_flow(cost)}
tenants:
  list:
{tenants}"""
    if arm == SEED:
        text += """queue: {order: fifo}
classes:
  - {name: short, max_chars: 50, max_in_service: null}
  - {name: medium, max_chars: 200, max_in_service: null}
  - {name: long, max_chars: null, max_in_service: null}
"""
    return text


def unsupported(arm: str, setup: Setup, cell: Cell, work_dir: Path) -> str | None:
    """Why this machine cannot run arm `arm` (nginx missing, or the sidecar's `--check-config`
    answer), or None when it can."""
    if arm == NGINX:
        return NGINX_MISSING if nginx_binary() is None else None
    path = work_dir / f"check-{arm}.yaml"
    path.write_text(sidecar_yaml(arm, setup, cell, port=8049, base_port=18050))
    check = subprocess.run([sys.executable, "-m", "scheduler", "--config", str(path), "--check-config"],
                           capture_output=True, text=True, cwd=procs.ROOT, check=False)
    if check.returncode == 0:
        return None
    return f"the sidecar rejects this arm's configuration: {(check.stderr or check.stdout).strip()[-500:]}"


def _form(text: str) -> tuple[str, bytes]:
    boundary = "bench-warmup-boundary"
    return multipart_content_type(boundary), encode_multipart([("input_text", text), ("index", "exampleA")],
                                                              boundary=boundary)


async def warm_up(url: str, setup: Setup, backends: int, key: str | None) -> set[str]:
    """Serve a few requests on every backend behind a sidecar before anything is measured.

    Bursts of one request per backend, alternating medium and long texts (140 and 210 chars, whose
    service outlasts a short one, so a burst spreads over the pool), repeat until every backend has
    answered one and at least `setup.warmup_rounds` went by. Returns the backend ids seen.

    Every warm-up request is whole (``X-Fanout: off``), whatever the arm: the warm-up loads each
    backend's model, and every arm then enters the trace having learned from the same requests. A
    fan-out arm's warm-up once split 2-3 of them, so its cost model started from a dozen pieces'
    samples where the other arm's had a few whole ones, the only difference between the arms
    where load left nothing to split.
    """
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers["X-Fanout"] = "off"
    forms = [_form(corpus_text(0, 140)), _form(corpus_text(0, 210))]
    seen: set[str] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(i: int) -> str | None:
            content_type, body = forms[i % len(forms)]
            async with session.post(url + "/api/v1/tts", data=body,
                                    headers={**headers, "Content-Type": content_type}) as resp:
                await resp.read()
                return resp.headers.get("X-Backend") if resp.status == 200 else None

        for round_no in range(setup.warmup_rounds + 4):
            answered = await asyncio.gather(*(one(i) for i in range(backends)))
            seen.update(b for backend in answered if backend for b in backend.split(","))  # a list if split
            if round_no + 1 >= setup.warmup_rounds and len(seen) >= backends:
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


def _get_json(url: str, token: str | None = None) -> Any:
    """The JSON of GET `url`, or None when it cannot be had."""
    try:
        return procs.get_json(url, token=token)
    except (OSError, ValueError):
        return None


def orphaned_backend_seconds(url: str, token: str | None) -> float | None:
    """`orphaned_backend_seconds` from a sidecar's GET /api/v1/queue (top level or one section
    down), read with its admin token; None when the endpoint or the field does not exist."""
    payload = _get_json(url + "/api/v1/queue", token)
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
        stats = _get_json(url + "/emulator/stats")
        value = next((stats[k] for k in EMULATOR_ORPHANED_FIELDS if isinstance(stats, dict)
                      and isinstance(stats.get(k), int | float)), None)
        if value is None:
            return None
        total += float(value)
    return total


SLOTS_METRIC = re.compile(r'^glmtts_sidecar_backend_slots\{backend="([^"]+)"\} ([0-9.e+-]+)$', re.MULTILINE)


FANOUT_METRIC = re.compile(r'^glmtts_sidecar_fanout_(pieces_count|declined_total)(?:\{reason="(\w+)"\})? ([0-9.e+-]+)$',
                           re.MULTILINE)


def fanout_counts(url: str) -> dict[str, float]:
    """How the sidecar's fan-out went, from its /metrics: "split" (requests split), and
    "declined <reason>" for each reason a request ran whole; {} when unreadable."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {("split" if kind == "pieces_count" else f"declined {reason}"): float(value)
            for kind, reason, value in FANOUT_METRIC.findall(text)}


def backend_slots(url: str) -> dict[str, float]:
    """Each backend's slot limit now (what the sidecar uses or learned), from its /metrics."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {backend: float(value) for backend, value in SLOTS_METRIC.findall(text)}


def sidecar_busy(service: procs.Proc) -> bool:
    status = _get_json(service.url + "/api/v1/queue", service.admin_token)
    return not isinstance(status, dict) or bool(status.get("in_service") or status.get("depth"))


def _emulators_busy(urls: Sequence[str]) -> bool:
    stats = [_get_json(url + "/emulator/stats") for url in urls]
    return any(not isinstance(s, dict) or s.get("in_flight") for s in stats)


def settle(setup: Setup, busy: Callable[[], bool]) -> None:
    # Work orphaned by a 408 keeps its backend busy until the backend answers: let it finish,
    # for at most about one long text's service time.
    deadline = time.monotonic() + 1.5 * ServiceModel().mean_seconds(LONG_CHARS) * setup.time_scale
    while time.monotonic() < deadline and busy():
        time.sleep(0.1)


def replay_trace(url: str, trace: Sequence[Arrival], setup: Setup, label: str, progress: bool) -> list[Record]:
    # Every request has at least its SLO before the cap: enough for every measure but the
    # latency of answers later than that (recorded as "no answer", a miss).
    return asyncio.run(replay(url + "/api/v1/tts", trace, TENANTS,
                              wall_cap_s=setup.preroll_s + setup.duration_s + setup.max_slo_s + CAP_MARGIN_S,
                              label=label, progress=sys.stderr if progress else None))


@dataclass
class Ran:
    """What one arm's run saw: every record, orphaned backend seconds (None: not reported), the pids
    it started (all stopped), each backend's slots at the end, the config file(s) it ran with."""

    records: list[Record]
    orphaned: float | None
    pids: list[int]
    slots: dict[str, float] = field(default_factory=dict)
    config_yaml: str | None = None
    fanout: dict[str, float] = field(default_factory=dict)  # sidecar arms: fanout_counts at the end


def run_nginx(setup: Setup, cell: Cell, trace: Sequence[Arrival], label: str, work_dir: Path,
              progress: bool) -> Ran:
    """Emulators started here (same command, scale, GPU ids as the sidecar's) behind nginx."""
    env = procs.isolated_env(work_dir / "runtime")
    emulators = procs.start_emulators(cell.backends, emulator_args(setup, cell.curve), gpus=cell.gpus, env=env)
    started: list[procs.Proc] = list(emulators)
    urls = [e.url for e in emulators]
    try:
        proxy = start_nginx(work_dir / "nginx", [u.removeprefix("http://") for u in urls])
        started.insert(0, proxy)
        asyncio.run(warm_up_direct(urls, setup))
        records = replay_trace(proxy.url, trace, setup, label, progress)
        if emulator_orphaned_seconds(urls) is not None:  # waiting is worth it only when they report it
            settle(setup, lambda: _emulators_busy(urls))
        orphaned = emulator_orphaned_seconds(urls)
    finally:
        for proc in started:
            proc.stop()
    return Ran(records=records, orphaned=orphaned, pids=[p.pid for p in started])


def run_sidecar(arm: str, setup: Setup, cell: Cell, trace: Sequence[Arrival], label: str, work_dir: Path,
                progress: bool) -> Ran:
    """A fresh sidecar (which starts the emulators) with arm `arm`'s configuration."""
    port = procs.free_port()
    text = sidecar_yaml(arm, setup, cell, port=port, base_port=procs.free_ports(cell.backends))
    service = procs.start_sidecar(text, port, work_dir, env=procs.isolated_env(work_dir / "runtime"))
    pids: list[int] = []
    try:
        pids = procs.backend_pids(service)
        seen = asyncio.run(warm_up(service.url, setup, cell.backends, TENANTS[0].key))
        if len(seen) < cell.backends:
            raise RuntimeError(f"warm-up reached only backends {sorted(seen)}:\n{service.output(4000)}")
        records = replay_trace(service.url, trace, setup, label, progress)
        slots = backend_slots(service.url)
        fanout = fanout_counts(service.url)
        settle(setup, lambda: sidecar_busy(service))
        orphaned = orphaned_backend_seconds(service.url, service.admin_token)
    finally:
        service.stop()
        procs.reap(pids)
    return Ran(records=records, orphaned=orphaned, pids=[service.pid, *pids], slots=slots, config_yaml=text,
               fanout=fanout)


def measured_window(records: Sequence[Record], preroll_s: float) -> list[Record]:
    """The records of arrivals after the pre-roll, their times counted from its end."""
    return [dataclasses.replace(r, intended_s=r.intended_s - preroll_s) for r in records if r.intended_s >= preroll_s]


# What runs one arm over a trace: (arm, setup, cell, trace, label, work_dir, progress) -> what it saw.
ArmRunner = Callable[[str, Setup, Cell, Sequence[Arrival], str, Path, bool], Ran]


def run_point(setup: Setup, cell: Cell, work_s: float, arm: str, load: float, work_dir: Path,
              progress: bool = True, *, runner: ArmRunner | None = None) -> RunResult:
    """Start arm `arm` fresh, warm up, replay the trace at `load` x capacity, let orphaned work
    settle, read the counters, stop everything; summarize what the clients saw. `runner`: how to
    run an arm this module does not know (another benchmark's topology); None: nginx or a sidecar arm."""
    started = time.monotonic()
    trace = make_trace(seed=setup.seed, rate=arrival_rate(load, cell.backends, work_s),
                       duration_s=setup.preroll_s + setup.duration_s,
                       tenants=TENANTS, mix=MIXES[cell.trace])
    label = f"{cell.backends}b {cell.trace} {cell.curve} {arm} {load:g}x"
    with tempfile.TemporaryDirectory(prefix=f"{arm}-", dir=work_dir) as tmp:
        if runner is not None:
            ran = runner(arm, setup, cell, trace, label, Path(tmp), progress)
        elif arm == NGINX:
            ran = run_nginx(setup, cell, trace, label, Path(tmp), progress)
        else:
            ran = run_sidecar(arm, setup, cell, trace, label, Path(tmp), progress)
    measured = measured_window(ran.records, setup.preroll_s)
    summary = summarize(measured, config=arm, load=load, backends=cell.backends, duration_s=setup.duration_s,
                        slo_s=setup.slo_s, work_s=setup.work_s, weights={t.name: t.weight for t in TENANTS},
                        orphaned_backend_s=ran.orphaned)
    return RunResult(summary=summary, records=measured, pids=ran.pids, slots=ran.slots,
                     config_yaml=ran.config_yaml, wall_s=time.monotonic() - started, fanout=ran.fanout)


# Why this machine cannot run an arm in a cell (None: it can); the work directory is for checks.
Unsupported = Callable[[str, Setup, Cell, Path], str | None]
# Told of every point as it is measured: the cell, the arm, the load and its result.
PointDone = Callable[[Cell, str, float, RunResult], None]


def run(plan: Plan, *, command: str, progress: bool = True, skip: Unsupported | None = None,
        runner: ArmRunner | None = None, after: PointDone | None = None) -> BenchResult:
    """Every cell's arms at their loads, each started fresh. An arm this machine cannot run (nginx
    missing, a configuration the sidecar rejects; ``skip``, by default ``unsupported``) is skipped,
    with why. ``runner`` runs an arm instead of this module's nginx and sidecar arms; ``after`` is
    told of each point measured."""
    skip = unsupported if skip is None else skip
    started = time.monotonic()
    total, done = plan.runs, 0
    if progress:
        window = plan.setup.preroll_s + plan.setup.duration_s
        sys.stderr.write(f"{total} runs of {window:g} s arrivals; estimate ~{plan.estimate_s() / 60:.0f} min "
                         f"({window:g} s + ~{RUN_OVERHEAD_S:g} s each)\n")
    cells: list[CellResult] = []
    with tempfile.TemporaryDirectory(prefix="glmtts-overload-") as tmp:
        for cell in plan.cells:
            result = CellResult(cell=cell, mean_work_s=mean_work_s(plan.setup, cell.trace), runs=[])
            cells.append(result)
            for arm in cell.arms:
                why = skip(arm, plan.setup, cell, Path(tmp))
                if why is not None:
                    result.skipped[arm] = why
                    sys.stderr.write(f"[{cell.key}: {arm}] skipped: {why}\n")
            for arm, load in cell.points():
                if arm in result.skipped:
                    continue
                point = run_point(plan.setup, cell, result.mean_work_s, arm, load, Path(tmp), progress,
                                  runner=runner)
                result.runs.append(point)
                if after is not None:
                    after(cell, arm, load, point)
                done += 1
                if progress:
                    mean = (time.monotonic() - started) / done
                    sys.stderr.write(f"[{done}/{total}] {cell.key}, {arm} {load:g}x: {point.wall_s:.0f} s; "
                                     f"~{mean * (total - done) / 60:.0f} min left\n")
    return BenchResult(setup=plan.setup, cells=cells, wall_s=time.monotonic() - started, command=command)


def make_plan(args: argparse.Namespace) -> Plan:
    """The cells the command line asks for (see `main`)."""
    if args.smoke:
        return SMOKE
    setup = Setup(time_scale=args.time_scale, duration_s=args.duration, preroll_s=args.preroll, slo=args.slo)
    loads = tuple(args.loads or DEFAULT_LOADS)
    oracle_loads = tuple(args.oracle_loads or (max(loads),))

    def cell(backends: int, trace: str, curve: str) -> Cell:
        arms = FLAT_ARMS if curve == "flat" else tuple(a for a in DEFAULT_ARMS
                                                        if a != SEED or backends in args.seed_pools)
        arms = tuple(a for a in arms if not args.arms or a in args.arms)
        return Cell(backends=backends, trace=trace, curve=curve, arms=arms, loads=loads, oracle_loads=oracle_loads)

    cells = [cell(b, t, args.curve) for t in args.traces for b in args.backends]
    if args.curve == "default" and not args.no_flat:
        trace = "bimodal" if "bimodal" in args.traces else args.traces[0]
        cells.append(cell(2 if 2 in args.backends else min(args.backends), trace, "flat"))
    return Plan(setup=setup, cells=tuple(c for c in cells if c.arms))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny and fast: 2 backends, bimodal, 2.5 s runs, 2 loads")
    p.add_argument("--out", type=Path, default=Path("bench/reports"), help="directory of the report")
    p.add_argument("--traces", nargs="+", choices=tuple(MIXES), default=list(MIXES), help="length mixes")
    p.add_argument("--backends", nargs="+", type=int, default=[2, 4], help="pool sizes")
    p.add_argument("--arms", nargs="+", choices=ARMS, help="only these arms")
    p.add_argument("--loads", nargs="+", type=float, help="multiples of the pool's capacity")
    p.add_argument("--oracle-loads", nargs="+", type=float, help="where the oracle-slotsN arms run (default: top load)")
    p.add_argument("--seed-pools", nargs="+", type=int, default=[4], help="pool sizes the seed arm runs on")
    p.add_argument("--curve", choices=CURVES, default="default", help="the emulators' in-process throughput curve")
    p.add_argument("--no-flat", action="store_true", help="skip the flat-curve run that follows the default curve")
    p.add_argument("--slo", choices=SLO_POLICIES, default="dynamic", help="what counts as in time")
    p.add_argument("--duration", type=float, default=Setup.duration_s, help="seconds of arrivals measured per run")
    p.add_argument("--preroll", type=float, default=Setup.preroll_s,
                   help="seconds of the same trace offered first and not counted")
    p.add_argument("--time-scale", type=float, default=Setup.time_scale, help="emulated seconds x this")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from bench.overload_report import write_report  # matplotlib: only when a report is written

    args = parser().parse_args(argv)
    plan = make_plan(args)
    command = reproduce("bench.overload", argv)
    result = run(plan, command=command, progress=not args.quiet)
    report = write_report(result, args.out)
    sys.stdout.write(report.read_text())
    sys.stderr.write(f"wrote {report} ({result.wall_s:.0f} s)\n")


if __name__ == "__main__":
    main()
