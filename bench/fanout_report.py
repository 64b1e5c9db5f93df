"""The fan-out benchmark's results, verdicts and report: Markdown tables, PNG plots, everything as JSON.

Pure up to the writing of files: every figure the report shows is computed here from the samples
and run summaries bench.fanout measured in the same run. The verdicts are the issue's three
targets: a long text answers `SPEEDUP_TARGET` times faster with fan-out than without on an idle
pool; a streamed long text's first audio byte comes within `TTFB_TARGET` times a short text's
latency; under overload, goodput with fan-out is at least `GOODPUT_TARGET` of goodput without.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

from bench.markdown import met as _met
from bench.markdown import num as _num
from bench.markdown import table as _table
from bench.overload_spec import HIGH, HIGH_FANOUT, BenchResult, CellResult, RunResult
from bench.summary import CLASSES, percentile

REPORT = "fanout.md"
DATA = "fanout.json"
LATENCY_PLOT = "fanout-idle-latency.png"
TTFB_PLOT = "fanout-ttfb.png"
GOODPUT_PLOT = "fanout-goodput-ratio.png"
GE, LE = "≥", "≤"
SPEEDUP_TARGET = 3.0  # a long text on an idle pool: without / with fan-out
TTFB_TARGET = 1.5  # streamed first audio byte / a short text's latency
GOODPUT_TARGET = 0.95  # goodput with fan-out / without, under overload
VERDICT_LOADS = (1.3, 2.5)
PLAUSIBLE = (0.75, 1.35)  # a valid answer's decoded duration / the emulator voice's duration for its text
OVERLOAD_ARMS = (HIGH, HIGH_FANOUT)

# The idle pool's arms, by the exact label the report uses. `zh-500` / `en-500`: a ~500-character
# Chinese / English text; `zh-20`: a ~20-character Chinese one.
ZH_OFF, ZH_ON = "tts zh-500 X-Fanout: off", "tts zh-500 X-Fanout: on"
EN_OFF, EN_ON = "tts en-500 X-Fanout: off", "tts en-500 X-Fanout: on"
SHORT = "tts zh-20"
STREAM_PCM, STREAM_MP3 = "speech zh-500 stream pcm", "speech zh-500 stream mp3"
SPEEDUP_PAIRS = (("zh-500", ZH_OFF, ZH_ON), ("en-500", EN_OFF, EN_ON))
STREAM_ARMS = (STREAM_PCM, STREAM_MP3)


@dataclass(frozen=True, kw_only=True)
class IdleArm:
    """What one idle-pool arm sends: to `/api/v1/tts` (`response_format` None) or streamed from
    `/v1/audio/speech` in `response_format`, a text of kind `text`, with header X-Fanout `fanout`
    (None: no header, the config's `enabled` decides)."""

    name: str
    text: str
    fanout: str | None = None
    response_format: str | None = None

    @property
    def streamed(self) -> bool:
        return self.response_format is not None


IDLE_ARMS = (
    IdleArm(name=ZH_OFF, text="zh-500", fanout="off"), IdleArm(name=ZH_ON, text="zh-500", fanout="on"),
    IdleArm(name=EN_OFF, text="en-500", fanout="off"), IdleArm(name=EN_ON, text="en-500", fanout="on"),
    IdleArm(name=SHORT, text="zh-20", fanout="off"),
    IdleArm(name=STREAM_PCM, text="zh-500", response_format="pcm"),
    IdleArm(name=STREAM_MP3, text="zh-500", response_format="mp3"),
)


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One request of an idle arm, as the client saw it. `valid`: answered 200 with audio that
    decodes and lasts a plausible time for its text (`error` says what was wrong otherwise)."""

    arm: str
    rep: int
    chars: int
    units: float
    status: int | None
    valid: bool
    latency_s: float  # send to last byte
    ttfb_s: float | None = None  # streamed arms: send to the first body chunk
    audio_s: float | None = None  # decoded duration
    expected_audio_s: float | None = None  # what the emulator's voice gives the text
    pieces: int | None = None  # X-Fanout-Pieces, when the answer has it
    backend: str | None = None  # X-Backend
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class ArmStats:
    """One idle arm's figures over its valid samples (None where none)."""

    arm: str
    requests: int
    valid: int
    latency_p50: float | None
    latency_p90: float | None
    ttfb_p50: float | None
    ttfb_p90: float | None
    pieces: tuple[int, ...]  # the X-Fanout-Pieces values seen, sorted
    audio_s_p50: float | None
    chars_p50: float | None


@dataclass
class IdleResult:
    """The idle-pool part: every sample, the sidecar's whole config, how it ran."""

    samples: list[Sample]
    config_yaml: str
    time_scale: float
    backends: int
    reps: int
    pids: list[int] = field(default_factory=list)  # the sidecar's and its backends', all stopped
    wall_s: float = 0.0
    # Per long text kind ("zh-500"): the speed-up the emulator's model allows the sidecar's cut with
    # no overhead at all (bench.fanout.model_speedup): what the measured one is expected to stay under.
    model_speedup: dict[str, float] = field(default_factory=dict)


@dataclass
class FanoutResult:
    """Both parts. `overload`: one result per round (bench.fanout's ``round_plan``; empty when the
    part did not run)."""

    idle: IdleResult | None
    overload: list[BenchResult]
    command: str
    wall_s: float
    machine: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)  # part -> why it did not run


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """One target: met when `measured` `op` `target`; None when a run it needs is missing or its
    ratio is undefined (`note` says which)."""

    name: str
    measured: float | None
    op: str
    target: float
    met: bool | None
    note: str = ""


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def arm_stats(arm: str, samples: Sequence[Sample]) -> ArmStats:
    mine = [s for s in samples if s.arm == arm]
    ok = [s for s in mine if s.valid]
    latency = [s.latency_s for s in ok]
    ttfb = [s.ttfb_s for s in ok if s.ttfb_s is not None]
    return ArmStats(arm=arm, requests=len(mine), valid=len(ok), latency_p50=percentile(latency, 50),
                    latency_p90=percentile(latency, 90), ttfb_p50=percentile(ttfb, 50),
                    ttfb_p90=percentile(ttfb, 90), pieces=tuple(sorted({s.pieces for s in ok if s.pieces is not None})),
                    audio_s_p50=_median([s.audio_s for s in ok if s.audio_s is not None]),
                    chars_p50=_median([float(s.chars) for s in mine]))


def _ratio_verdict(name: str, op: str, target: float, top: ArmStats, bottom: ArmStats, top_value: float | None,
                   bottom_value: float | None) -> Verdict:
    """`top_value` / `bottom_value` against `target`; not met when an arm answered anything invalid
    (timing errors flatters), none when an arm did not run."""
    absent = [s.arm for s in (top, bottom) if s.requests == 0]
    if absent:
        return Verdict(name=name, measured=None, op=op, target=target, met=None, note="no run: " + ", ".join(absent))
    invalid = [f"{s.arm}: {s.requests - s.valid} of {s.requests} answers invalid" for s in (top, bottom)
               if s.valid < s.requests]
    measured = top_value / bottom_value if top_value is not None and bottom_value else None
    if invalid:
        return Verdict(name=name, measured=measured, op=op, target=target, met=False, note="; ".join(invalid))
    if measured is None:
        return Verdict(name=name, measured=None, op=op, target=target, met=None, note="ratio undefined")
    met = measured >= target if op == GE else measured <= target
    return Verdict(name=name, measured=measured, op=op, target=target, met=met)


def idle_verdicts(samples: Sequence[Sample], bounds: Mapping[str, float] | None = None) -> list[Verdict]:
    """Speed-up of each long text with fan-out (median off / median on), with what the model allows
    in its note (`bounds`, by text kind), and each streamed format's median time to first audio byte
    over the short text's median latency."""
    stats = {arm.name: arm_stats(arm.name, samples) for arm in IDLE_ARMS}
    out = []
    for text, off, on in SPEEDUP_PAIRS:
        verdict = _ratio_verdict(f"{text} on /api/v1/tts: latency without / with fan-out", GE, SPEEDUP_TARGET,
                                 stats[off], stats[on], stats[off].latency_p50, stats[on].latency_p50)
        if bounds and text in bounds:
            bound = f"model, no overhead: {bounds[text]:.2f}"
            verdict = replace(verdict, note="; ".join(n for n in (verdict.note, bound) if n))
        out.append(verdict)
    short = stats[SHORT]
    for arm in STREAM_ARMS:
        out.append(_ratio_verdict(f"{arm}: first audio byte / {SHORT} latency", LE, TTFB_TARGET, stats[arm], short,
                                  stats[arm].ttfb_p50, short.latency_p50))
    return out


def _run(cell: CellResult, arm: str, load: float) -> RunResult | None:
    return next((r for r in cell.runs if r.summary.config == arm and r.summary.load == load), None)


def cell_ratio(cell: CellResult, load: float) -> float | None:
    """One round's goodput with fan-out / without at `load` (None when either did not run or
    without is 0)."""
    base, fan = _run(cell, HIGH, load), _run(cell, HIGH_FANOUT, load)
    if base is None or fan is None or base.summary.goodput <= 0:
        return None
    return fan.summary.goodput / base.summary.goodput


def traces(rounds: Sequence[BenchResult]) -> list[str]:
    """The overload part's traces, in the order its cells ran."""
    return list(dict.fromkeys(cell.cell.trace for result in rounds for cell in result.cells))


def _cells(rounds: Sequence[BenchResult], trace: str) -> list[CellResult]:
    """Each round's cell of `trace` (a round without it is left out)."""
    return [cell for result in rounds for cell in result.cells if cell.cell.trace == trace]


def round_ratios(rounds: Sequence[BenchResult], trace: str, load: float) -> list[float | None]:
    """Goodput with fan-out / without of every round, in round order."""
    return [cell_ratio(cell, load) for cell in _cells(rounds, trace)]


def goodput_ratio(rounds: Sequence[BenchResult], trace: str, load: float) -> float | None:
    """Goodput with fan-out / without at `load`, each summed over the rounds in which both arms
    ran (the ratio of the mean goodputs); None when no round has both or without is 0."""
    pairs = [(_run(cell, HIGH, load), _run(cell, HIGH_FANOUT, load)) for cell in _cells(rounds, trace)]
    both = [(base.summary.goodput, fan.summary.goodput) for base, fan in pairs if base is not None and fan is not None]
    without = sum(base for base, _ in both)
    if not both or without <= 0:
        return None
    return sum(fan for _, fan in both) / without


def _round_note(ratios: Sequence[float | None]) -> str:
    """Each round's ratio and the order its arms ran in (odd rounds reversed)."""
    if len(ratios) < 2:
        return ""
    orders = ("fan-out second", "fan-out first")
    return "rounds: " + ", ".join(f"{_num(r, 2)} ({orders[i % 2]})" for i, r in enumerate(ratios))


def overload_verdicts(rounds: Sequence[BenchResult]) -> list[Verdict]:
    """Per trace and load: goodput (work) with fan-out ≥ GOODPUT_TARGET × without, both summed
    over the rounds of the same run."""
    out = []
    for trace in traces(rounds):
        cells = _cells(rounds, trace)
        for load in VERDICT_LOADS:
            name = f"{trace} at {load:g}×: goodput {HIGH_FANOUT} / {HIGH}"
            absent = sorted({f"{arm} {load:g}×" + (f" (skipped: {cell.skipped[arm]})" if arm in cell.skipped else "")
                             for cell in cells for arm in OVERLOAD_ARMS if _run(cell, arm, load) is None})
            ratio = goodput_ratio(rounds, trace, load)
            note = _round_note(round_ratios(rounds, trace, load))
            if absent or ratio is None:
                missing = "no run: " + ", ".join(absent) if absent else f"{HIGH} has no goodput"
                out.append(Verdict(name=name, measured=ratio, op=GE, target=GOODPUT_TARGET, met=None,
                                   note="; ".join(n for n in (missing, note) if n)))
            else:
                out.append(Verdict(name=name, measured=ratio, op=GE, target=GOODPUT_TARGET,
                                   met=ratio >= GOODPUT_TARGET, note=note))
    return out


def all_verdicts(result: FanoutResult) -> list[Verdict]:
    idle = idle_verdicts(result.idle.samples, result.idle.model_speedup) if result.idle else idle_verdicts([])
    return idle + overload_verdicts(result.overload)


# --- Markdown ---------------------------------------------------------------------------------


VERDICT_COLUMNS = ("target", "measured", "required", "met", "note")
IDLE_COLUMNS = ("arm", "requests", "valid", "chars (median)", "p50 s", "p90 s", "first byte p50 s",
                "first byte p90 s", "pieces", "audio s (median)")
OVERLOAD_COLUMNS = ("trace", "round", "arm", "load", "offered", "goodput", *(f"goodput {c}" for c in CLASSES),
                    *(f"in SLO {c} %" for c in CLASSES), *(f"p50 {c} s" for c in CLASSES),
                    *(f"p99 {c} s" for c in CLASSES), "refused", "late", "requests", "split", "whole: pressure/busy")


def verdict_table(verdicts: Sequence[Verdict]) -> list[str]:
    return _table(VERDICT_COLUMNS, [[v.name, _num(v.measured, 2), f"{v.op} {v.target:g}", _met(v.met), v.note]
                                    for v in verdicts])


def idle_table(samples: Sequence[Sample]) -> list[str]:
    rows = []
    for arm in IDLE_ARMS:
        s = arm_stats(arm.name, samples)
        rows.append([s.arm, s.requests, s.valid, _num(s.chars_p50, 0), _num(s.latency_p50), _num(s.latency_p90),
                     _num(s.ttfb_p50), _num(s.ttfb_p90), "/".join(map(str, s.pieces)) or "–",
                     _num(s.audio_s_p50, 1)])
    return _table(IDLE_COLUMNS, rows)


def overload_table(rounds: Sequence[BenchResult]) -> list[str]:
    """Every run, trace by trace and round by round, in the order it ran."""
    rows = []
    for trace in traces(rounds):
        for index, cell in enumerate(_cells(rounds, trace)):
            rows += _cell_rows(cell, index + 1)
    return _table(OVERLOAD_COLUMNS, rows)


def _cell_rows(cell: CellResult, round_no: int) -> list[list[Any]]:
    rows = []
    for run in cell.runs:
        s = run.summary
        rows.append([cell.cell.trace, round_no, s.config, f"{s.load:g}×", _num(s.offered), _num(s.goodput),
                     *(_num(s.class_goodput[c]) if s.class_requests[c] else "–" for c in CLASSES),
                     *(_num(s.in_slo_pct[c], 1) for c in CLASSES),
                     *(_num(s.latency_s[c][i]) for i in (0, 1) for c in CLASSES), s.refused, s.late, s.requests,
                     *_fanout_cells(run.fanout)])
    return rows


def _fanout_cells(counts: dict[str, float]) -> list[str]:
    """Requests the run's sidecar split, and those it ran whole under pressure or with no slot free
    (over the whole run, pre-roll and warm-up included); "–" for an arm without fan-out."""
    if not counts or "declined pressure" not in counts:
        return ["–", "–"]
    split, pressure, busy = (counts.get(key, 0.0) for key in ("split", "declined pressure", "declined busy"))
    if counts.get("declined disabled", 0.0) and not (split or pressure or busy):
        return ["off", "off"]  # fan-out not enabled: every request ran whole as configured
    return [f"{split:.0f}", f"{pressure:.0f}/{busy:.0f}"]


def invalid_lines(samples: Sequence[Sample]) -> list[str]:
    bad = [s for s in samples if not s.valid]
    if not bad:
        return ["Every answer was valid audio of plausible duration.", ""]
    return ["Invalid answers (not in the medians):", "",
            *(f"- {s.arm} rep {s.rep}: HTTP {s.status}: {s.error}" for s in bad), ""]


def model_lines(idle: IdleResult) -> list[str]:
    """What the emulator's model allows each long text's speed-up with no overhead (see IdleResult)."""
    if not idle.model_speedup:
        return []
    figures = ", ".join(f"{kind} {value:.2f}" for kind, value in idle.model_speedup.items())
    return [f"What the cut and the noise alone allow: {figures}. That is the median whole service over the "
            "median makespan when the sidecar's own cut of each text sent here (even, or tapered when that is "
            "expected sooner, as its cost model chooses once it has measured the emulator's noise) runs on "
            f"{idle.backends} single-slot backends, each piece's service drawn from the emulator's model "
            "(its log-normal noise included) and started on the lane that frees first, with the sidecar, HTTP "
            "and audio costing nothing (`bench.fanout.model_speedup`, thousands of draws per text). Overhead only "
            f"lowers the expected speed-up; a median of {idle.reps} noisy requests per arm scatters around it.",
            ""]


def setup_lines(result: FanoutResult) -> list[str]:
    lines = []
    if result.idle:
        idle = result.idle
        lines.append(f"- **Idle pool**: one sidecar (`{HIGH_FANOUT}`'s config below) over {idle.backends} emulator "
                     f"backends, each on its own emulated GPU, time scale {idle.time_scale:g}; {idle.reps} "
                     "repetitions of every arm, arms alternating, each request sent only once the sidecar "
                     "reports nothing queued or in service. A new long text every repetition; the short "
                     "texts come round again once all were sent (the sidecar's cache is off). "
                     "Latency: send to last byte at the client; first byte: send to the first body chunk. An "
                     f"answer counts only when it is a 200 whose audio decodes and lasts {PLAUSIBLE[0]:g}–"
                     f"{PLAUSIBLE[1]:g}× what the emulator's voice gives its text.")
    if result.overload:
        first, count = result.overload[0], len(result.overload)
        setup = first.setup
        seeds = ", ".join(str(r.setup.seed) for r in result.overload)
        lines.append(f"- **Overload**: bench/overload's machinery (`python -m bench.overload` arms "
                     f"`{HIGH}` and `{HIGH_FANOUT}`, each started fresh per load): "
                     f"{'; '.join(c.cell.key for c in first.cells)}; {count} round{'s' if count > 1 else ''} of "
                     f"every point (trace seeds {seeds}; both arms of a round replay the same arrivals, "
                     "and every other round runs the fan-out arm first), judged on the goodput summed over the "
                     f"rounds; time scale {setup.time_scale:g}, "
                     f"{setup.duration_s:g} s measured after a warm-up of whole requests (`X-Fanout: off` on both "
                     f"arms, so both start the trace having learned from the same requests) and "
                     f"{setup.preroll_s:g} s pre-roll, service noise σ = "
                     f"{setup.jitter:g}, upstream's semaphores in every backend, deadlines = the SLO "
                     f"(`{setup.slo}`), priors 2× the true model. Goodput = work (solo-service seconds) answered "
                     "200 within its SLO inside the window, per backend-second, as bench/overload counts it. "
                     "`split`: requests the sidecar split over the whole run (warm-up and pre-roll included), read "
                     "from its /metrics at the end; `whole: pressure/busy`: requests it ran whole because it had "
                     "turned work away lately or had fewer than 2 slots free (`off`: fan-out not enabled).")
    return lines


def config_lines(result: FanoutResult) -> list[str]:
    shown: list[tuple[str, str]] = []
    if result.idle:
        shown.append((f"idle pool ({HIGH_FANOUT}, X-Fanout per request)", result.idle.config_yaml))
    seen: set[str] = set()
    for cell in result.overload[0].cells if result.overload else []:
        for run in cell.runs:
            if run.config_yaml is not None and run.summary.config not in seen:
                seen.add(run.summary.config)
                shown.append((f"{run.summary.config} (overload, ports of its first run)", run.config_yaml))
    lines: list[str] = []
    for title, body in shown:
        lines += [f"<details><summary>{title}</summary>", "", "```yaml", body.rstrip(), "```", "", "</details>", ""]
    return lines


def render_markdown(result: FanoutResult, verdicts: Sequence[Verdict]) -> str:
    count = {label: sum(1 for v in verdicts if v.met is value)
             for label, value in (("met", True), ("not met", False), ("missing", None))}
    machine = ", ".join(f"{k} {v}" for k, v in result.machine.items())
    lines = ["# Fan-out: long texts split across free backends", "", f"Reproduce: `{result.command}`", "",
             f"This run took {result.wall_s / 60:.1f} min on {machine}.", "", *setup_lines(result), "",
             "## Verdicts", "",
             f"{count['met']} met, {count['not met']} not met, {count['missing']} missing.", "",
             *verdict_table(verdicts), ""]
    for part, why in result.skipped.items():
        lines += [f"**{part} skipped**: {why}", ""]
    if result.idle:
        lines += ["## Idle pool", "", "Seconds at the client, over valid answers; pieces: the `X-Fanout-Pieces` "
                  "values seen.", "", *idle_table(result.idle.samples), "", *invalid_lines(result.idle.samples),
                  *model_lines(result.idle),
                  f"![idle latency]({LATENCY_PLOT})", "", f"![time to first audio byte]({TTFB_PLOT})", ""]
    if result.overload:
        lines += ["## Overload", "", "Goodput and offered in work per backend-second; latency in seconds over 200 "
                  "answers; refused = 429/503, late = 408, after the SLO or no answer.", "",
                  *overload_table(result.overload), "", f"![goodput ratio]({GOODPUT_PLOT})", ""]
        for cell in result.overload[0].cells:
            lines += [f"**{cell.cell.key}: {arm} skipped**: {why}" for arm, why in cell.skipped.items()]
    lines += ["## Configurations", "", "Each sidecar's whole file as it ran (the benchmark adds `tasks.state_dir` "
              "in the run's temporary directory and an admin token to read the queue).", "", *config_lines(result)]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------


def plot_idle_latency(samples: Sequence[Sample], path: Path) -> None:
    """Median latency per idle arm, the p90 as the error bar's top."""
    stats = [arm_stats(arm.name, samples) for arm in IDLE_ARMS]
    fig = Figure(figsize=(9.0, 4.0))
    ax = fig.subplots()
    medians = [s.latency_p50 or 0.0 for s in stats]
    above = [max(0.0, (s.latency_p90 or 0.0) - (s.latency_p50 or 0.0)) for s in stats]
    ax.bar(range(len(stats)), medians, yerr=[[0.0] * len(stats), above], capsize=3,
           color=["tab:blue" if "on" in s.arm.split() or "stream" in s.arm else "tab:grey" for s in stats])
    ax.set_xticks(range(len(stats)), [s.arm for s in stats], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("latency at the client, s (bar: median, line: p90)")
    ax.set_title("Idle pool: whole answer", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_ttfb(samples: Sequence[Sample], path: Path) -> None:
    """Every streamed request's first-byte time and total, against the short text's median latency
    and the target (TTFB_TARGET × it)."""
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    for i, arm in enumerate(STREAM_ARMS):
        ok = [s for s in samples if s.arm == arm and s.valid]
        ax.scatter([i - 0.1] * len(ok), [s.ttfb_s or 0.0 for s in ok], marker="o", color="tab:blue",
                   label="first byte" if i == 0 else None)
        ax.scatter([i + 0.1] * len(ok), [s.latency_s for s in ok], marker="x", color="tab:grey",
                   label="last byte" if i == 0 else None)
    short = arm_stats(SHORT, samples).latency_p50
    if short is not None:
        ax.axhline(short, color="tab:green", linestyle="--", linewidth=1, label=f"{SHORT} median")
        ax.axhline(TTFB_TARGET * short, color="tab:red", linestyle=":", linewidth=1,
                   label=f"target: {TTFB_TARGET:g}× that")
    ax.set_xticks(range(len(STREAM_ARMS)), STREAM_ARMS, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds from send (log)")
    ax.set_title("Streamed 500-character text on an idle pool", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_goodput_ratio(rounds: Sequence[BenchResult], path: Path) -> None:
    """Goodput with fan-out / without per trace and load, summed over the rounds (bars) and of each
    round (dots), against the target."""
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    labels: list[str] = []
    ratios: list[float] = []
    for trace in traces(rounds):
        for load in sorted({r.summary.load for cell in _cells(rounds, trace) for r in cell.runs}):
            each = [r for r in round_ratios(rounds, trace, load) if r is not None]
            ax.scatter([len(ratios)] * len(each), each, color="black", s=12, zorder=3,
                       label="one round" if not labels else None)
            labels.append(f"{trace} {load:g}×")
            ratios.append(goodput_ratio(rounds, trace, load) or 0.0)
    ax.bar(range(len(ratios)), ratios, color="tab:blue", label="all rounds")
    ax.axhline(GOODPUT_TARGET, color="tab:red", linestyle=":", linewidth=1, label=f"target {GOODPUT_TARGET:g}")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(f"goodput {HIGH_FANOUT} / {HIGH}")
    ax.set_title("Overload: work goodput with fan-out relative to without", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --- JSON and files ---------------------------------------------------------------------------


def _overload_json(rounds: Sequence[BenchResult]) -> dict[str, Any]:
    return {"rounds": [_round_json(r) for r in rounds],
            "goodput_ratio": {trace: {f"{load:g}": goodput_ratio(rounds, trace, load) for load in VERDICT_LOADS}
                              for trace in traces(rounds)}}


def _round_json(result: BenchResult) -> dict[str, Any]:
    return {"setup": asdict(result.setup), "wall_s": result.wall_s,
            "cells": [{"key": c.cell.key, "trace": c.cell.trace, "backends": c.cell.backends, "skipped": c.skipped,
                       "mean_work_s": c.mean_work_s,
                       "runs": [{"arm": r.summary.config, "load": r.summary.load, "wall_s": r.wall_s,
                                 "config_yaml": r.config_yaml, "slots": r.slots, "fanout": r.fanout,
                                 "summary": {**asdict(r.summary), "offered": r.summary.offered}} for r in c.runs],
                       "goodput_ratio": {f"{load:g}": cell_ratio(c, load) for load in VERDICT_LOADS}}
                      for c in result.cells]}


def to_json(result: FanoutResult, verdicts: Sequence[Verdict]) -> dict[str, Any]:
    idle = result.idle
    return {
        "command": result.command, "wall_s": result.wall_s, "machine": result.machine, "skipped": result.skipped,
        "verdicts": [asdict(v) for v in verdicts],
        "idle": None if idle is None else {
            "time_scale": idle.time_scale, "backends": idle.backends, "reps": idle.reps, "wall_s": idle.wall_s,
            "config_yaml": idle.config_yaml, "model_speedup": idle.model_speedup,
            "stats": [asdict(arm_stats(a.name, idle.samples)) for a in IDLE_ARMS],
            "samples": [asdict(s) for s in idle.samples]},
        "overload": _overload_json(result.overload) if result.overload else None,
    }


def write_report(result: FanoutResult, out_dir: Path) -> Path:
    """Write fanout.md, fanout.json and the plots into `out_dir`; return the Markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    verdicts = all_verdicts(result)
    if result.idle:
        plot_idle_latency(result.idle.samples, out_dir / LATENCY_PLOT)
        plot_ttfb(result.idle.samples, out_dir / TTFB_PLOT)
    if result.overload:
        plot_goodput_ratio(result.overload, out_dir / GOODPUT_PLOT)
    (out_dir / DATA).write_text(json.dumps(to_json(result, verdicts), indent=2, ensure_ascii=False) + "\n")
    report = out_dir / REPORT
    report.write_text(render_markdown(result, verdicts))
    return report
