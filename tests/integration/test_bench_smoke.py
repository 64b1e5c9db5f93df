"""The overload, fan-out and scale-out benchmarks run end to end (their --smoke sizes) and write reports whose
figures are the JSON's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench import fanout, fanout_report, scaleout, scaleout_report
from bench.loadgen import Record
from bench.nginx import nginx_binary
from bench.overload import run
from bench.overload_report import (
    CDF_PLOT,
    DIGITS,
    GOODPUT_PLOT,
    MAIN_COLUMNS,
    SUMMARIES,
    VERDICT_COLUMNS,
    write_report,
)
from bench.overload_spec import HIGH, HIGH_FANOUT, SMOKE
from bench.summary import CLASSES, FAILURE_KINDS, failure_kind, jain_index, max_min_fair, percentile
from tests.support import pid_gone, wait_until

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def markdown_table(markdown: str, columns: tuple[str, ...] = MAIN_COLUMNS) -> list[list[str]]:
    """The rows of the report's first table headed by ``columns``, as stripped cells."""
    lines = markdown.splitlines()
    header = "| " + " | ".join(columns) + " |"
    start = lines.index(header) + 2  # past the header and the --- row
    rows: list[list[str]] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _number(cell: str) -> float | None:
    """A numeric cell; "–" (no sample) and "n/a" (not reported) are None."""
    return None if cell in ("–", "n/a") else float(cell.split()[-1].rstrip("×"))


def _same(cell: str, value: float | None, digits: int) -> bool:
    """The table cell shows the JSON's `value` rounded to `digits`."""
    shown = _number(cell)
    if value is None or shown is None:
        return shown is None and value is None
    return bool(abs(shown - value) <= 0.5 * 10 ** -digits + 1e-9)


def _expected_cells(summary: dict[str, Any]) -> dict[str, tuple[float | None, int]]:
    """Each numeric column of the main table: (the JSON's value, digits shown)."""
    cells: dict[str, tuple[float | None, int]] = {"offered": (summary["offered"], 3),
                                                  "goodput": (summary["goodput"], 3),
                                                  "refused + late % of work": (summary["refused_late_work_pct"], 1),
                                                  "Jain": (summary["jain"], 3),
                                                  "orphaned backend s": (summary["orphaned_backend_s"], 2)}
    for c in CLASSES:
        offered = summary["class_requests"][c]
        cells[f"goodput {c}"] = (summary["class_goodput"][c] if offered else None, 3)
        cells[f"in SLO {c} %"] = (summary["in_slo_pct"][c], 1)
        cells[f"p50 {c} s"] = (summary["latency_s"][c][0], 3)
        cells[f"p99 {c} s"] = (summary["latency_s"][c][1], 3)
    return cells


# The whole overload benchmark at its smoke size: a sidecar, nginx and emulators for most of a minute.
@pytest.mark.slow
@pytest.mark.xdist_group("serial")
@pytest.mark.timeout(150)
def test_smoke_benchmark_reports_from_its_json_and_leaves_no_process(tmp_path: Path) -> None:
    result = run(SMOKE, command="python -m bench.overload --smoke", progress=False)
    report = write_report(result, tmp_path)
    text = report.read_text()
    data = json.loads((tmp_path / SUMMARIES).read_text())
    (cell,) = SMOKE.cells
    (cell_json,) = data["cells"]

    skipped = result.cells[0].skipped
    if nginx_binary() is not None:
        assert "nginx" not in skipped, skipped
    assert set(skipped) <= {"nginx"}, skipped  # every sidecar arm runs on this sidecar
    planned = {(arm, f"{load:g}×") for arm, load in cell.points() if arm not in skipped}
    rows = markdown_table(text)
    assert {(r[0], r[1]) for r in rows} == planned, text
    runs = {(r["arm"], f"{r['load']:g}×"): r for r in cell_json["runs"]}
    for row in rows:
        assert len(row) == len(MAIN_COLUMNS), row
        values = dict(zip(MAIN_COLUMNS, row, strict=True))
        summary = runs[(row[0], row[1])]["summary"]
        for column, (value, digits) in _expected_cells(summary).items():
            assert _same(values[column], value, digits), (row[0], row[1], column, values[column], value)
        assert summary["offered"] > 0 and summary["goodput"] >= 0, summary
        jain = summary["jain"]
        assert jain is None or 1 / 3 - 1e-9 <= jain <= 1 + 1e-9, row
    lowest = f"{min(cell.loads):g}×"
    assert all(runs[(a, load)]["summary"]["goodput"] > 0 for a, load in planned if load == lowest), \
        "nothing was served at the lowest load"
    assert all(r.slots for r in result.cells[0].runs if r.summary.config != "nginx")

    verdicts = markdown_table(text, VERDICT_COLUMNS)
    assert len(verdicts) == len(cell_json["verdicts"]) == 12, text  # sidecar-high on a short + long trace
    for row, verdict in zip(verdicts, cell_json["verdicts"], strict=True):
        assert (row[0], row[2]) == (HIGH, verdict["name"])
        assert _same(row[3], verdict["measured"], DIGITS[verdict["unit"]]), (row, verdict)
        assert row[5] == {None: "–", True: "yes", False: "**no**"}[verdict["met"]], (row, verdict)
        ran = verdict["load"] in cell.loads and not skipped
        assert (verdict["met"] is None) == (not ran), verdict
    assert text.index("## Verdicts") < text.index("## Results") < text.index("## Configurations")
    failures = markdown_table(text, ("arm", "load", "requests", "200 OK", *FAILURE_KINDS, "refused", "late"))
    for row in failures:
        assert int(row[2]) == int(row[3]) + sum(int(c) for c in row[4:-2]), row

    assert "Reproduce: `python -m bench.overload --smoke`" in text
    first: dict[str, str] = {}
    for run_result in result.cells[0].runs:
        if run_result.config_yaml is not None:  # the whole file each sidecar arm ran with (ports of its first run)
            shown = first.setdefault(run_result.summary.config, run_result.config_yaml)
            assert shown.rstrip() in text
            assert re.sub(r"port: \d+", "", run_result.config_yaml) == re.sub(r"port: \d+", "", shown)
    for plot in (CDF_PLOT, GOODPUT_PLOT):
        assert f"]({plot})" in text
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC

    pids = [pid for r in result.cells[0].runs for pid in r.pids]
    assert len(pids) == len(result.cells[0].runs) * (1 + cell.backends)  # the sidecar or nginx, and the backends
    wait_until(lambda: all(pid_gone(pid) for pid in pids), timeout=10, what="benchmark processes to exit")


def test_summary_arithmetic() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    # Demand-capped water filling: the light tenants get what they ask, the heavy one the rest.
    fair = max_min_fair(9.0, {"heavy": 9.0, "a": 2.0, "b": 3.0})
    assert fair == pytest.approx({"heavy": 4.0, "a": 2.0, "b": 3.0})
    assert max_min_fair(6.0, {"x": 6.0, "y": 6.0}, {"x": 2.0, "y": 1.0}) == pytest.approx({"x": 4.0, "y": 2.0})
    assert jain_index([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain_index([3.0, 0.0, 0.0]) == pytest.approx(1 / 3)


def _record(status: int | None, reason: str | None = None, success: bool | None = None) -> Record:
    return Record(tenant="t", cls="short", chars=10, intended_s=0.0, send_lag_s=0.0, latency_s=0.1, status=status,
                  reason=reason, success=success, backend=None)


def test_failures_are_told_apart_by_status_and_reason() -> None:
    assert failure_kind(_record(200, success=True)) is None
    assert failure_kind(_record(429, "queue_full")) == "429 queue full"
    assert failure_kind(_record(429, "tenant_queue_full")) == "429 queue full"
    assert failure_kind(_record(429, "deadline_unmeetable")) == "429 unmeetable"
    assert failure_kind(_record(503, "no_backend")) == "503"
    assert failure_kind(_record(408, "deadline")) == "408"
    assert failure_kind(_record(502, "backend_failed")) == "backend error"
    assert failure_kind(_record(200, success=False)) == "backend error"
    assert failure_kind(_record(None, "timeout")) == "no answer"


# The fan-out benchmark at its smoke size: one idle pool of 4 backends, then sidecar-high with and
# without fan-out at 2.5x on the bimodal trace.
@pytest.mark.slow
@pytest.mark.xdist_group("serial")
@pytest.mark.timeout(150)
def test_fanout_smoke_benchmark_measures_valid_answers_and_reports_them(tmp_path: Path) -> None:
    result = fanout.run(fanout.SMOKE, command="python -m bench.fanout --smoke", progress=False)
    text = fanout_report.write_report(result, tmp_path).read_text()
    data = json.loads((tmp_path / fanout_report.DATA).read_text())
    assert result.skipped == {} and result.idle is not None and result.overload is not None, result.skipped

    samples = {s.arm: s for s in result.idle.samples}
    assert set(samples) == {a.name for a in fanout_report.IDLE_ARMS}
    assert all(s.valid for s in samples.values()), [s for s in samples.values() if not s.valid]
    assert samples[fanout_report.ZH_OFF].pieces in (None, 1)  # not split (the header is optional there)
    assert (samples[fanout_report.ZH_ON].pieces or 0) > 1  # an idle pool of 4 splits a 500-character text
    for arm in fanout_report.STREAM_ARMS:
        ttfb = samples[arm].ttfb_s
        assert ttfb is not None and 0 < ttfb <= samples[arm].latency_s

    assert len(result.overload) == fanout.SMOKE.rounds == 2
    (cell, second), runs = (c for r in result.overload for c in r.cells), []
    for each, order in ((cell, [HIGH, HIGH_FANOUT]), (second, [HIGH_FANOUT, HIGH])):  # the second round reversed
        assert each.skipped == {} and [(r.summary.config, r.summary.load) for r in each.runs] == \
            [(arm, 2.5) for arm in order]
        runs += each.runs
    assert result.overload[1].setup.seed == result.overload[0].setup.seed + 1
    fanout_yaml = next(r.config_yaml for r in cell.runs if r.summary.config == HIGH_FANOUT)
    assert fanout_yaml is not None and "\nfanout: {enabled: true" in fanout_yaml and fanout_yaml.rstrip() in text
    assert all(r.summary.goodput > 0 for r in runs)

    for verdict in data["verdicts"]:
        shown = "–" if verdict["measured"] is None else f"{verdict['measured']:.2f}"
        assert f"| {verdict['name']} | {shown} | {verdict['op']} {verdict['target']:g} |" in text
    assert [v["met"] is None for v in data["verdicts"]] == [False] * 4 + [True, False]  # no 1.3x run in a smoke
    for plot in (fanout_report.LATENCY_PLOT, fanout_report.TTFB_PLOT, fanout_report.GOODPUT_PLOT):
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC

    pids = result.idle.pids + [pid for r in runs for pid in r.pids]
    assert len(pids) == (1 + len(runs)) * (1 + cell.cell.backends)
    wait_until(lambda: all(pid_gone(pid) for pid in pids), timeout=10, what="benchmark processes to exit")


# The scale-out benchmark at its smoke size: one sidecar over 4 backends, then 2 sidecars over 2
# each behind nginx, at 2.5x on the bimodal trace (9 processes at once).
@pytest.mark.slow
@pytest.mark.xdist_group("serial")
@pytest.mark.timeout(150)
def test_scaleout_smoke_benchmark_counts_every_request_and_reports_both_arms(tmp_path: Path) -> None:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed")
    result = scaleout.run(scaleout.SMOKE, command="python -m bench.scaleout --smoke", progress=False)
    text = scaleout_report.write_report(result, tmp_path).read_text()
    data = json.loads((tmp_path / scaleout_report.DATA).read_text())
    (cell,) = result.bench.cells
    assert cell.skipped == {}, cell.skipped
    assert {(r.summary.config, r.summary.load) for r in cell.runs} == \
        {(scaleout_report.SINGLE, 2.5), (scaleout_report.SPLIT, 2.5)}
    assert all(r.summary.goodput > 0 for r in cell.runs)

    for run_json in data["cells"][0]["runs"]:  # nothing lost: one record per arrival, every one accounted
        assert run_json["sent"] == run_json["recorded"] > run_json["summary"]["requests"] > 0, run_json
        assert sum(run_json["account"].values()) == run_json["summary"]["requests"]
    split = next(r for r in cell.runs if r.summary.config == scaleout_report.SPLIT)
    backends = {r.backend for r in split.records if r.backend}
    assert backends == {"gpu0-0", "gpu1-0", "gpu2-0", "gpu3-0"}, backends  # both sidecars served through nginx

    (verdict,) = [v for v in data["verdicts"] if v["load"] == 2.5]
    assert verdict["ratio"] == pytest.approx(verdict["split"] / verdict["single"])
    assert f"| {verdict['name']} | {verdict['single']:.3f} | {verdict['split']:.3f} | {verdict['ratio']:.2f} |" in text
    shards = [body for title, body in result.files.items() if title.startswith(f"{scaleout_report.SPLIT}: sidecar")]
    assert len(shards) == 2 and all(body.rstrip() in text for body in [*shards, *result.files.values()])
    assert 'gpus: ["0", "1"]' in shards[0] and 'gpus: ["2", "3"]' in shards[1]
    assert "least_conn" in result.files[f"{scaleout_report.SPLIT}: the outer nginx.conf"]
    assert "Reproduce: `python -m bench.scaleout --smoke`" in text
    for plot in (scaleout_report.RATIO_PLOT, scaleout_report.CLASS_PLOT, scaleout_report.CDF_PLOT):
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC

    pids = {r.summary.config: r.pids for r in cell.runs}
    assert len(pids[scaleout_report.SINGLE]) == 1 + 4  # the sidecar and its backends
    assert len(pids[scaleout_report.SPLIT]) == 1 + 2 + 4  # nginx, the sidecars and their backends
    everything = [pid for run_pids in pids.values() for pid in run_pids]
    wait_until(lambda: all(pid_gone(pid) for pid in everything), timeout=10, what="benchmark processes to exit")
