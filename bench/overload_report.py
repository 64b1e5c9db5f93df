"""The overload benchmark's report: Markdown tables, two PNG plots, the summaries as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

from bench.loadgen import LENGTH_MIX, TIMEOUT_REASON
from bench.overload import SEED_TIERS, TENANTS, BenchResult, RunResult, config_extra
from bench.summary import RunSummary

REPORT = "overload.md"
SUMMARIES = "overload.json"
CDF_PLOT = "overload-latency-cdf.png"
GOODPUT_PLOT = "overload-goodput.png"
MAIN_COLUMNS = ("config", "load", "offered req/s", "goodput req/s", "goodput % of capacity", "short p50 s",
                "short p99 s", "long p50 s", "long p99 s", "Jain", "rejected", "orphaned backend s")


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def main_table(summaries: Sequence[RunSummary]) -> list[str]:
    """One row per configuration and load: rates, goodput, latency percentiles, fairness, losses."""
    rows = []
    for s in summaries:
        short, long = s.latency_s["short"], s.latency_s["long"]
        orphaned = "n/a" if s.orphaned_backend_s is None else _num(s.orphaned_backend_s, 1)
        rows.append([s.config, f"{s.load:g}×", _num(s.offered_rps), _num(s.goodput_rps), _num(s.goodput_pct, 1),
                     _num(short[0]), _num(short[1]), _num(long[0]), _num(long[1]), _num(s.jain, 3),
                     sum(s.rejections.values()), orphaned])
    return _table(MAIN_COLUMNS, rows)


def outcomes_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Requests per outcome (status and reason) for each configuration and load."""
    labels = sorted({label for s in summaries for label in s.outcomes}, key=lambda x: (x != "200 ok", x))
    rows = [[s.config, f"{s.load:g}×", s.requests, *(s.outcomes.get(label, 0) for label in labels)]
            for s in summaries]
    return _table(["config", "load", "requests", *labels], rows)


def classes_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Per length class: requests served OK within their SLO out of those offered."""
    names = [c.name for c in LENGTH_MIX]
    rows = [[s.config, f"{s.load:g}×",
             *(f"{s.class_good[n]} / {s.class_requests[n]} ({_pct(s.class_good[n], s.class_requests[n])})"
               for n in names)] for s in summaries]
    return _table(["config", "load", *(f"{n}: good / offered" for n in names)], rows)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "–"


def tenants_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Each tenant's goodput against its max-min fair share (and what it offered), req/s."""
    names = [t.name for t in TENANTS]
    rows = [[s.config, f"{s.load:g}×",
             *(f"{s.tenants[n].goodput_rps:.2f} / {s.tenants[n].fair_rps:.2f} ({s.tenants[n].offered_rps:.2f})"
               for n in names), _num(s.jain, 3)] for s in summaries]
    return _table(["config", "load", *(f"{n}: goodput / fair (offered)" for n in names), "Jain"], rows)


def plot_latency_cdf(runs: Sequence[RunResult], path: Path, slo_s: dict[str, float]) -> None:
    """Per length class: the fraction of *all* requests of the class answered 200 within t seconds
    (a curve that stops below 1 shows the requests that never succeeded), one line per config."""
    classes = [c.name for c in LENGTH_MIX]
    fig = Figure(figsize=(4.2 * len(classes), 3.6))
    axes = fig.subplots(1, len(classes), sharey=True, squeeze=False)[0]
    for ax, cls in zip(axes, classes, strict=True):
        for run in runs:
            of_class = [r for r in run.records if r.cls == cls]
            served = sorted(r.latency_s for r in of_class if r.ok)
            if of_class and served:
                ys = [(i + 1) / len(of_class) for i in range(len(served))]
                ax.step([0.0, *served], [0.0, *ys], where="post", label=run.summary.config)
        ax.axvline(slo_s[cls], color="grey", linestyle="--", linewidth=1, label="SLO (deadline)")
        ax.set_title(f"{cls} texts")
        ax.set_xlabel("latency from intended send, s")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests served OK")
    axes[0].legend(loc="lower right", fontsize=8)
    load = runs[0].summary.load if runs else 0
    fig.suptitle(f"Latency CDF at {load:g}× capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_goodput(summaries: Sequence[RunSummary], path: Path) -> None:
    """Goodput (% of capacity) against offered load (× capacity), one line per config, and the ideal."""
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    offered_max = max((s.offered_rps / s.capacity_rps for s in summaries), default=1.5)
    ideal_x = [0.0, 1.0, max(1.0, offered_max)]
    ax.plot(ideal_x, [min(x, 1.0) * 100 for x in ideal_x], color="grey", linestyle="--", label="ideal")
    for config in dict.fromkeys(s.config for s in summaries):
        points = sorted((s.offered_rps / s.capacity_rps, s.goodput_pct) for s in summaries if s.config == config)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=config)
    ax.set_xlabel("offered load, × pool capacity")
    ax.set_ylabel("goodput (OK within SLO), % of capacity")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _slo_by_class(result: BenchResult) -> dict[str, float]:
    return {c.name: result.setup.slo_s(c.max_chars) for c in LENGTH_MIX}


def render_markdown(result: BenchResult) -> str:
    """The report: setup, capacity formula, the three tables, the plots, how each number is computed."""
    setup, cap = result.setup, result.capacity
    summaries = [r.summary for r in result.runs]
    scale = setup.time_scale
    tiers = ", ".join(f"{'≤' + str(limit) + ' chars' if limit else 'longer'} {seconds * scale:g} s"
                      for limit, seconds in SEED_TIERS)
    mix = ", ".join(f"{c.name} {c.min_chars}–{c.max_chars} chars {c.share:.0%}" for c in LENGTH_MIX)
    shares = ", ".join(f"{t.name} {t.share:.0%}" for t in TENANTS)
    lag = max((s.max_send_lag_s for s in summaries), default=0.0)
    timeouts = sum(s.outcomes.get(TIMEOUT_REASON, 0) for s in summaries)
    slots = setup.backends * setup.slots
    clamp = max(1, slots - 1)
    lines = [
        "# Overload: the seed's FIFO + tiers against the sidecar's policies",
        "",
        f"Reproduce: `{result.command}` (this run: {result.wall_s:.0f} s on {os.cpu_count()} CPUs).",
        "",
        "## Setup",
        "",
        f"- **Pool**: {setup.backends} emulator backends (`python -m glmtts.emulator --time-scale {scale:g}`), "
        f"{setup.slots} slot each, behind one sidecar; sidecar and backends started fresh for every run on free "
        "loopback ports, warmed up (every backend has loaded its model and served a request), then measured.",
        f"- **Trace**: open loop (`bench/loadgen.py`), seed {setup.seed}, Poisson arrivals for {setup.duration_s:g} s "
        f"per run; length mix {mix} (Chinese text cut from a fixed corpus); tenants {shares} of the offered "
        "rate, equal weights, each with its own API key. The same request sequence at every load (gaps scaled); "
        "latency runs from each request's *intended* send time.",
        f"- **Capacity** = backends × throughput(slots) / mean service seconds = {setup.backends} × "
        f"{1 if setup.slots == 1 else 'throughput(' + str(setup.slots) + ')'} / {cap.mean_service_s:.4f} s = "
        f"**{cap.rps:.2f} req/s**, where mean service = time_scale × E[base_s + per_unit_s × units] × E[jitter] "
        f"from the emulator's `ServiceModel` (base_s 0.3125 s, per_unit_s 0.159375 s at scale 1; "
        f"E[jitter] = exp(σ²/2), σ = 0.05) over the trace shape's texts (mean {cap.mean_units:.1f} units).",
        f"- **SLO** of a request = its deadline tier: {tiers} (the seed's 60/300/600 s × {scale:g}).",
        "- **Goodput** = requests answered 200 with `success: true` within their SLO and completed inside the "
        "arrival window, per second of that window (counting completions, not arrivals, so the backlog still "
        "queued when arrivals stop cannot inflate it). Latency percentiles are over requests answered 200 "
        "(any latency).",
        "- **Jain** = (Σx)² / (n Σx²) over the 3 tenants, x_i = goodput_i / fair_i, where fair_i is the "
        "max-min fair share of the measured total goodput given each tenant's offered rate (water filling: "
        "a tenant asking for less than an equal split gets what it asks, the rest is split equally). "
        "1 = each tenant got its fair share.",
        "- **Orphaned backend s**: `orphaned_backend_seconds` from the sidecar's `GET /api/v1/queue` after the "
        "run (backend time spent on requests whose client had already been answered 408); n/a when the sidecar "
        "does not report it.",
        "",
        "## Results",
        "",
        *main_table(summaries),
        "",
        "Outcomes (requests; `timeout` = no answer before the generator's wall-clock cap):",
        "",
        *outcomes_table(summaries),
        "",
        "Per length class (requests served OK within their SLO / offered):",
        "",
        *classes_table(summaries),
        "",
        "Per tenant (req/s):",
        "",
        *tenants_table(summaries),
        "",
        f"![latency CDF]({CDF_PLOT})",
        "",
        f"![goodput vs offered load]({GOODPUT_PLOT})",
        "",
        f"Generator health: latest send {lag * 1000:.1f} ms after its intended time; {timeouts} requests "
        "cut off by the wall-clock cap.",
        "",
        "## Configurations",
        "",
    ]
    for config in setup.configs:
        lines += [f"**{config}** (plus `listen` and `backends`):", "", "```yaml", config_extra(config, setup).rstrip(),
                  "```", ""]
    lines += [
        "Notes:",
        "",
        "- The seed's semaphores allow 10 requests of ≤200 chars *together* and 3 long ones per process; "
        "fifo-tiers approximates them as pool-wide class caps of 10 short, 10 medium (so up to 20 ≤200-char "
        "requests) and 3 long. The sidecar clamps every capped class to pool slots − 1 (`LengthClasses.cap` in "
        f"`scheduler/core.py`: no capped class may fill the pool), so on {slots} slots the effective caps are "
        f"{min(10, clamp)} short, {min(10, clamp)} medium and {min(3, clamp)} long in fifo-tiers; policies "
        f"(default classes) caps only long, at {min(3, clamp)}.",
        "- fifo-tiers lists the same tenants and keys so the trace is identical; `queue.order: fifo` ignores "
        "them. policies keeps the default classes and queue bounds (`queue.max_size` 100, no per-tenant bound).",
        "",
    ]
    return "\n".join(lines)


def write_report(result: BenchResult, out_dir: Path) -> Path:
    """Write overload.md, overload.json and the two plots into `out_dir`; return the Markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    top = max(result.setup.loads)
    plot_latency_cdf([r for r in result.runs if r.summary.load == top], out_dir / CDF_PLOT, _slo_by_class(result))
    plot_goodput([r.summary for r in result.runs], out_dir / GOODPUT_PLOT)
    (out_dir / SUMMARIES).write_text(json.dumps(
        {"setup": asdict(result.setup), "capacity": asdict(result.capacity), "wall_s": result.wall_s,
         "runs": [asdict(r.summary) for r in result.runs]}, indent=2) + "\n")
    report = out_dir / REPORT
    report.write_text(render_markdown(result))
    return report

