"""Processes per GPU: 1..16 emulator processes sharing one emulated GPU, saturated.

    python -m bench.procs_per_gpu [--smoke] [--out bench/reports]

For each k, k emulator processes start on the same GPU id (`CUDA_VISIBLE_DEVICES=0`, so the
emulator's shared-GPU model with its default measured curve G(n) applies; glmtts.emulator.gpu) and
k closed-loop clients each keep one process busy with one request at a time -- directly, without
the sidecar, so the numbers are the emulated GPU's alone. Every process is warmed up first; then
requests finishing inside a fixed window count. Reported per k: aggregate requests/s and its ratio
to one process, latency p50/p99, next to the calibration's measured G(k) and latencies
(measurements/h200-calibration.md), and two PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from matplotlib.figure import Figure

from bench import procs
from bench.closedloop import Window, cpu_seconds, measure, tts_form, warm
from bench.loadgen import corpus_text
from glmtts.emulator.gpu import MEASURED_GPU_CURVE, GpuCurve
from glmtts.emulator.timing import ServiceModel
from glmtts.text import units

REPORT = "procs-per-gpu.md"
THROUGHPUT_PLOT = "procs-per-gpu-throughput.png"
LATENCY_PLOT = "procs-per-gpu-latency.png"
COLUMNS = ("processes", "req/s", "× vs 1", "calibration G(k)", "p50 s", "p99 s", "p50 × vs 1",
           "expected k/G(k)", "calibration latency s", "emulator CPU %")
# Mean latency per request in the calibration's "n processes on the same GPU" rows (cold requests).
CALIBRATION_LATENCY_S = {1: "15–22", 2: "16", 4: "22", 8: "18–19", 16: "25", 24: "32"}


@dataclass(frozen=True, kw_only=True)
class Setup:
    ks: tuple[int, ...]
    time_scale: float
    chars: int  # every request's text length
    window_s: float
    ramp_factor: float = 1.5  # ramp = this x the expected latency at k (every client is mid-request by then)


FULL = Setup(ks=(1, 2, 4, 8, 16), time_scale=0.1, chars=60, window_s=20.0)
SMOKE = Setup(ks=(1, 2, 4), time_scale=0.02, chars=40, window_s=2.0)


@dataclass(frozen=True, kw_only=True)
class Point:
    k: int
    window: Window
    cpu_pct: float  # the emulators' CPU use over the window, % of one core


def solo_seconds(setup: Setup) -> float:
    return ServiceModel().mean_seconds(units(corpus_text(0, setup.chars))) * setup.time_scale


def run_k(setup: Setup, k: int, work_dir: Path) -> tuple[Point, list[int]]:
    env = procs.isolated_env(work_dir / f"runtime-{k}")
    # One jitter seed for all: every process takes exactly as long for the request, so ratios compare k alone.
    emulators = procs.start_emulators(k, ["--time-scale", f"{setup.time_scale:g}", "--seed", "0"], gpus=["0"],
                                      env=env)
    try:
        form = tts_form(corpus_text(0, setup.chars))
        warm([e.url for e in emulators], form)
        pids = [e.pid for e in emulators]
        expected = solo_seconds(setup) * k / GpuCurve()(k)
        cpu_before, t0 = cpu_seconds(pids), time.monotonic()
        window = measure([e.url for e in emulators], form, window_s=setup.window_s,
                         ramp_s=setup.ramp_factor * expected)
        cpu = (cpu_seconds(pids) - cpu_before) / (time.monotonic() - t0)
    finally:
        for emulator in emulators:
            emulator.stop()
    return Point(k=k, window=window, cpu_pct=100 * cpu), pids


def run(setup: Setup) -> tuple[list[Point], list[int], float]:
    started = time.monotonic()
    points: list[Point] = []
    pids: list[int] = []
    with tempfile.TemporaryDirectory(prefix="glmtts-procs-per-gpu-") as tmp:
        for k in setup.ks:
            point, started_pids = run_k(setup, k, Path(tmp))
            points.append(point)
            pids += started_pids
            sys.stderr.write(f"[procs-per-gpu] k={k}: {point.window.rps:.2f} req/s, "
                             f"p50 {point.window.latency(50) or 0:.3f} s\n")
    return points, pids, time.monotonic() - started


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(points: Sequence[Point]) -> list[str]:
    curve = GpuCurve()
    base = next((p for p in points if p.k == 1), points[0])
    base_rps, base_p50 = base.window.rps, base.window.latency(50)
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for p in points:
        p50 = p.window.latency(50)
        cells = [str(p.k), _f(p.window.rps), _f(p.window.rps / base_rps if base_rps else None), f"{curve(p.k):g}",
                 _f(p50, 3), _f(p.window.latency(99), 3), _f(p50 / base_p50 if p50 and base_p50 else None),
                 _f(p.k / curve(p.k)), CALIBRATION_LATENCY_S.get(p.k, "–"), _f(p.cpu_pct, 0)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def plot(points: Sequence[Point], out_dir: Path) -> None:
    curve = GpuCurve()
    ks = [p.k for p in points]
    base = points[0].window.rps or 1.0
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    ax.plot(ks, [p.window.rps / base for p in points], marker="o", label="measured (× vs 1 process)")
    cal = [(n, g) for n, g in MEASURED_GPU_CURVE if n <= max(ks)]
    ax.plot([n for n, _ in cal], [g for _, g in cal], linestyle="--", marker="x", color="grey",
            label="calibration G(k), H200")
    ax.plot(ks, [float(k) for k in ks], linestyle=":", color="lightgrey", label="linear")
    ax.set_xlabel("processes on one GPU")
    ax.set_ylabel("aggregate throughput, × one process")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / THROUGHPUT_PLOT, dpi=110)

    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    ax.plot(ks, [p.window.latency_or_nan(50) for p in points], marker="o", label="p50")
    ax.plot(ks, [p.window.latency_or_nan(99) for p in points], marker="s", label="p99")
    solo = points[0].window.latency(50) or 0.0
    ax.plot(ks, [solo * k / curve(k) for k in ks], linestyle="--", color="grey", label="p50(1) × k/G(k)")
    ax.set_xlabel("processes on one GPU")
    ax.set_ylabel("latency per request, s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / LATENCY_PLOT, dpi=110)


def render(setup: Setup, points: Sequence[Point], wall_s: float, command: str) -> str:
    solo = solo_seconds(setup)
    return "\n".join([
        "# Processes per GPU: throughput and latency of k backends on one emulated GPU",
        "",
        f"Reproduce: `{command}` (this run: {wall_s:.0f} s on {os.cpu_count()} CPUs).",
        "",
        f"k emulator processes (`python -m glmtts.emulator --time-scale {setup.time_scale:g}`) on the same "
        "emulated GPU (`CUDA_VISIBLE_DEVICES=0`, default measured curve "
        f"`{GpuCurve().as_text()}`), each kept busy by its own closed-loop client with one request at a time, "
        "sent **directly** to the process (no sidecar: this measures the emulated GPU alone; the sidecar adds "
        "the overhead in proxy-overhead.md). Every request is the same "
        f"{setup.chars}-character text ({units(corpus_text(0, setup.chars)):.0f} units: the service model's mean "
        f"is {solo:.3f} s alone at this time scale, and every process, started with the same `--seed 0`, draws "
        "the same jitter for it). Each process is warmed up (model loaded, cold request served); then "
        f"requests finishing within a {setup.window_s:g} s window, after a ramp of {setup.ramp_factor:g}× the "
        "expected latency, count.",
        "",
        *table(points),
        "",
        "- **× vs 1**: aggregate requests/s over one process's; the emulator should reproduce the calibration's "
        "G(k) (total throughput of k busy processes relative to one, measured on an H200 with a 1.36 B Llama, "
        "cold requests; measurements/h200-calibration.md).",
        "- **expected k/G(k)**: each busy process runs at G(k)/k of its solo speed, so a request takes k/G(k) "
        "times as long; **calibration latency s** is the measured mean per request in those rows (real "
        "seconds, 250-token requests), for the shape of the curve.",
        "- Measured ratios may fall a few % short of G(k): between two requests a process does no GPU work "
        "(the answer's round trip and WAV encoding), and the others notice a change in the number of busy "
        "processes at their next poll (every 30 ms).",
        "- **emulator CPU %**: CPU time of the k emulator processes over the window, % of one core (of "
        f"{os.cpu_count()}): far below the machine's capacity means the emulated GPU, not the host, set the pace.",
        "",
        f"![throughput vs processes]({THROUGHPUT_PLOT})",
        "",
        f"![latency vs processes]({LATENCY_PLOT})",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="k = 1, 2, 4 with 2 s windows")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    parser.add_argument("--ks", nargs="+", type=int, help="process counts to measure")
    parser.add_argument("--window", type=float, help="seconds of measurement per k")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    if args.ks:
        setup = replace(setup, ks=tuple(args.ks))
    if args.window:
        setup = replace(setup, window_s=args.window)
    command = "python -m bench.procs_per_gpu" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    points, _, wall = run(setup)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(points, args.out)
    report = args.out / REPORT
    report.write_text(render(setup, points, wall, command))
    (args.out / "procs-per-gpu.json").write_text(json.dumps(
        {"setup": asdict(setup), "wall_s": wall,
         "points": [{"k": p.k, "rps": p.window.rps, "p50_s": p.window.latency(50), "p99_s": p.window.latency(99),
                     "completed": p.window.completed, "failed": p.window.failed, "cpu_pct": p.cpu_pct}
                    for p in points]}, indent=2) + "\n")
    sys.stdout.write(report.read_text())


if __name__ == "__main__":
    main()
