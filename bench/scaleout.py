"""Scale-out: two sidecars of two backends each behind the outer nginx, against one sidecar of four.

    python -m bench.scaleout [--traces mix bimodal] [--loads 1.3 2.5] [--duration S] [--preroll S]
        [--time-scale S] [--smoke] [--out DIR] [--quiet]

Both arms serve the same pool of four emulator backends (each on its own emulated GPU, GPU ids
0-3, jitter seed = GPU id) with bench/overload's `sidecar-high` operator configuration, and are
offered bench/overload's trace (same tenants, length mixes, 25 % service noise, SLO deadlines and
priors) at 1.3x and 2.5x the four backends' capacity:

- **1x4** -- one sidecar over all four backends; the client talks to it directly.
- **2x2** -- two sidecars over two backends each (GPUs 0-1 and 2-3), behind the outer nginx
  (`config/nginx-outer.conf` rendered by bench.outer_nginx: `least_conn`, no TLS, a per-address
  rate limit too high to bind); the client talks to nginx.

Both arms are measured in the same run, each started fresh at every load. The client keeps one
record per arrival, so a request nginx loses (its own 502) counts as a failure. Writes
``scaleout.md`` (verdict, tables, every configuration file, reproduce command), ``scaleout.json``
and PNG plots into ``--out`` (bench/scaleout_report). ``--smoke`` is a tiny version for the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench import overload, procs
from bench.fanout import machine
from bench.loadgen import MIXES, Arrival
from bench.markdown import reproduce
from bench.nginx import MISSING as NGINX_MISSING
from bench.nginx import nginx_binary
from bench.outer_nginx import start_outer
from bench.overload_spec import HIGH, TENANTS, Cell, Plan, RunResult, Setup
from bench.scaleout_report import (
    ARMS,
    BACKENDS,
    SIDECARS,
    SINGLE,
    SPLIT,
    VERDICT_LOADS,
    ScaleoutResult,
    label,
    write_report,
)

TIME_SCALE = 0.05
# Seconds of arrivals measured per run: at 20 s (bench.overload's default) a run holds ~120
# requests and one run's goodput swings by ~0.2; 60 s holds ~350.
DURATION_S = 60.0
INDEX_SEED = '"--seed", "{index}"'  # bench/overload's emulator command: jitter seed = backend index
GPU_SEED = '"--seed", "{gpu}"'  # the same seeds on the same GPUs once the pool is split


@dataclass(frozen=True, kw_only=True)
class ShardCell(Cell):
    """One sidecar's share of the pool: `backends` emulated GPUs from id `first_gpu` on."""

    first_gpu: int = 0

    @property
    def gpus(self) -> list[str]:
        return [str(self.first_gpu + i) for i in range(self.backends)]


def shard_yaml(setup: Setup, cell: Cell, shard: int, *, port: int, base_port: int) -> str:
    """Sidecar `shard`'s whole config: bench/overload's `sidecar-high` over its share of the pool.

    Its backends keep the GPU ids and jitter seeds they have in the single sidecar (seed = GPU id,
    which there equals the backend's index), so both arms run the very same four emulators."""
    per = cell.backends // SIDECARS
    part = ShardCell(backends=per, trace=cell.trace, curve=cell.curve, arms=(HIGH,), loads=cell.loads,
                     oracle_loads=(), first_gpu=shard * per)
    text = overload.sidecar_yaml(HIGH, setup, part, port=port, base_port=base_port)
    if INDEX_SEED not in text:
        raise ValueError(f"bench/overload's emulator command no longer has {INDEX_SEED}: {text}")
    return text.replace(INDEX_SEED, GPU_SEED)


def check_config(text: str, path: Path) -> str | None:
    """The sidecar's `--check-config` complaint about `text` (written to `path`), or None."""
    path.write_text(text)
    check = subprocess.run([sys.executable, "-m", "scheduler", "--config", str(path), "--check-config"],
                           capture_output=True, text=True, cwd=procs.ROOT, check=False)
    if check.returncode == 0:
        return None
    return f"the sidecar rejects this arm's configuration: {(check.stderr or check.stdout).strip()[-500:]}"


def unsupported(arm: str, setup: Setup, cell: Cell, work_dir: Path) -> str | None:
    """Why this machine cannot run arm `arm`, or None when it can."""
    if arm == SINGLE:
        return overload.unsupported(HIGH, setup, cell, work_dir)
    if nginx_binary() is None:
        return NGINX_MISSING
    for shard in range(SIDECARS):
        why = check_config(shard_yaml(setup, cell, shard, port=8049, base_port=18050 + 10 * shard),
                           work_dir / f"check-{SPLIT}-{shard}.yaml")
        if why is not None:
            return why
    return None


# --- the outer nginx --------------------------------------------------------------------------

# The committed limit_req is per client address, and the benchmark's client is one address: a rate
# it never reaches leaves the topology alone measured.
UNLIMITED_PER_S = 100_000
PROXY = ("config/nginx-outer.conf rendered by bench/outer_nginx.py: `least_conn` over the two sidecars with the "
         "committed server parameters, keepalive, `proxy_next_upstream error timeout` (never a POST that reached "
         f"a sidecar), its timeouts and error pages; plain HTTP (no TLS) and `limit_req` raised to "
         f"{UNLIMITED_PER_S} r/s with that burst (never binds)")


def start_proxy(prefix: Path, sidecars: Sequence[str]) -> tuple[procs.Proc, str]:
    """The outer nginx on a free loopback port in front of `sidecars` (host:port), and its nginx.conf."""
    proxy = start_outer(prefix, sidecars, rate_per_s=UNLIMITED_PER_S, burst=UNLIMITED_PER_S)
    return proxy, (prefix / "nginx.conf").read_text()


# --- the arms ---------------------------------------------------------------------------------


def _all_ready(service: procs.Proc) -> bool:
    return all(b["state"] == "ready" for b in procs.backend_states(service))


def start_sidecars(texts: Sequence[tuple[str, int]], work_dir: Path, env: dict[str, str]) -> list[procs.Proc]:
    """Sidecars with configs (text, port), started together; each ready with every backend ready."""
    started: list[procs.Proc] = []
    try:
        for text, port in texts:
            started.append(procs.start_sidecar(text, port, work_dir, env=env, wait_ready=False))
        for service in started:
            service.wait_http("/readyz", 120.0)
            procs.wait_for(partial(_all_ready, service), 120.0, f"every backend of {service.url} to be ready")
    except BaseException:
        for service in started:
            service.stop()
        raise
    return started


async def _warm_shards(services: Sequence[procs.Proc], setup: Setup, per: int) -> list[set[str]]:
    return list(await asyncio.gather(*(overload.warm_up(s.url, setup, per, TENANTS[0].key) for s in services)))


def run_split(setup: Setup, cell: Cell, trace: Sequence[Arrival], label_: str, work_dir: Path,
              progress: bool) -> tuple[overload.Ran, dict[str, str]]:
    """Two fresh sidecars (each starting its emulators) behind the outer nginx; the files they ran with."""
    per = cell.backends // SIDECARS
    env = procs.isolated_env(work_dir / "runtime")  # one host: the emulators share its GPU registry
    first_port = procs.free_ports(SIDECARS)
    texts = [(shard_yaml(setup, cell, shard, port=first_port + shard, base_port=procs.free_ports(per)),
              first_port + shard) for shard in range(SIDECARS)]
    services = start_sidecars(texts, work_dir, env)
    proxy: procs.Proc | None = None
    pids: list[int] = []
    try:
        ids = [{str(b["id"]) for b in procs.backend_states(s)} for s in services]
        pids = [pid for s in services for pid in procs.backend_pids(s)]
        for seen, want, service in zip(asyncio.run(_warm_shards(services, setup, per)), ids, services, strict=True):
            if seen != want:
                raise RuntimeError(f"warm-up reached only backends {sorted(seen)}:\n{service.output(4000)}")
        proxy, conf = start_proxy(work_dir / "nginx", [s.url.removeprefix("http://") for s in services])
        through = asyncio.run(overload.warm_up(proxy.url, setup, cell.backends, TENANTS[0].key))
        if not all(through & want for want in ids):
            raise RuntimeError(f"through nginx the warm-up reached only backends {sorted(through)}")
        records = overload.replay_trace(proxy.url, trace, setup, label_, progress)
        slots = {k: v for s in services for k, v in overload.backend_slots(s.url).items()}
        overload.settle(setup, lambda: any(overload.sidecar_busy(s) for s in services))
        orphaned = [overload.orphaned_backend_seconds(s.url, s.admin_token) for s in services]
    finally:
        if proxy is not None:
            proxy.stop()
            proxy.log_path.unlink(missing_ok=True)  # start_outer keeps nginx's output for its own readers
        for service in services:
            service.stop()
        procs.reap(pids)
    files = {f"{SPLIT}: sidecar {shard + 1} (GPUs {', '.join(map(str, range(shard * per, shard * per + per)))})": text
             for shard, (text, _) in enumerate(texts)}
    files[f"{SPLIT}: the outer nginx.conf"] = conf
    total = None if any(o is None for o in orphaned) else sum(o for o in orphaned if o is not None)
    started = [*(p.pid for p in (proxy, *services) if p is not None), *pids]
    return overload.Ran(records=records, orphaned=total, pids=started, slots=slots, config_yaml=None), files


class Runner:
    """Runs either arm for `overload.run_point`; keeps the files of each arm's first run and the
    arrivals sent and records kept of the latest run (a run that lost one fails)."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.sent = 0
        self.recorded = 0

    def __call__(self, arm: str, setup: Setup, cell: Cell, trace: Sequence[Arrival], label_: str, work_dir: Path,
                 progress: bool) -> overload.Ran:
        if arm == SINGLE:
            ran = overload.run_sidecar(HIGH, setup, cell, trace, label_, work_dir, progress)
            files = {f"{SINGLE}: the sidecar": ran.config_yaml or ""}
        elif arm == SPLIT:
            ran, files = run_split(setup, cell, trace, label_, work_dir, progress)
        else:
            raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
        self.sent, self.recorded = len(trace), len(ran.records)
        if self.recorded != self.sent:
            raise RuntimeError(f"{label_}: {self.sent} arrivals sent but {self.recorded} recorded")
        for title, body in files.items():
            self.files.setdefault(title, body)
        return ran


# --- the whole benchmark ----------------------------------------------------------------------


def make_cells(traces: Sequence[str], loads: Sequence[float]) -> tuple[Cell, ...]:
    return tuple(Cell(backends=BACKENDS, trace=t, curve="default", arms=ARMS, loads=tuple(loads), oracle_loads=())
                 for t in traces)


SMOKE = Plan(setup=Setup(time_scale=0.01, duration_s=2.5, preroll_s=1.0, warmup_rounds=1),
             cells=make_cells(("bimodal",), (2.5,)))


def run(plan: Plan, *, command: str, progress: bool = True) -> ScaleoutResult:
    """Every cell's two arms at its loads, load by load, each started fresh (bench.overload.run with
    this benchmark's arms). An arm this machine cannot run (nginx missing, a configuration the
    sidecar rejects) is skipped, with why."""
    runner = Runner()
    sent: dict[str, int] = {}
    recorded: dict[str, int] = {}

    def counted(cell: Cell, arm: str, load: float, point: RunResult) -> None:
        key = label(cell.trace, arm, load)
        sent[key], recorded[key] = runner.sent, runner.recorded

    bench = overload.run(plan, command=command, progress=progress, skip=unsupported, runner=runner, after=counted)
    return ScaleoutResult(bench=bench, machine=machine(), proxy=PROXY, files=runner.files, sent=sent,
                          recorded=recorded)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return SMOKE
    setup = Setup(time_scale=args.time_scale, duration_s=args.duration, preroll_s=args.preroll)
    return Plan(setup=setup, cells=make_cells(args.traces, args.loads))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny and fast: bimodal at 2.5x, 2.5 s runs")
    p.add_argument("--out", type=Path, default=Path("bench/reports/scaleout"), help="directory of the report")
    p.add_argument("--traces", nargs="+", choices=tuple(MIXES), default=list(MIXES), help="length mixes")
    p.add_argument("--loads", nargs="+", type=float, default=list(VERDICT_LOADS), help="x the 4 backends' capacity")
    p.add_argument("--duration", type=float, default=DURATION_S, help="seconds of arrivals measured per run")
    p.add_argument("--preroll", type=float, default=Setup.preroll_s, help="seconds offered first, uncounted")
    p.add_argument("--time-scale", type=float, default=TIME_SCALE, help="emulated seconds x this")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    # SIGTERM unwinds like Ctrl-C, so every run's `finally` stops the processes it started (each
    # leads its own process group, out of reach of a signal to ours).
    signal.signal(signal.SIGTERM, _exit_on_term)
    args = parser().parse_args(argv)
    command = reproduce("bench.scaleout", argv)
    result = run(make_plan(args), command=command, progress=not args.quiet)
    report = write_report(result, args.out)
    sys.stdout.write(report.read_text())
    sys.stderr.write(f"wrote {report} ({result.bench.wall_s:.0f} s)\n")


if __name__ == "__main__":
    main()
