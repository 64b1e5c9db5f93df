"""Proxy overhead: what nginx and the sidecar add to a near-instant TTS request, and the sidecar's memory.

    python -m bench.proxy_overhead [--smoke] [--out bench/reports]

One emulator backend at a tiny time scale (a 2-character text takes well under a millisecond of
emulated inference; the answer is a ~30 kB JSON with the WAV) is reached three ways: directly,
through nginx (`least_conn`, keepalive; bench.nginx) and through the sidecar (one backend, slots as
many as the backend's own short-text semaphore). The request is a real `POST /api/v1/tts` -- the
sidecar parses the form, admits, queues, dispatches and streams the answer exactly as for a long
text -- so what is measured is the per-request cost of each path.

- **Added latency**: one client, one request at a time, the same requests on each path; p50/p99 of
  each path minus the direct path's.
- **Saturation**: wrk (a Lua script sets the POST body) with many connections for a fixed time;
  requests/s per path, with the CPU time wrk itself used, to show it was not the bottleneck.
  Without wrk, a Python closed-loop client stands in (and the report says so).
- **Memory**: the sidecar's peak RSS while 50 clients each receive a ~5 MB answer at once
  (bench.stream_memory.measure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from matplotlib.figure import Figure

from bench import procs
from bench.closedloop import cpu_seconds, measure, tts_form, warm
from bench.nginx import nginx_binary, start_nginx
from bench.summary import percentile
from scheduler.core.cost import CostPriors

REPORT = "proxy-overhead.md"
LATENCY_PLOT = "proxy-overhead-latency.png"
PATHS = ("direct", "nginx", "sidecar")
TEXT = "你好"
BACKEND_SLOTS = 10  # the emulator's (upstream's) short-text semaphore: what a direct client can use at once
LATENCY_COLUMNS = ("path", "requests", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms")
SATURATION_COLUMNS = ("path", "req/s", "errors", "load generator CPU %", "proxy CPU %", "proxy CPU ms per request",
                      "backend CPU %", "machine busy %")


@dataclass(frozen=True, kw_only=True)
class Setup:
    time_scale: float
    latency_requests: int
    saturation_s: float
    connections: int
    memory_clients: int
    memory_chars: int


FULL = Setup(time_scale=0.001, latency_requests=400, saturation_s=10.0, connections=32, memory_clients=50,
             memory_chars=375)
SMOKE = Setup(time_scale=0.001, latency_requests=40, saturation_s=2.0, connections=16, memory_clients=10,
              memory_chars=120)


@dataclass(frozen=True, kw_only=True)
class Saturation:
    rps: float
    errors: int
    tool: str  # "wrk" or "python"
    generator_cpu_pct: float  # % of one core
    proxy_cpu_pct: float | None  # nginx (master + workers) or the sidecar; None for direct
    backend_cpu_pct: float
    machine_busy_pct: float  # every process on the machine, % of all its cores


@dataclass
class PathResult:
    path: str
    latencies_s: list[float] = field(default_factory=list)
    saturation: Saturation | None = None


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (nginx's workers), from /proc."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_bytes()
        except OSError:
            continue
        if int(data[data.rindex(b")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return found


async def _sequential(url: str, form: tuple[str, bytes], count: int) -> list[float]:
    content_type, body = form
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url + "/api/v1/tts", data=body, headers={"Content-Type": content_type}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
            latencies.append(time.perf_counter() - started)
    return latencies


def lua_string(data: bytes) -> str:
    """`data` as a Lua string literal (every byte outside printable ASCII escaped)."""
    out = []
    for byte in data:
        char = chr(byte)
        out.append(char if 32 <= byte < 127 and char not in '"\\' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def wrk_script(form: tuple[str, bytes]) -> str:
    content_type, body = form
    return (f'wrk.method = "POST"\nwrk.body = {lua_string(body)}\n'
            f'wrk.headers["Content-Type"] = {lua_string(content_type.encode())}\n')


def _wrk(url: str, form: tuple[str, bytes], setup: Setup, work_dir: Path) -> tuple[float, int, float]:
    """(requests/s, non-2xx + socket errors, wrk's CPU seconds)."""
    script = work_dir / "post.lua"
    script.write_text(wrk_script(form))
    wrk = shutil.which("wrk")
    assert wrk is not None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([wrk, "-t", "2", "-c", str(setup.connections), "-d", f"{setup.saturation_s:g}s",
                          "-s", str(script), url + "/api/v1/tts"], capture_output=True, text=True, check=True,
                         timeout=setup.saturation_s + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket:
        errors += sum(int(n) for n in socket.groups())
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return rps, errors, cpu


def saturate(url: str, form: tuple[str, bytes], setup: Setup, work_dir: Path, proxy_pids: Sequence[int],
             backend_pids: Sequence[int]) -> Saturation:
    proxy_before, backend_before = cpu_seconds(proxy_pids), cpu_seconds(backend_pids)
    busy_before, total_before = machine_ticks()
    started = time.monotonic()
    if shutil.which("wrk"):
        rps, errors, generator_cpu = _wrk(url, form, setup, work_dir)
        tool = "wrk"
    else:
        own = time.process_time()
        window = measure([url] * setup.connections, form, window_s=setup.saturation_s, ramp_s=0.5)
        rps, errors, generator_cpu, tool = window.rps, window.failed, time.process_time() - own, "python"
    elapsed = time.monotonic() - started
    busy_after, total_after = machine_ticks()
    proxy_cpu = (cpu_seconds(proxy_pids) - proxy_before) if proxy_pids else None
    return Saturation(rps=rps, errors=errors, tool=tool, generator_cpu_pct=100 * generator_cpu / elapsed,
                      proxy_cpu_pct=None if proxy_cpu is None else 100 * proxy_cpu / elapsed,
                      backend_cpu_pct=100 * (cpu_seconds(backend_pids) - backend_before) / elapsed,
                      machine_busy_pct=100 * (busy_after - busy_before) / max(1, total_after - total_before))


def sidecar_yaml(backend_url: str, setup: Setup) -> tuple[str, int]:
    """A sidecar over one external backend (the emulator started here), slots as the backend allows."""
    port = procs.free_port()
    s = setup.time_scale
    return f"""listen: {{host: 127.0.0.1, port: {port}}}
backends:
  gpus: []
  external: [{backend_url}]
  slots: {BACKEND_SLOTS}
  health: {{interval_s: 1.0, timeout_s: 2.0, start_timeout_s: 60.0}}
cost: {{base_s: {CostPriors().base_s * s!r}, per_unit_s: {CostPriors().per_unit_s * s!r},
       reload_s: {CostPriors().reload_s * s!r}}}
logging: {{level: WARNING}}
""", port


def run_paths(setup: Setup, paths: Sequence[str]) -> tuple[list[PathResult], list[int], dict[str, str]]:
    """Every path in turn over one emulator; returns results, every pid started, skipped paths."""
    results: list[PathResult] = []
    skipped: dict[str, str] = {}
    pids: list[int] = []
    form = tts_form(TEXT)
    with tempfile.TemporaryDirectory(prefix="glmtts-proxy-overhead-") as tmp:
        work = Path(tmp)
        (backend,) = procs.start_emulators(1, ["--time-scale", f"{setup.time_scale:g}", "--log-level", "WARNING"],
                                           gpus=["0"], env=procs.isolated_env(work / "runtime"))
        pids.append(backend.pid)
        try:
            warm([backend.url], form, rounds=3)
            for path in paths:
                front: procs.Proc | None = None
                if path == "nginx":
                    if nginx_binary() is None:
                        skipped[path] = "nginx not installed"
                        continue
                    front = start_nginx(work / "nginx", [backend.url.removeprefix("http://")])
                elif path == "sidecar":
                    text, port = sidecar_yaml(backend.url, setup)
                    front = procs.start_sidecar(text, port, work)
                try:
                    url = front.url if front else backend.url
                    proxy_pids = [front.pid, *children_of(front.pid)] if front else []
                    pids += proxy_pids
                    warm([url], form, rounds=20)
                    latencies = asyncio.run(_sequential(url, form, setup.latency_requests))
                    saturation = saturate(url, form, setup, work, proxy_pids, [backend.pid])
                finally:
                    if front:
                        front.stop()
                results.append(PathResult(path, latencies, saturation))
                sys.stderr.write(f"[proxy-overhead] {path}: p50 {1000 * (percentile(latencies, 50) or 0):.2f} ms, "
                                 f"{saturation.rps:.0f} req/s ({saturation.tool})\n")
        finally:
            backend.stop()
    return results, pids, skipped


def memory(setup: Setup) -> dict[str, Any]:
    from bench.stream_memory import measure as measure_memory

    return measure_memory(clients=setup.memory_clients, chars=setup.memory_chars)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{1000 * value:.2f}"


def latency_table(results: Sequence[PathResult]) -> list[str]:
    direct = next((r for r in results if r.path == "direct"), None)
    base50 = percentile(direct.latencies_s, 50) if direct else None
    base99 = percentile(direct.latencies_s, 99) if direct else None
    rows = ["| " + " | ".join(LATENCY_COLUMNS) + " |", "|" + "---|" * len(LATENCY_COLUMNS)]
    for r in results:
        p50, p99 = percentile(r.latencies_s, 50), percentile(r.latencies_s, 99)
        added50 = p50 - base50 if p50 is not None and base50 is not None else None
        added99 = p99 - base99 if p99 is not None and base99 is not None else None
        rows.append(f"| {r.path} | {len(r.latencies_s)} | {_ms(p50)} | {_ms(p99)} | {_ms(added50)} | {_ms(added99)} |")
    return rows


def saturation_table(results: Sequence[PathResult]) -> list[str]:
    rows = ["| " + " | ".join(SATURATION_COLUMNS) + " |", "|" + "---|" * len(SATURATION_COLUMNS)]
    for r in results:
        s = r.saturation
        if s is None:
            continue
        proxy = "–" if s.proxy_cpu_pct is None else f"{s.proxy_cpu_pct:.0f}"
        per_request = "–" if s.proxy_cpu_pct is None or not s.rps else f"{10 * s.proxy_cpu_pct / s.rps:.3f}"
        rows.append(f"| {r.path} | {s.rps:.0f} | {s.errors} | {s.generator_cpu_pct:.0f} | {proxy} | {per_request} | "
                    f"{s.backend_cpu_pct:.0f} | {s.machine_busy_pct:.0f} |")
    return rows


def plot(results: Sequence[PathResult], path: Path) -> None:
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    for r in results:
        values = sorted(1000 * x for x in r.latencies_s)
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=r.path)
    ax.set_xscale("log")
    ax.set_xlabel("latency of one request (one client, sequential), ms")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(setup: Setup, results: Sequence[PathResult], mem: dict[str, Any] | None, skipped: dict[str, str],
           wall_s: float, command: str) -> str:
    tools = {r.saturation.tool for r in results if r.saturation}
    mib = 1024.0
    lines = [
        "# Proxy overhead: direct vs nginx vs the sidecar",
        "",
        f"Reproduce: `{command}` (this run: {wall_s:.0f} s on {os.cpu_count()} CPUs).",
        "",
        f"One emulator backend at `--time-scale {setup.time_scale:g}` answers `POST /api/v1/tts` with "
        f"`input_text={TEXT}` (2 characters: well under 1 ms of emulated inference, a ~30 kB answer) — a real "
        "TTS request, so the sidecar parses the form, admits, queues, dispatches and streams the answer as it "
        "would for any text, while the backend costs next to nothing. Paths: **direct** to the backend; "
        "**nginx** (`least_conn`, keepalive to the backend, bench/nginx.py); **sidecar** (the backend as an "
        f"`external` backend, `slots: {BACKEND_SLOTS}`, the backend's own short-text semaphore). Each path is "
        "warmed up with 20 requests first.",
        "",
        *(f"**{p} skipped**: {why}" for p, why in skipped.items()),
        "",
        f"## Added latency (one client, {setup.latency_requests} sequential requests per path)",
        "",
        *latency_table(results),
        "",
        "Added = the path's percentile minus the direct path's (a difference within run-to-run noise can come "
        "out negative).",
        "",
        f"![latency distributions]({LATENCY_PLOT})",
        "",
        f"## Saturation ({setup.connections} connections, {setup.saturation_s:g} s per path, "
        f"{', '.join(sorted(tools)) or '–'})",
        "",
        *saturation_table(results),
        "",
        "CPU % is of one core over the run (the machine has "
        f"{os.cpu_count()}); the load generator, proxy and backend share them. *machine busy %* is every process "
        "on the machine, % of all cores: near 100 % means the host, not one process, set the ceiling, and "
        "anything else running shows up there. The load generator is not the bottleneck when its CPU use stays "
        "well below what the servers use: wrk is C, two threads, and sends the same pre-built request. Proxy "
        "CPU near 100 % means the proxy (one process each, single-threaded) is what saturates; direct shows the "
        "backend's own ceiling. *proxy CPU ms per request* = proxy CPU seconds / requests: what one request costs "
        "the proxy, whatever the machine's load.",
        "",
    ]
    if "python" in tools:
        lines += ["wrk was not installed: a single-process Python closed-loop client measured saturation; "
                  "it may itself be the bottleneck (compare its CPU % with the servers').", ""]
    if mem is not None:
        lines += [
            f"## Sidecar memory with {mem['clients']} concurrent ~{mem['answer_bytes'] / 1e6:.1f} MB answers",
            "",
            f"bench.stream_memory's measure(clients={mem['clients']}): a sidecar over 2 emulators, warmed up, then "
            f"{mem['clients']} clients at once each receive a {mem['answer_bytes'] / 1e6:.1f} MB answer "
            f"({mem['total_bytes'] / 1e6:.0f} MB in all, {mem['seconds']:.1f} s).",
            "",
            "| | MiB |",
            "|---|---|",
            f"| resident before | {mem['rss_before_kib'] / mib:.1f} |",
            f"| peak before | {mem['peak_before_kib'] / mib:.1f} |",
            f"| **peak during** | **{mem['peak_after_kib'] / mib:.1f}** |",
            f"| peak growth | {mem['peak_growth_kib'] / mib:.1f} |",
            "",
            f"Holding every answer whole would add ~{mem['total_bytes'] / 2**20:.0f} MiB; streaming keeps the "
            "peak flat.",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="few requests, 2 s saturation, 10 memory clients")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    setup = replace(setup)
    command = "python -m bench.proxy_overhead" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    started = time.monotonic()
    results, pids, skipped = run_paths(setup, args.paths)
    mem = None if args.no_memory else memory(setup)
    wall = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / LATENCY_PLOT)
    report = args.out / REPORT
    report.write_text(render(setup, results, mem, skipped, wall, command))
    (args.out / "proxy-overhead.json").write_text(json.dumps(
        {"setup": asdict(setup), "wall_s": wall, "skipped": skipped, "memory": mem, "pids": pids,
         "paths": [{"path": r.path, "p50_s": percentile(r.latencies_s, 50), "p99_s": percentile(r.latencies_s, 99),
                    "saturation": asdict(r.saturation) if r.saturation else None} for r in results]},
        indent=2) + "\n")
    sys.stdout.write(report.read_text())


if __name__ == "__main__":
    main()
