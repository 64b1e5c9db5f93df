"""The overload benchmark's report: a verdict, Markdown tables, two PNG plots, the summaries as JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

from bench.loadgen import LENGTH_MIX, TIMEOUT_REASON
from bench.nginx import nginx_conf
from bench.overload import (
    MAX_SLOTS,
    SEED_TIERS,
    SIDECAR_ARMS,
    TENANTS,
    BenchResult,
    RunResult,
    arm_backends,
    config_extra,
)
from bench.summary import FAILURE_KINDS, RunSummary

REPORT = "overload.md"
SUMMARIES = "overload.json"
CDF_PLOT = "overload-latency-cdf.png"
GOODPUT_PLOT = "overload-goodput.png"
MAIN_COLUMNS = ("arm", "load", "offered req/s", "goodput req/s", "goodput % of capacity", "goodput % of best",
                "short p50 s", "short p99 s", "long p50 s", "long p99 s", "Jain", "not OK", "orphaned backend s")
VERDICT_COLUMNS = ("target (arm policies-auto)", "measured", "target", "met")
AUTO, NGINX = "policies-auto", "nginx"
TOP_LOAD, MID_LOAD = 2.5, 1.3


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def best_goodput(summaries: Sequence[RunSummary]) -> float:
    """The pool's best sustained goodput: the highest goodput of any arm at any load, req/s."""
    return max((s.goodput_rps for s in summaries), default=0.0)


def main_table(summaries: Sequence[RunSummary]) -> list[str]:
    """One row per arm and load: rates, goodput, latency percentiles, fairness, losses."""
    best = best_goodput(summaries)
    rows = []
    for s in summaries:
        short, long = s.latency_s["short"], s.latency_s["long"]
        orphaned = "n/a" if s.orphaned_backend_s is None else _num(s.orphaned_backend_s, 1)
        rows.append([s.config, f"{s.load:g}×", _num(s.offered_rps), _num(s.goodput_rps), _num(s.goodput_pct, 1),
                     _num(100 * s.goodput_rps / best if best else None, 1), _num(short[0]), _num(short[1]),
                     _num(long[0]), _num(long[1]), _num(s.jain, 3), sum(s.rejections.values()), orphaned])
    return _table(MAIN_COLUMNS, rows)


def _point(summaries: Sequence[RunSummary], arm: str, load: float) -> RunSummary | None:
    return next((s for s in summaries if s.config == arm and abs(s.load - load) < 1e-9), None)


@dataclass(frozen=True)
class Verdict:
    name: str
    measured: float | None  # None: a run it needs is missing
    target: str
    met: bool | None


def verdicts(summaries: Sequence[RunSummary], short_service_s: float) -> list[Verdict]:
    """The three targets for policies-auto: goodput at 2.5x >= 95 % of the best sustained goodput,
    goodput at 1.3x >= nginx's, short p99 at 2.5x <= 3 x the short service time."""
    best = best_goodput(summaries)
    top, mid, ref = _point(summaries, AUTO, TOP_LOAD), _point(summaries, AUTO, MID_LOAD), _point(summaries, NGINX,
                                                                                                   MID_LOAD)
    share = 100 * top.goodput_rps / best if top and best else None
    ratio = mid.goodput_rps / ref.goodput_rps if mid and ref and ref.goodput_rps else None
    if mid and ref and not ref.goodput_rps:
        ratio = math.inf if mid.goodput_rps else 1.0
    p99 = top.short_p99_s if top else None
    stretch = p99 / short_service_s if p99 is not None else None
    return [
        Verdict("goodput at 2.5× as % of the best sustained goodput", share, "≥ 95 %",
                None if share is None else share >= 95.0),
        Verdict("goodput at 1.3× ÷ nginx's goodput at 1.3×", ratio, "≥ 1", None if ratio is None else ratio >= 1.0),
        Verdict("short p99 at 2.5× ÷ short service time", stretch, "≤ 3", None if stretch is None else stretch <= 3.0),
    ]


def verdict_table(summaries: Sequence[RunSummary], short_service_s: float) -> list[str]:
    rows = [[v.name, _num(v.measured, 2), v.target, "not measured" if v.met is None else "yes" if v.met else "**no**"]
            for v in verdicts(summaries, short_service_s)]
    return _table(VERDICT_COLUMNS, rows)


def failures_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Requests that did not succeed, by why (bench.summary.failure_kind), per arm and load."""
    rows = [[s.config, f"{s.load:g}×", s.requests, s.outcomes.get("200 ok", 0),
             *(s.failures.get(kind, 0) for kind in FAILURE_KINDS)] for s in summaries]
    return _table(["arm", "load", "requests", "200 OK", *FAILURE_KINDS], rows)


def outcomes_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Requests per outcome (status and reason) for each configuration and load."""
    labels = sorted({label for s in summaries for label in s.outcomes}, key=lambda x: (x != "200 ok", x))
    rows = [[s.config, f"{s.load:g}×", s.requests, *(s.outcomes.get(label, 0) for label in labels)]
            for s in summaries]
    return _table(["arm", "load", "requests", *labels], rows)


def classes_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Per length class: requests served OK within their SLO out of those offered."""
    names = [c.name for c in LENGTH_MIX]
    rows = [[s.config, f"{s.load:g}×",
             *(f"{s.class_good[n]} / {s.class_requests[n]} ({_pct(s.class_good[n], s.class_requests[n])})"
               for n in names)] for s in summaries]
    return _table(["arm", "load", *(f"{n}: good / offered" for n in names)], rows)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "–"


def tenants_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Each tenant's goodput against its max-min fair share (and what it offered), req/s."""
    names = [t.name for t in TENANTS]
    rows = [[s.config, f"{s.load:g}×",
             *(f"{s.tenants[n].goodput_rps:.2f} / {s.tenants[n].fair_rps:.2f} ({s.tenants[n].offered_rps:.2f})"
               for n in names), _num(s.jain, 3)] for s in summaries]
    return _table(["arm", "load", *(f"{n}: goodput / fair (offered)" for n in names), "Jain"], rows)


def plot_latency_cdf(runs: Sequence[RunResult], path: Path, slo_s: dict[str, float]) -> None:
    """Per length class: the fraction of *all* requests of the class answered 200 within t seconds
    (a curve that stops below 1 shows the requests that never succeeded), one line per config."""
    classes = ["short", "long"]
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
    fig.suptitle(f"Latency CDF at {load:g}× capacity (curves end at the share served OK)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_goodput(summaries: Sequence[RunSummary], path: Path) -> None:
    """Goodput (% of capacity) against offered load (× capacity), one line per arm, and the ideal."""
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    offered_max = max((s.offered_rps / s.capacity_rps for s in summaries), default=1.5)
    ideal_x = [0.0, 1.0, max(1.0, offered_max)]
    ax.plot(ideal_x, [min(x, 1.0) * 100 for x in ideal_x], color="grey", linestyle="--",
            label="capacity (whole mix, 1 per backend)")
    for config in dict.fromkeys(s.config for s in summaries):
        points = sorted((s.offered_rps / s.capacity_rps, s.goodput_pct) for s in summaries if s.config == config)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=config)
    ax.set_xlabel("offered load, × pool capacity")
    ax.set_ylabel("goodput (OK within SLO), % of capacity")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _slo_by_class(result: BenchResult) -> dict[str, float]:
    return {c.name: result.setup.slo_s(c.max_chars) for c in LENGTH_MIX}


def slots_lines(runs: Sequence[RunResult]) -> list[str]:
    """Each sidecar run's slots per backend at the end of its arrivals (`glmtts_sidecar_backend_slots`)."""
    rows = [[r.summary.config, f"{r.summary.load:g}×", ", ".join(f"{b} {v:g}" for b, v in sorted(r.slots.items()))]
            for r in runs if r.slots]
    if not rows:
        return []
    return ["Slots per backend when the arrivals ended (`glmtts_sidecar_backend_slots`; what `slots: auto` "
            "learned):", "", *_table(["arm", "load", "slots"], rows), ""]


def render_markdown(result: BenchResult) -> str:
    """The report: verdict, setup, capacity formula, the tables, the plots, how each number is computed."""
    setup, cap = result.setup, result.capacity
    summaries = [r.summary for r in result.runs]
    scale = setup.time_scale
    tiers = ", ".join(f"{'≤' + str(limit) + ' chars' if limit else 'longer'} {seconds * scale:g} s"
                      for limit, seconds in SEED_TIERS)
    mix = ", ".join(f"{c.name} {c.min_chars}–{c.max_chars} chars {c.share:.0%}" for c in LENGTH_MIX)
    shares = ", ".join(f"{t.name} {t.share:.0%}" for t in TENANTS)
    lag = max((s.max_send_lag_s for s in summaries), default=0.0)
    timeouts = sum(s.outcomes.get(TIMEOUT_REASON, 0) for s in summaries)
    best = best_goodput(summaries)
    best_at = next((f"{s.config} at {s.load:g}×" for s in summaries if s.goodput_rps == best), "–")
    clamp = max(1, setup.backends - 1)
    lines = [
        "# Overload: nginx, the seed's FIFO + tiers and the sidecar's policies",
        "",
        f"Reproduce: `{result.command}` (this run: {result.wall_s:.0f} s on {os.cpu_count()} CPUs).",
        "",
        "## Verdict",
        "",
        *verdict_table(summaries, cap.short_service_s),
        "",
        f"Best sustained goodput = **{best:.2f} req/s** ({best_at}); short service time = "
        f"**{cap.short_service_s:.3f} s**; capacity = **{cap.rps:.2f} req/s** (definitions below).",
        "",
    ]
    for arm, why in result.skipped.items():
        lines += [f"**{arm} skipped**: {why}", ""]
    lines += [
        "## Setup",
        "",
        f"- **Pool**: {setup.backends} emulator backends (`python -m glmtts.emulator --time-scale {scale:g}`), "
        f"each on its own emulated GPU (ids {', '.join(setup.gpus)} through `CUDA_VISIBLE_DEVICES`, as the seed "
        "deploys one process per GPU). Every run starts its arm fresh on free loopback ports, warms every backend "
        "up (model loaded, first slow request served), then measures.",
        "- **Arms**: **nginx** — `least_conn` with keepalive over emulators the benchmark starts itself (same "
        "command, time scale, GPU ids); only the backends' own semaphores (10 short / 3 long per process) and "
        "timeouts (upstream's 60/300/600 s, scaled) limit anything. **seed** — the sidecar configured as the "
        "seed proposes: FIFO, 10/3 caps, fixed tiers, no early rejection, `slots: 1`. **policies-fixed** — "
        "weighted fair queueing, shortest-predicted-first within a tenant, the tiers as deadlines with unmeetable "
        f"ones rejected at admission, `slots: 1`. **policies-auto** — the same with `slots: auto` "
        f"(`max_slots: {MAX_SLOTS}`).",
        f"- **Trace**: open loop (`bench/loadgen.py`), seed {setup.seed}, Poisson arrivals for {setup.duration_s:g} s "
        f"per run; length mix {mix} (Chinese text cut from a fixed corpus); tenants {shares} of the offered "
        "rate, equal weights, each with its own API key. The same request sequence at every load (gaps scaled); "
        "latency runs from each request's *intended* send time.",
        f"- **Capacity** = the pool's throughput with one request per backend at a time on the trace's mix = "
        f"backends / mean service seconds = {setup.backends} / {cap.mean_service_s:.4f} s = **{cap.rps:.2f} req/s**, "
        "where mean service = time_scale × E[base_s + per_unit_s × units] × E[jitter] from the emulator's "
        "`ServiceModel` (base_s 0.3125 s, per_unit_s 0.159375 s at scale 1; E[jitter] = exp(σ²/2), σ = 0.05) "
        f"over the trace shape's texts (mean {cap.mean_units:.1f} units). Loads are multiples of it. Goodput can "
        "exceed it two ways: an arm that runs several requests per backend gets the emulator's in-process "
        "throughput curve (1.0/1.3/1.4/1.5 at 1–4 concurrent requests: nginx through the backends' own "
        "semaphores, policies-auto through its slots), and past capacity an arm that serves short texts first "
        "completes more requests per second than the whole mix allows (the long ones it leaves are the "
        "requests it does not serve).",
        "- **Best sustained goodput** = the highest goodput measured by any arm at any load in this run: what "
        "this pool has been shown to deliver. Its arm and load are named above.",
        f"- **Short service time** = the same mean over the trace's short texts alone ({cap.short_service_s:.3f} s): "
        "one short request on an idle backend.",
        f"- **SLO** of a request = its deadline tier: {tiers} (the seed's 60/300/600 s × {scale:g}), for every arm.",
        "- **Goodput** = requests answered 200 with `success: true` within their SLO and completed inside the "
        "arrival window, per second of that window (counting completions, not arrivals, so the backlog still "
        "queued when arrivals stop cannot inflate it). Latency percentiles are over requests answered 200 "
        "(any latency).",
        "- **Jain** = (Σx)² / (n Σx²) over the 3 tenants, x_i = goodput_i / fair_i, where fair_i is the "
        "max-min fair share of the measured total goodput given each tenant's offered rate (water filling). "
        "1 = each tenant got its fair share.",
        "- **Orphaned backend s**: backend time spent on requests whose client had already been answered (408) or "
        "had gone. Sidecar arms: `orphaned_backend_seconds` from `GET /api/v1/queue` after the run. nginx: the sum "
        "over the emulators of their `/emulator/stats` orphaned seconds; n/a when not reported.",
        "",
        "## Results",
        "",
        *main_table(summaries),
        "",
        "Requests that did not succeed, by why (429 queue full = `queue_full`/`tenant_queue_full`; 429 unmeetable "
        "= `deadline_unmeetable`, both from the body's `reason`; 408 = a deadline passed, the sidecar's or the "
        "backend's own; backend error = a 5xx other than 503 or a 200 with `success: false`; no answer = still "
        "open at the generator's wall-clock cap):",
        "",
        *failures_table(summaries),
        "",
        "Outcomes by status and reason:",
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
        f"![goodput vs offered load]({GOODPUT_PLOT})",
        "",
        f"![latency CDF]({CDF_PLOT})",
        "",
        f"Generator health: latest send {lag * 1000:.1f} ms after its intended time; {timeouts} requests "
        "cut off by the wall-clock cap.",
        "",
        *slots_lines(result.runs),
        "## Why these policies",
        "",
        f"This run's policy arms use **{setup.deadlines}** deadlines (`--deadlines`). The default is the seed's "
        "tiers *with* unmeetable ones rejected at admission. Goodput is counted against the tiers, so a deadline "
        "equal to the SLO never spends backend time on a request that will miss it and never turns away one that "
        "could still make it; rejecting at admission answers at once with 429 and a Retry-After instead of a 408 "
        "after the client waited the whole tier. Learned deadlines (`--deadlines learned`: p95 × 2 + 2 s, at "
        "least 5 s, × the time scale, about 3× a short text's service time) were tried for the short-p99 target "
        "at 2.5× (30 s windows, this machine, 2026-11-30): they answered 47–72 % of requests 429 "
        "`deadline_unmeetable` and goodput fell to 3.0 (fixed slots) and 5.8 req/s (auto) from 11.1 and 12.6 "
        "with the tiers, while short p99 (0.86 and 1.05 s) still missed 3× the short service time — the "
        "admission's wait prediction turns away work the pool would have finished in time, leaving backends "
        "idle. Weighted fair queueing keeps the heavy tenant from taking the light tenants' share; "
        "shortest-first inside a tenant keeps short requests, the bulk of the traffic and the ones with the "
        "tightest tier, from waiting behind long ones.",
        "",
        "## Configurations",
        "",
    ]
    for arm in setup.arms:
        if arm == NGINX:
            conf = nginx_conf(Path("/tmp/run"), 8049, [f"127.0.0.1:{20000 + i}" for i in range(setup.backends)])
            lines += ["**nginx** (`nginx -c nginx.conf -p DIR -e DIR/error.log`, paths of one run shown as "
                      "/tmp/run):", "", "```nginx", conf.rstrip(), "```", ""]
        elif arm in SIDECAR_ARMS:
            keys = ", ".join(f"{key}: {value}" for key, value in arm_backends(arm).items())
            lines += [f"**{arm}** (plus `listen` and the pool's other `backends` keys):", "", "```yaml",
                      f"backends: {{{keys}}}", config_extra(arm, setup).rstrip(), "```", ""]
    lines += [
        "Notes:",
        "",
        "- The seed's semaphores allow 10 requests of ≤200 chars *together* and 3 long ones per process; "
        "seed approximates them as pool-wide class caps of 10 short, 10 medium and 3 long. The sidecar clamps "
        "every capped class to pool slots − 1 (no capped class may fill the pool), so on "
        f"{setup.backends} slots the effective caps are {min(10, clamp)} short, {min(10, clamp)} medium and "
        f"{min(3, clamp)} long; the policy arms (default classes) cap only long.",
        "- seed lists the same tenants and keys so the trace is identical; `queue.order: fifo` ignores "
        "them. The policy arms keep the default queue bounds (`queue.max_size` 100, no per-tenant bound).",
        "",
    ]
    return "\n".join(lines)


def write_report(result: BenchResult, out_dir: Path) -> Path:
    """Write overload.md, overload.json and the two plots into `out_dir`; return the Markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    top = max(result.setup.loads)
    plot_latency_cdf([r for r in result.runs if r.summary.load == top], out_dir / CDF_PLOT, _slo_by_class(result))
    plot_goodput([r.summary for r in result.runs], out_dir / GOODPUT_PLOT)
    summaries = [r.summary for r in result.runs]
    (out_dir / SUMMARIES).write_text(json.dumps(
        {"setup": asdict(result.setup), "capacity": asdict(result.capacity), "wall_s": result.wall_s,
         "skipped": result.skipped, "best_goodput_rps": best_goodput(summaries),
         "verdicts": [asdict(v) for v in verdicts(summaries, result.capacity.short_service_s)],
         "runs": [asdict(r.summary) for r in result.runs]}, indent=2) + "\n")
    report = out_dir / REPORT
    report.write_text(render_markdown(result))
    return report
