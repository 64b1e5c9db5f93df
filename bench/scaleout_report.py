"""The scale-out benchmark's arms, results, verdicts and report: Markdown tables, PNG plots, JSON.

Pure up to the writing of files: every figure the report shows is computed here from the run
summaries bench.scaleout measured. The verdict is the issue's target: at each trace and load, two
sidecars of two backends each behind the outer nginx serve at least `GOODPUT_TARGET` of the work
goodput one sidecar of four backends serves, both measured in the same run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

from bench.loadgen import TIMEOUT_REASON, Record
from bench.markdown import met as _met
from bench.markdown import num as _num
from bench.markdown import table as _table
from bench.overload_report import failures_table, main_table, outcomes_table, plot_latency_cdf, tenants_table
from bench.overload_spec import HIGH, BenchResult, CellResult, RunResult, arrival_rate, deadline_tiers
from bench.summary import CLASSES, length_class

REPORT = "scaleout.md"
DATA = "scaleout.json"
RATIO_PLOT = "scaleout-goodput-ratio.png"
CLASS_PLOT = "scaleout-classes.png"
CDF_PLOT = "scaleout-latency-cdf.png"
GE = "≥"
BACKENDS = 4  # the pool both arms share out
SIDECARS = 2  # the scale-out arm's sidecars, BACKENDS // SIDECARS backends each
SINGLE = f"1x{BACKENDS}"  # one sidecar over every backend
SPLIT = f"{SIDECARS}x{BACKENDS // SIDECARS}"  # sidecars behind the outer nginx
ARMS = (SINGLE, SPLIT)
GOODPUT_TARGET = 0.9  # goodput SPLIT / SINGLE
VERDICT_LOADS = (1.3, 2.5)


def describe(arm: str) -> str:
    """What arm `arm` runs, in one line (the report's arm table)."""
    if arm == SINGLE:
        return (f"one sidecar with bench/overload's `{HIGH}` config (operator config, cost priors 2× the true "
                f"model) over {BACKENDS} emulator backends on GPUs 0–{BACKENDS - 1}; the client talks to it directly")
    if arm == SPLIT:
        per = BACKENDS // SIDECARS
        return (f"{SIDECARS} sidecars, each with the same `{HIGH}` config over {per} backends (GPUs "
                + ", ".join(f"{s * per}–{s * per + per - 1}" for s in range(SIDECARS))
                + ", the same four emulators), behind the outer nginx (`least_conn`, no TLS, no binding rate limit); "
                "the client talks to nginx")
    raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")


PROXY_STATUSES = frozenset({429, 502, 503, 504})  # what the outer nginx answers itself (limit_req, no sidecar)


def proxy_error(record: Record) -> bool:
    """An answer nginx made itself: a status it makes, with no sidecar error reason in the body and
    no backend named (every sidecar refusal carries a `reason`, every forwarded answer an X-Backend)."""
    return record.status in PROXY_STATUSES and record.reason is None and record.backend is None


@dataclass
class ScaleoutResult:
    """Both arms at every trace and load, measured in one run, and what they ran with."""

    bench: BenchResult
    machine: dict[str, Any]
    proxy: str  # which outer nginx configuration the split arm ran behind
    files: dict[str, str] = field(default_factory=dict)  # title -> whole file, of each arm's first run
    sent: dict[str, int] = field(default_factory=dict)  # run label -> arrivals offered (pre-roll included)
    recorded: dict[str, int] = field(default_factory=dict)  # run label -> records the client kept


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """Goodput SPLIT / SINGLE at one trace and load: met when ≥ GOODPUT_TARGET; None when a run is
    missing or SINGLE served nothing (`note` says which)."""

    trace: str
    load: float
    single: float | None
    split: float | None
    ratio: float | None
    met: bool | None
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.trace} at {self.load:g}×: goodput {SPLIT} / {SINGLE}"


def find_run(cell: CellResult, arm: str, load: float) -> RunResult | None:
    return next((r for r in cell.runs if r.summary.config == arm and r.summary.load == load), None)


def verdict(cell: CellResult, load: float) -> Verdict:
    single, split = find_run(cell, SINGLE, load), find_run(cell, SPLIT, load)
    absent = [f"{arm} {load:g}×" for arm, run in ((SINGLE, single), (SPLIT, split)) if run is None]
    one = single.summary.goodput if single else None
    two = split.summary.goodput if split else None
    if absent:
        return Verdict(trace=cell.cell.trace, load=load, single=one, split=two, ratio=None, met=None,
                       note="no run: " + ", ".join(absent))
    if not one:
        return Verdict(trace=cell.cell.trace, load=load, single=one, split=two, ratio=None, met=None,
                       note=f"{SINGLE} has no goodput")
    ratio = (two or 0.0) / one
    return Verdict(trace=cell.cell.trace, load=load, single=one, split=two, ratio=ratio, met=ratio >= GOODPUT_TARGET)


def verdicts(result: BenchResult) -> list[Verdict]:
    return [verdict(cell, load) for cell in result.cells for load in VERDICT_LOADS]


# --- Markdown ---------------------------------------------------------------------------------


VERDICT_COLUMNS = ("target", f"goodput {SINGLE}", f"goodput {SPLIT}", "ratio", "required", "met", "note")
CLASS_COLUMNS = ("trace", "load", "class", f"goodput {SINGLE}", f"goodput {SPLIT}", f"in SLO {SINGLE} %",
                 f"in SLO {SPLIT} %", f"p99 {SINGLE} s", f"p99 {SPLIT} s", "p99 ratio")
ACCOUNT_COLUMNS = ("trace", "arm", "load", "sent (whole trace)", "recorded", "measured", "200 OK", "200 failed",
                   "429", "503", "408", "other 4xx", "5xx", "nginx's own", "no answer")


def verdict_table(found: Sequence[Verdict]) -> list[str]:
    return _table(VERDICT_COLUMNS, [[v.name, _num(v.single), _num(v.split), _num(v.ratio, 2),
                                     f"{GE} {GOODPUT_TARGET:g}", _met(v.met), v.note] for v in found])


def class_rows(cell: CellResult) -> list[list[object]]:
    """Per load and length class offered: both arms' goodput, SLO attainment and p99 side by side."""
    rows: list[list[object]] = []
    for load in sorted({r.summary.load for r in cell.runs}):
        single, split = find_run(cell, SINGLE, load), find_run(cell, SPLIT, load)
        for cls in CLASSES:
            if not any(r and r.summary.class_requests[cls] for r in (single, split)):
                continue
            a = single.summary if single else None
            b = split.summary if split else None
            p99a = a.latency_s[cls][1] if a else None
            p99b = b.latency_s[cls][1] if b else None
            rows.append([cell.cell.trace, f"{load:g}×", cls, _num(a.class_goodput[cls] if a else None),
                         _num(b.class_goodput[cls] if b else None), _num(a.in_slo_pct[cls] if a else None, 1),
                         _num(b.in_slo_pct[cls] if b else None, 1), _num(p99a), _num(p99b),
                         _num(p99b / p99a if p99a and p99b is not None else None, 2)])
    return rows


def account(records: Sequence[Record]) -> dict[str, int]:
    """Every measured request by what became of it; the counts add up to len(records)."""
    counts = dict.fromkeys(ACCOUNT_COLUMNS[6:], 0)
    for r in records:
        if r.status is None:
            kind = "no answer"
        elif proxy_error(r):
            kind = "nginx's own"
        elif r.status == 200:
            kind = "200 OK" if r.ok else "200 failed"
        elif r.status in (429, 503, 408):
            kind = str(r.status)
        else:
            kind = "other 4xx" if r.status < 500 else "5xx"
        counts[kind] += 1
    return counts


def label(trace: str, arm: str, load: float) -> str:
    """The key of one run in ScaleoutResult.sent / .recorded."""
    return f"{trace} {arm} {load:g}x"


def account_table(result: ScaleoutResult) -> list[str]:
    rows = []
    for cell in result.bench.cells:
        for run in cell.runs:
            s = run.summary
            key = label(cell.cell.trace, s.config, s.load)
            rows.append([cell.cell.trace, s.config, f"{s.load:g}×", result.sent.get(key, "–"),
                         result.recorded.get(key, "–"), len(run.records), *account(run.records).values()])
    return _table(ACCOUNT_COLUMNS, rows)


def setup_lines(result: ScaleoutResult) -> list[str]:
    setup = result.bench.setup
    tiers = "; ".join(f"{'≤' + str(t['max_chars']) if t['max_chars'] else 'longer'}: {t['timeout_s']:.4g} s"
                      + (f" + {t['per_char_s']:.4g} s × chars" if t.get("per_char_s") else "")
                      for t in deadline_tiers(setup.slo, setup.time_scale))
    rates = "; ".join(f"{c.cell.trace}: " + ", ".join(
        f"{load:g}× = {arrival_rate(load, BACKENDS, c.mean_work_s):.2f} req/s" for load in c.cell.loads)
        for c in result.bench.cells)
    return [
        f"- **Pool**: {BACKENDS} emulator backends (`python -m glmtts.emulator --time-scale {setup.time_scale:g} "
        f"--jitter {setup.jitter:g}`), each on its own emulated GPU, jitter seed = GPU id, upstream's own "
        "semaphores and timeouts in every process. Both arms run the same four emulators; only the "
        "topology in front of them differs.",
        f"- **Trace**: bench/overload's (`bench/loadgen.py`, open loop, seed {setup.seed}, three tenants 60/20/20 %), "
        f"{setup.duration_s:g} s of arrivals measured after {setup.preroll_s:g} s of the same trace not counted; "
        f"load L offers L × the {BACKENDS} backends' capacity: {rates}.",
        f"- **SLO** = each sidecar's deadline (`{setup.slo}`): {tiers}.",
        "- **Goodput** = work (solo-service seconds by the emulator's model mean) of requests answered 200 with "
        f"`success: true` within their SLO and inside the window, per backend-second of {BACKENDS} backends; "
        "overall and per class, as bench/overload counts it. p99 = over 200 answers, from the request's intended "
        "send time to its last byte.",
        f"- **Outer nginx**: {result.proxy}.",
        "- **Every request counts**: the client keeps one record per arrival (the run fails if one is missing); "
        "an answer nginx made itself (429, 502, 503 or 504 with no sidecar reason and no backend named: no "
        "sidecar reachable, its `error_page`s) is a failure like any other and has its own column below, "
        f"and no answer before the client's cap (window + largest SLO) is `{TIMEOUT_REASON}`.",
        "- Each arm starts fresh at every load, warms every backend up (the split arm: each sidecar directly, "
        "then through nginx), replays the trace, lets orphaned work settle and stops every process by pid.",
    ]


def config_lines(result: ScaleoutResult) -> list[str]:
    lines: list[str] = []
    for title, body in result.files.items():
        lang = "nginx" if title.endswith("nginx.conf") else "yaml"
        lines += [f"<details><summary>{title}</summary>", "", f"```{lang}", body.rstrip(), "```", "", "</details>", ""]
    return lines


def render_markdown(result: ScaleoutResult, found: Sequence[Verdict]) -> str:
    bench = result.bench
    costs = [r.wall_s for c in bench.cells for r in c.runs]
    count = {name: sum(1 for v in found if v.met is value)
             for name, value in (("met", True), ("not met", False), ("missing", None))}
    machine = ", ".join(f"{k} {v}" for k, v in result.machine.items())
    lines = [f"# Scale-out: {SIDECARS} sidecars × {BACKENDS // SIDECARS} backends behind nginx vs 1 sidecar × "
             f"{BACKENDS} backends", "", f"Reproduce: `{bench.command}`", "",
             f"This run: {len(costs)} runs in {bench.wall_s / 60:.1f} min on {machine}; one run took "
             f"{statistics.mean(costs) if costs else 0:.0f} s on average.", "", *setup_lines(result), "",
             "## Verdict", "", f"{count['met']} met, {count['not met']} not met, {count['missing']} missing "
             f"(target: goodput {SPLIT} {GE} {GOODPUT_TARGET:g} × goodput {SINGLE}, same trace and load, same run).",
             "", *verdict_table(found), "",
             "## Arms", "", *_table(["arm", "what runs"], [[a, describe(a)] for a in ARMS]), "",
             "## Per class", "", "Goodput in work per backend-second; p99 in seconds over 200 answers; "
             f"p99 ratio = {SPLIT} / {SINGLE}.", "",
             *_table(CLASS_COLUMNS, [row for cell in bench.cells for row in class_rows(cell)]), "",
             "## Every request", "", "What became of every request: `sent` = arrivals of the whole trace, "
             "`recorded` = records the client kept (pre-roll included), the rest = the measured window by outcome "
             "(they add up to `measured`).", "", *account_table(result), "", "## Results", ""]
    for cell in bench.cells:
        summaries = [r.summary for r in cell.runs]
        lines += [f"### {cell.cell.key}", "", f"Mean work per request {cell.mean_work_s:.4f} s.", ""]
        lines += [f"**{arm} skipped**: {why}" for arm, why in cell.skipped.items()]
        lines += ["Goodput and offered in work per backend-second; latency in seconds:", "", *main_table(cell.runs),
                  "", "Requests that did not succeed, by why:", "", *failures_table(summaries), "",
                  "Outcomes by status and reason:", "", *outcomes_table(summaries), "",
                  "Per tenant (work-seconds per second; fair queueing is each sidecar's own):", "",
                  *tenants_table(summaries), ""]
    lines += ["## Plots", "", f"![goodput ratio]({RATIO_PLOT})", "", f"![goodput and p99 per class]({CLASS_PLOT})",
              "", f"![latency CDF at each trace's top load]({CDF_PLOT})", "", "## Configurations", "",
              "Every file of each arm's first run (later runs differ only in ports and paths). The benchmark adds "
              "`tasks.state_dir` in the run's temporary directory and an admin token to read the counters.", "",
              *config_lines(result)]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------


def plot_ratio(found: Sequence[Verdict], path: Path) -> None:
    """Goodput SPLIT / SINGLE per trace and load, against the target."""
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    ax.bar(range(len(found)), [v.ratio or 0.0 for v in found], color="tab:blue")
    ax.axhline(GOODPUT_TARGET, color="tab:red", linestyle=":", linewidth=1, label=f"target {GOODPUT_TARGET:g}")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(found)), [f"{v.trace} {v.load:g}×" for v in found], fontsize=8)
    ax.set_ylabel(f"goodput {SPLIT} / {SINGLE}")
    ax.set_title(f"Work goodput of {SIDECARS} sidecars behind nginx relative to one", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_classes(result: BenchResult, path: Path) -> None:
    """Per trace, load and class: both arms' goodput (top) and p99 (bottom), side by side."""
    groups = [(cell, load, cls) for cell in result.cells for load in sorted({r.summary.load for r in cell.runs})
              for cls in CLASSES if any(r.summary.class_requests[cls] for r in cell.runs)]
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) + 2), 6.5))
    top, bottom = fig.subplots(2, 1)
    width = 0.4
    for i, arm in enumerate(ARMS):
        runs = [find_run(cell, arm, load) for cell, load, _ in groups]
        xs = [g + (i - 0.5) * width for g in range(len(groups))]
        top.bar(xs, [r.summary.class_goodput[cls] if r else 0.0 for r, (_, _, cls) in zip(runs, groups, strict=True)],
                width, label=arm)
        bottom.bar(xs, [(r.summary.latency_s[cls][1] or 0.0) if r else 0.0
                        for r, (_, _, cls) in zip(runs, groups, strict=True)], width, label=arm)
    names = [f"{cell.cell.trace} {load:g}×\n{cls}" for cell, load, cls in groups]
    for ax, ylabel in ((top, "goodput, work per backend-second"), (bottom, "p99 of 200 answers, s")):
        ax.set_xticks(range(len(groups)), names, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    top.set_title("Per length class", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --- JSON and files ---------------------------------------------------------------------------


def _run_json(trace: str, run: RunResult, result: ScaleoutResult) -> dict[str, Any]:
    s = run.summary
    key = label(trace, s.config, s.load)
    return {"arm": s.config, "load": s.load, "wall_s": run.wall_s, "slots": run.slots, "pids": run.pids,
            "sent": result.sent.get(key), "recorded": result.recorded.get(key), "account": account(run.records),
            "summary": {**asdict(s), "offered": s.offered, "refused_late": s.refused_late},
            "p99_by_class": {c: s.latency_s[c][1] for c in CLASSES},
            "requests_by_class": {c: sum(1 for r in run.records if length_class(r.chars) == c) for c in CLASSES}}


def to_json(result: ScaleoutResult, found: Sequence[Verdict]) -> dict[str, Any]:
    bench = result.bench
    return {
        "command": bench.command, "wall_s": bench.wall_s, "machine": result.machine, "proxy": result.proxy,
        "target": GOODPUT_TARGET, "arms": {a: describe(a) for a in ARMS},
        "setup": {**asdict(bench.setup), "deadline_tiers": deadline_tiers(bench.setup.slo, bench.setup.time_scale)},
        "verdicts": [{**asdict(v), "name": v.name} for v in found],
        "cells": [{"key": c.cell.key, "trace": c.cell.trace, "backends": c.cell.backends, "loads": list(c.cell.loads),
                   "mean_work_s": c.mean_work_s, "skipped": c.skipped,
                   "runs": [_run_json(c.cell.trace, r, result) for r in c.runs]} for c in bench.cells],
        "files": result.files,
    }


def write_report(result: ScaleoutResult, out_dir: Path) -> Path:
    """Write scaleout.md, scaleout.json and the plots into `out_dir`; return the Markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    found = verdicts(result.bench)
    plot_ratio(found, out_dir / RATIO_PLOT)
    plot_classes(result.bench, out_dir / CLASS_PLOT)
    plot_latency_cdf(result.bench.cells, result.bench.setup, out_dir / CDF_PLOT)
    (out_dir / DATA).write_text(json.dumps(to_json(result, found), indent=2, ensure_ascii=False) + "\n")
    report = out_dir / REPORT
    report.write_text(render_markdown(result, found))
    return report
