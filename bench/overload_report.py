"""The overload benchmark's report: verdicts, Markdown tables, PNG plots, everything as JSON.

Every number the report writes is computed here from the runs' summaries; the verdicts compare a
sidecar arm with nginx and the oracle measured in the same run of the benchmark.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

from bench.loadgen import MIXES, TIMEOUT_REASON
from bench.markdown import met as _met
from bench.markdown import num as _num
from bench.markdown import table as _table
from bench.nginx import nginx_conf
from bench.overload_spec import (
    ARMS,
    CAP_MARGIN_S,
    HIGH,
    LOW,
    NGINX,
    ORACLES,
    SLOTS1,
    TENANTS,
    BenchResult,
    CellResult,
    RunResult,
    Setup,
    arrival_rate,
    deadline_tiers,
    describe,
    emulator_args,
)
from bench.summary import CLASSES, FAILURE_KINDS, MEDIUM_MAX_CHARS, SHORT_MAX_CHARS, RunSummary, length_class
from glmtts.emulator.timing import BASE_S, MEASURED_THROUGHPUT, PER_UNIT_S
from glmtts.emulator.upstream import UpstreamConfig

REPORT = "overload.md"
SUMMARIES = "overload.json"
CDF_PLOT = "overload-latency-cdf.png"
GOODPUT_PLOT = "overload-goodput.png"
MAIN_COLUMNS = ("arm", "load", "offered", "goodput", *(f"goodput {c}" for c in CLASSES),
                *(f"in SLO {c} %" for c in CLASSES), "refused + late % of work",
                *(f"{p} {c} s" for c in CLASSES for p in ("p50", "p99")), "Jain", "orphaned backend s", "slots at end")
VERDICT_COLUMNS = ("arm", "load", "verdict", "measured", "target", "met", "note")
GE, LE = "≥", "≤"
VERDICT_LOADS = (0.5, 1.0, 1.3, 2.5)
P99_SLACK = 1.1  # a sidecar class p99 may be this much of nginx's at 1x
DIGITS = {"requests": 0, "%": 1, "s": 3, "work/backend-s": 3, "": 3}


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """One target for one sidecar arm at one load: met when `measured` `op` `target`.

    `met` is None when a run it needs is missing (`note` names it), False when the arm's own
    measure is undefined (e.g. no answer in a class)."""

    cell: str
    arm: str
    load: float
    name: str
    op: str  # GE or LE
    unit: str  # a DIGITS key
    measured: float | None
    target: float | None
    met: bool | None
    note: str = ""

    @property
    def miss_by(self) -> float | None:
        """How far a missed target was missed, in `unit`; None unless compared and missed."""
        if self.met is not False or self.measured is None or self.target is None:
            return None
        return self.target - self.measured if self.op == GE else self.measured - self.target


def judge(*, cell: str, arm: str, load: float, name: str, op: str, unit: str, measured: float | None,
          target: float | None, absent: Sequence[str] = (), undefined: str = "", note: str = "") -> Verdict:
    """A verdict: missing when `absent` names runs it needs; not met when `measured` is undefined;
    without a judgement when only the reference `target` is undefined."""
    if absent:
        met, note = None, "; ".join(x for x in ("no run: " + ", ".join(absent), note) if x)
    elif measured is None or target is None:
        met, note = (False if measured is None else None), "; ".join(x for x in (undefined, note) if x)
    else:
        met = measured >= target if op == GE else measured <= target
    return Verdict(cell=cell, arm=arm, load=load, name=name, op=op, unit=unit, measured=measured, target=target,
                   met=met, note=note)


def _index(runs: Sequence[RunSummary]) -> dict[tuple[str, float], RunSummary]:
    return {(s.config, s.load): s for s in runs}


def oracle(runs: Sequence[RunSummary], load: float) -> tuple[float | None, list[str]]:
    """The oracle's goodput at `load`: the best of the oracle-slotsN runs there; and which ran."""
    found = [s for s in runs if s.config in ORACLES and s.load == load]
    return (max(s.goodput for s in found) if found else None), sorted(s.config for s in found)


def cell_classes(trace: str) -> list[str]:
    """The length classes a trace's mix offers, in CLASSES order."""
    present = {length_class(n) for c in MIXES[trace] for n in (c.min_chars, c.max_chars)}
    return [c for c in CLASSES if c in present]


def _p99(run: RunSummary | None, cls: str) -> float | None:
    return None if run is None else run.latency_s[cls][1]


def arm_verdicts(cell: str, arm: str, runs: Sequence[RunSummary], classes: Sequence[str]) -> list[Verdict]:
    """The targets of sidecar arm `arm` against nginx and the oracle of the same cell, load by load."""
    at = _index(runs)
    out: list[Verdict] = []
    for load in VERDICT_LOADS:
        s, n = at.get((arm, load)), at.get((NGINX, load))
        mine = [] if s else [f"{arm} {load:g}×"]
        both = mine + ([] if n else [f"nginx {load:g}×"])

        def add(name: str, op: str, unit: str, measured: float | None, target: float | None,
                absent: Sequence[str], undefined: str = "", note: str = "", load: float = load) -> None:
            out.append(judge(cell=cell, arm=arm, load=load, name=name, op=op, unit=unit, measured=measured,
                             target=target, absent=absent, undefined=undefined, note=note))

        def of(run: RunSummary | None, measure: Callable[[RunSummary], float | None]) -> float | None:
            return measure(run) if run is not None else None

        if load == 0.5:
            add("nothing refused or late", LE, "requests", of(s, lambda x: x.refused_late), 0, mine)
        elif load == 1.0:
            add("refused + late ≤ nginx's late", LE, "requests", of(s, lambda x: x.refused_late),
                of(n, lambda x: x.refused_late), both)
            for cls in classes:
                ref = _p99(n, cls)
                add(f"p99 {cls} ≤ {P99_SLACK:g}× nginx's", LE, "s", _p99(s, cls),
                    None if ref is None else P99_SLACK * ref, both,
                    undefined=f"no 200 answer for {cls}" if s and n and ref is not None else f"nginx: none for {cls}")
        elif load == 1.3:
            add("goodput ≥ nginx's", GE, "work/backend-s", of(s, lambda x: x.goodput), of(n, lambda x: x.goodput),
                both)
            add("short in SLO ≥ 99 %", GE, "%", of(s, lambda x: x.in_slo_pct["short"]), 99.0, mine)
            ref = of(n, lambda x: x.in_slo_pct["long"])
            add("long in SLO ≥ nginx's − 5 points", GE, "%", of(s, lambda x: x.in_slo_pct["long"]),
                None if ref is None else ref - 5.0, both, undefined="no long text offered")
        else:
            best, ran = oracle(runs, load)
            add("goodput ≥ 2× nginx's", GE, "work/backend-s", of(s, lambda x: x.goodput),
                of(n, lambda x: 2 * x.goodput), both)
            partial = f"oracle over {', '.join(ran)} only" if ran and len(ran) < len(ORACLES) else ""
            add("goodput ≥ 90 % of the oracle's", GE, "work/backend-s", of(s, lambda x: x.goodput),
                None if best is None else 0.9 * best, mine + ([] if ran else [f"oracle-slots1..4 {load:g}×"]),
                note=partial)
            add("short in SLO ≥ 95 %", GE, "%", of(s, lambda x: x.in_slo_pct["short"]), 95.0, mine)
            add("long in SLO ≥ 30 %", GE, "%", of(s, lambda x: x.in_slo_pct["long"]), 30.0, mine,
                undefined="no long text offered")
            add("Jain ≥ 0.98", GE, "", of(s, lambda x: x.jain), 0.98, mine, undefined="no goodput to share")
    return out


def flat_verdicts(cell: str, runs: Sequence[RunSummary], loads: Sequence[float]) -> list[Verdict]:
    """On a flat curve (no gain from concurrency): sidecar-high's goodput ≥ slots1's at every load."""
    at = _index(runs)
    out = []
    for load in loads:
        s, r = at.get((HIGH, load)), at.get((SLOTS1, load))
        absent = ([] if s else [f"{HIGH} {load:g}×"]) + ([] if r else [f"{SLOTS1} {load:g}×"])
        out.append(judge(cell=cell, arm=HIGH, load=load, name="goodput ≥ slots1's", op=GE, unit="work/backend-s",
                         measured=s.goodput if s else None, target=r.goodput if r else None, absent=absent))
    return out


def cell_verdicts(result: CellResult) -> list[Verdict]:
    cell, runs = result.cell, [r.summary for r in result.runs]
    if cell.curve == "flat":
        return flat_verdicts(cell.key, runs, cell.loads)
    classes = cell_classes(cell.trace)
    return [v for arm in (HIGH, LOW) if arm in cell.arms for v in arm_verdicts(cell.key, arm, runs, classes)]


def verdict_table(verdicts: Sequence[Verdict]) -> list[str]:
    rows = [[v.arm, f"{v.load:g}×", v.name, _num(v.measured, DIGITS[v.unit]),
             f"{v.op} {_num(v.target, DIGITS[v.unit])}", _met(v.met), v.note] for v in verdicts]
    return _table(VERDICT_COLUMNS, rows)


def _slots(run: RunResult) -> str:
    return "/".join(f"{v:g}" for _, v in sorted(run.slots.items())) or "–"


def main_table(runs: Sequence[RunResult]) -> list[str]:
    """One row per arm and load: offered work, goodput, SLO attainment, latency, fairness, losses."""
    rows = []
    for run in runs:
        s = run.summary
        orphaned = "n/a" if s.orphaned_backend_s is None else _num(s.orphaned_backend_s, 2)
        rows.append([s.config, f"{s.load:g}×", _num(s.offered), _num(s.goodput),
                     *(_num(s.class_goodput[c]) if s.class_requests[c] else "–" for c in CLASSES),
                     *(_num(s.in_slo_pct[c], 1) for c in CLASSES), _num(s.refused_late_work_pct, 1),
                     *(_num(s.latency_s[c][i]) for c in CLASSES for i in (0, 1)), _num(s.jain),
                     orphaned, _slots(run)])
    return _table(MAIN_COLUMNS, rows)


def failures_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Requests that did not succeed, by why (bench.summary.failure_kind), per arm and load."""
    rows = [[s.config, f"{s.load:g}×", s.requests, s.outcomes.get("200 ok", 0),
             *(s.failures.get(kind, 0) for kind in FAILURE_KINDS), s.refused, s.late] for s in summaries]
    return _table(["arm", "load", "requests", "200 OK", *FAILURE_KINDS, "refused", "late"], rows)


def outcomes_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Requests per outcome (status and reason) for each arm and load."""
    labels = sorted({label for s in summaries for label in s.outcomes}, key=lambda x: (x != "200 ok", x))
    rows = [[s.config, f"{s.load:g}×", s.requests, *(s.outcomes.get(label, 0) for label in labels)]
            for s in summaries]
    return _table(["arm", "load", "requests", *labels], rows)


def tenants_table(summaries: Sequence[RunSummary]) -> list[str]:
    """Each tenant's work goodput against its max-min fair share (and what it offered), work-s per s."""
    names = [t.name for t in TENANTS]
    rows = [[s.config, f"{s.load:g}×",
             *(f"{s.tenants[n].goodput:.3f} / {s.tenants[n].fair:.3f} ({s.tenants[n].offered:.3f})" for n in names),
             _num(s.jain)] for s in summaries]
    return _table(["arm", "load", *(f"{n}: goodput / fair (offered)" for n in names), "Jain"], rows)


def plot_goodput(cells: Sequence[CellResult], path: Path) -> None:
    """Goodput against measured offered load (work per backend-second), one panel per cell."""
    columns = min(3, max(1, len(cells)))
    rows = max(1, math.ceil(len(cells) / columns))
    fig = Figure(figsize=(5.0 * columns, 4.0 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, result in zip(axes, cells, strict=False):
        summaries = [r.summary for r in result.runs]
        top = max((s.offered for s in summaries), default=1.0)
        ax.plot([0.0, 1.0, max(1.0, top)], [0.0, 1.0, 1.0], color="grey", linestyle="--", linewidth=1,
                label="capacity, 1 request per backend")
        for arm in dict.fromkeys(s.config for s in summaries):
            points = sorted((s.offered, s.goodput) for s in summaries if s.config == arm)
            style = {"linestyle": "none", "marker": "x"} if arm in ORACLES else {"marker": "o"}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=arm, **style)
        ax.set_title(result.cell.key, fontsize=10)
        ax.set_xlabel("offered work per backend-second")
        ax.set_ylabel("goodput, work per backend-second")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(cells):]:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_latency_cdf(cells: Sequence[CellResult], setup: Setup, path: Path) -> None:
    """Per cell (at its top load) and length class: the fraction of *all* requests of the class
    answered 200 within t seconds, one line per arm (a curve that stops below 1 shows the rest)."""
    fig = Figure(figsize=(4.2 * len(CLASSES), 3.4 * max(1, len(cells))))
    grid = fig.subplots(max(1, len(cells)), len(CLASSES), squeeze=False)
    for axes, result in zip(grid, cells, strict=False):
        top = max((r.summary.load for r in result.runs), default=0.0)
        classes = cell_classes(result.cell.trace)
        for ax, cls in zip(axes, CLASSES, strict=True):
            if cls not in classes:
                ax.set_axis_off()
                continue
            for run in (r for r in result.runs if r.summary.load == top):
                of_class = [r for r in run.records if length_class(r.chars) == cls]
                served = sorted(r.latency_s for r in of_class if r.ok)
                if of_class and served:
                    ys = [(i + 1) / len(of_class) for i in range(len(served))]
                    ax.step([0.0, *served], [0.0, *ys], where="post", label=run.summary.config)
            limits = sorted({setup.slo_s(n) for c in MIXES[result.cell.trace] for n in (c.min_chars, c.max_chars)
                             if length_class(n) == cls})
            for slo in limits:
                ax.axvline(slo, color="grey", linestyle="--", linewidth=1)
            ax.set_title(f"{result.cell.key}, {top:g}×: {cls}", fontsize=9)
            ax.set_xlabel("latency from intended send, s (dashed: SLO)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[1]:  # nothing of this class was served: no curve to name
                ax.legend(loc="lower right", fontsize=7)
            else:
                ax.text(0.5, 0.5, "none served", ha="center", va="center", transform=ax.transAxes)
        axes[0].set_ylabel("fraction served OK")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _run_costs(result: BenchResult) -> list[float]:
    return [r.wall_s for c in result.cells for r in c.runs]


def setup_lines(result: BenchResult) -> list[str]:
    setup = result.setup
    scale = setup.time_scale
    curves = ", ".join(dict.fromkeys(c.cell.curve for c in result.cells))
    tiers = "; ".join(f"{'≤' + str(t['max_chars']) if t['max_chars'] else 'longer'}: {t['timeout_s']:.4g} s"
                      + (f" + {t['per_char_s']:.4g} s × chars" if t.get("per_char_s") else "")
                      for t in _tiers(setup))
    mixes = "; ".join(f"**{name}** " + ", ".join(f"{c.name} {c.min_chars}–{c.max_chars} chars {c.share:.0%}"
                                                  for c in mix)
                      for name, mix in MIXES.items() if any(r.cell.trace == name for r in result.cells))
    jitter_mean = math.exp(setup.jitter ** 2 / 2)
    upstream = UpstreamConfig()
    curve = ", ".join(f"×{g:g}" for g in MEASURED_THROUGHPUT)
    return [
        f"- **Setup**: time scale {scale:g}, {setup.duration_s:g} s of arrivals measured per run after "
        f"{setup.preroll_s:g} s of the same trace not counted (every arm), service noise log-normal "
        f"σ = {setup.jitter:g} (`--jitter`), curve(s): {curves}, trace seed {setup.seed}, SLO `{setup.slo}`.",
        f"- **Backends**: `python -m glmtts.emulator {' '.join(emulator_args(setup, 'default'))}` (the flat curve "
        f"adds `--throughput 1`), one emulated GPU each; upstream's own semaphores ({upstream.short_concurrency} "
        f"short / {upstream.long_concurrency} long per process) and timeouts untouched. Default curve: total "
        f"throughput {curve} at 1–{len(MEASURED_THROUGHPUT)} requests in one process. Every run starts its arm "
        "fresh on free loopback ports, warms every backend up, then measures.",
        f"- **Trace**: open loop (`bench/loadgen.py`), Poisson arrivals; mixes {mixes}; tenants "
        + ", ".join(f"{t.name} {t.share:.0%}" for t in TENANTS) + " of the arrivals, equal weights, each with its own "
        "API key. The same request sequence at every load (gaps scaled); latency runs from each request's "
        "*intended* send time.",
        f"- **Work** of a request = (base_s + per_unit_s × units(text)) × time scale = ({BASE_S:.4g} + "
        f"{PER_UNIT_S:.4g} × units) × {scale:g} s: its solo service time by the emulator's model mean (the "
        f"noise's own mean, exp(σ²/2) = {jitter_mean:.4f}, is left out). **Capacity** of a pool = its backends' "
        "solo-seconds per second; **load L** offers L × that much work per second, so arrivals per second = "
        "L × backends / mean work per request of the mix. **Offered** (in the tables) = the work the trace "
        "actually offered per backend-second.",
        f"- **SLO** (`{setup.slo}`, also every sidecar arm's deadline, through `deadlines.tiers`): {tiers}.",
        "- **Goodput** = work of requests answered 200 with `success: true` within their SLO and completed inside "
        "the arrival window, per backend-second (÷ backends × window); overall and by class (short ≤ "
        f"{SHORT_MAX_CHARS} chars, medium ≤ {MEDIUM_MAX_CHARS}, long). **In SLO %** of a class = its requests "
        "answered OK within SLO (at any time) ÷ its requests offered. **Refused** = 429 or 503; **late** = 408, "
        "answered OK after the SLO, or no answer "
        f"before the generator's cap (window + largest SLO + {CAP_MARGIN_S:g} s). **Refused + late % of work** = "
        "their work ÷ offered work. Latency p50/p99 = over 200 answers.",
        "- **Jain** = (Σx)² / (n Σx²) over the tenants, x_i = work goodput_i ÷ fair_i, fair_i = the max-min fair "
        "share of the total work goodput given the work each tenant offered (water filling).",
        "- **Orphaned backend s**: backend time spent on requests already answered (408) or gone; sidecar arms: "
        "`orphaned_backend_seconds` of `GET /api/v1/queue` after the run settled; n/a where not reported (nginx's "
        "emulators: `/emulator/stats` counts orphaned requests, not seconds). **Slots at end**: each backend's "
        "`glmtts_sidecar_backend_slots` when the arrivals ended.",
        "- **Oracle** at a load = the best goodput of oracle-slots1..4 (perfect priors, fixed slots) at that load.",
    ]


def _tiers(setup: Setup) -> list[dict[str, Any]]:
    return deadline_tiers(setup.slo, setup.time_scale)


def cell_lines(result: CellResult, verdicts: Sequence[Verdict]) -> list[str]:
    cell = result.cell
    summaries = [r.summary for r in result.runs]
    rates = ", ".join(f"{load:g}× = {arrival_rate(load, cell.backends, result.mean_work_s):.2f} req/s"
                      for load in sorted({*cell.loads, *cell.oracle_loads}))
    lines = [f"### {cell.key}", "",
             f"Mean work per request {result.mean_work_s:.4f} s; arrivals {rates}.", ""]
    for arm, why in result.skipped.items():
        lines += [f"**{arm} skipped**: {why}", ""]
    if verdicts:
        lines += [*verdict_table(verdicts), ""]
    lines += ["Goodput and offered in work per backend-second; latency in seconds:", "", *main_table(result.runs), "",
              "Requests that did not succeed, by why:", "", *failures_table(summaries), "",
              "Outcomes by status and reason:", "", *outcomes_table(summaries), "",
              "Per tenant (work-seconds per second):", "", *tenants_table(summaries), ""]
    return lines


def config_lines(result: BenchResult) -> list[str]:
    """The whole YAML of every sidecar arm as it ran (ports: those of its first run), and nginx's."""
    lines: list[str] = []
    for cell_result in result.cells:
        shown: set[str] = set()
        for run in cell_result.runs:
            arm = run.summary.config
            if arm in shown:
                continue
            shown.add(arm)
            if run.config_yaml is not None:
                body, lang = run.config_yaml, "yaml"
            else:
                body = nginx_conf(Path("/tmp/run"), 8049, [f"127.0.0.1:{20000 + i}"
                                                            for i in range(cell_result.cell.backends)])
                lang = "nginx"
            lines += [f"<details><summary>{arm} — {cell_result.cell.key}</summary>", "", f"```{lang}",
                      body.rstrip(), "```", "", "</details>", ""]
    return lines


def render_markdown(result: BenchResult, verdicts: Mapping[str, Sequence[Verdict]]) -> str:
    """The report: reproduce command, verdicts and misses, setup, per-cell tables, plots, configurations."""
    costs = _run_costs(result)
    all_verdicts = [v for vs in verdicts.values() for v in vs]
    misses = [v for v in all_verdicts if v.met is False]
    count = {label: sum(1 for v in all_verdicts if v.met is value)
             for label, value in (("met", True), ("not met", False), ("missing", None))}
    per_arm = []
    for key, vs in verdicts.items():
        for arm in dict.fromkeys(v.arm for v in vs):
            mine = [v for v in vs if v.arm == arm]
            per_arm.append([key, arm, *(sum(1 for v in mine if v.met is value) for value in (True, False, None))])
    lag = max((r.summary.max_send_lag_s for c in result.cells for r in c.runs), default=0.0)
    cut = sum(r.summary.outcomes.get(TIMEOUT_REASON, 0) for c in result.cells for r in c.runs)
    lines = [
        "# Overload: nginx, the seed's proposal and the sidecar, in work goodput",
        "",
        f"Reproduce: `{result.command}`",
        "",
        f"This run: {len(costs)} runs in {result.wall_s / 60:.1f} min on {os.cpu_count()} CPUs; one run (start, "
        f"warm-up, arrivals, tail, settle, stop) took {statistics.mean(costs) if costs else 0:.1f} s on average "
        f"({min(costs, default=0):.1f}–{max(costs, default=0):.1f} s).",
        "",
        *setup_lines(result),
        "",
        "## Verdicts",
        "",
        f"{count['met']} met, {count['not met']} not met, {count['missing']} missing (a run they need did not run).",
        "",
        *_table(["cell", "arm", "met", "not met", "missing"], per_arm),
        "",
    ]
    if misses:
        lines += ["Misses:", ""]
        for v in misses:
            by = v.miss_by
            digits, unit = DIGITS[v.unit], "points" if v.unit == "%" else v.unit
            how = f"{'short' if v.op == GE else 'over'} by {_num(by, digits)} {unit}".rstrip()
            lines.append(f"- {v.cell}, {v.arm} at {v.load:g}×: {v.name}: measured {_num(v.measured, digits)}, "
                         f"target {v.op} {_num(v.target, digits)}" + (f", {how}" if by is not None else f" ({v.note})"))
        lines.append("")
    lines += ["## Arms", "", *_table(["arm", "what runs"], [[a, describe(a)] for a in ARMS
                                                         if any(a in c.cell.arms for c in result.cells)]), "",
              "## Results", ""]
    for cell_result in result.cells:
        lines += cell_lines(cell_result, verdicts.get(cell_result.cell.key, []))
    lines += [
        f"Generator health: latest send {lag * 1000:.1f} ms after its intended time; {cut} requests cut off by the "
        "wall-clock cap.",
        "",
        "## Plots",
        "",
        f"![goodput vs offered load]({GOODPUT_PLOT})",
        "",
        f"![latency CDF at each cell's top load]({CDF_PLOT})",
        "",
        "## Configurations",
        "",
        "Each sidecar arm's whole file as it ran (the benchmark adds `tasks.state_dir` in the run's temporary "
        "directory and an admin token to read the counters; ports differ from run to run). nginx: "
        "`nginx -c nginx.conf -p DIR -e DIR/error.log`, paths of one run shown as /tmp/run.",
        "",
        *config_lines(result),
    ]
    return "\n".join(lines)


def _run_json(run: RunResult) -> dict[str, Any]:
    s = run.summary
    return {"arm": s.config, "load": s.load, "wall_s": run.wall_s, "slots": run.slots, "config_yaml": run.config_yaml,
            "summary": {**asdict(s), "offered": s.offered, "refused_late": s.refused_late}}


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {**asdict(v), "miss_by": v.miss_by}


def to_json(result: BenchResult, verdicts: Mapping[str, Sequence[Verdict]]) -> dict[str, Any]:
    costs = _run_costs(result)
    return {
        "command": result.command, "wall_s": result.wall_s, "cpus": os.cpu_count(),
        "run_wall_s": {"mean": statistics.mean(costs) if costs else None, "min": min(costs, default=None),
                       "max": max(costs, default=None)},
        "setup": {**asdict(result.setup), "max_slo_s": result.setup.max_slo_s,
                  "deadline_tiers": _tiers(result.setup)},
        "cells": [{**asdict(c.cell), "key": c.cell.key, "mean_work_s": c.mean_work_s, "skipped": c.skipped,
                   "runs": [_run_json(r) for r in c.runs],
                   "verdicts": [_verdict_json(v) for v in verdicts.get(c.cell.key, [])]} for c in result.cells],
    }


def write_report(result: BenchResult, out_dir: Path) -> Path:
    """Write overload.md, overload.json and the plots into `out_dir`; return the Markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    verdicts = {c.cell.key: cell_verdicts(c) for c in result.cells}
    plot_goodput(result.cells, out_dir / GOODPUT_PLOT)
    plot_latency_cdf(result.cells, result.setup, out_dir / CDF_PLOT)
    (out_dir / SUMMARIES).write_text(json.dumps(to_json(result, verdicts), indent=2, ensure_ascii=False) + "\n")
    report = out_dir / REPORT
    report.write_text(render_markdown(result, verdicts))
    return report
