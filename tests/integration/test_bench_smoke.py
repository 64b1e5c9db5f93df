"""The overload benchmark runs end to end (its --smoke size, every arm) and writes a complete report."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.loadgen import Record
from bench.nginx import nginx_binary
from bench.overload import ARMS, SMOKE, run
from bench.overload_report import CDF_PLOT, GOODPUT_PLOT, MAIN_COLUMNS, VERDICT_COLUMNS, write_report
from bench.summary import FAILURE_KINDS, failure_kind, jain_index, max_min_fair, percentile
from tests.support import pid_gone, wait_until

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def markdown_table(markdown: str, columns: tuple[str, ...] = MAIN_COLUMNS) -> list[list[str]]:
    """The rows of the report's table headed by ``columns``, as stripped cells."""
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
    return None if cell in ("–", "n/a") else float(cell.rstrip("×"))


@pytest.mark.timeout(180)
def test_smoke_benchmark_reports_every_arm_and_load_and_leaves_no_process(tmp_path: Path) -> None:
    result = run(SMOKE, command="python -m bench.overload --smoke", progress=False)
    report = write_report(result, tmp_path)
    text = report.read_text()

    if nginx_binary() is not None:
        assert "nginx" not in result.skipped, result.skipped
    assert set(result.skipped) <= {"nginx"}, result.skipped  # every sidecar arm runs on this sidecar
    arms = [a for a in ARMS if a not in result.skipped]
    rows = markdown_table(text)
    assert {(r[0], r[1]) for r in rows} == {(a, f"{load:g}×") for a in arms for load in SMOKE.loads}, text
    for row in rows:
        assert len(row) == len(MAIN_COLUMNS), row
        values = dict(zip(MAIN_COLUMNS, row, strict=True))
        offered, goodput = float(values["offered req/s"]), float(values["goodput req/s"])
        assert offered > 0 and 0 <= goodput <= offered, row
        assert float(values["goodput % of capacity"]) >= 0, row
        assert 0 <= float(values["goodput % of best"]) <= 100, row
        assert int(values["not OK"]) >= 0, row
        for column in ("short p50 s", "short p99 s", "long p50 s", "long p99 s", "orphaned backend s"):
            _number(values[column])  # parses, or is explicitly absent
        jain = _number(values["Jain"])
        assert jain is None or 1 / 3 - 1e-9 <= jain <= 1 + 1e-9, row
    lowest = [r for r in rows if r[1] == f"{min(SMOKE.loads):g}×"]
    assert all(float(r[3]) > 0 for r in lowest), "nothing was served at the lowest load"

    verdict = markdown_table(text, VERDICT_COLUMNS)
    assert len(verdict) == 3, text
    assert text.index("## Verdict") < text.index("## Setup")
    assert all(row[3] in ("yes", "**no**", "not measured") for row in verdict), verdict
    if "nginx" not in result.skipped:
        assert all(row[3] != "not measured" for row in verdict), verdict
    assert all(r.slots for r in result.runs if r.summary.config != "nginx"), [r.slots for r in result.runs]
    assert "Slots per backend" in text
    failures = markdown_table(text, ("arm", "load", "requests", "200 OK", *FAILURE_KINDS))
    for row in failures:
        assert int(row[2]) == int(row[3]) + sum(int(c) for c in row[4:]), row

    assert "Reproduce: `python -m bench.overload --smoke`" in text
    for plot in (CDF_PLOT, GOODPUT_PLOT):
        assert f"]({plot})" in text
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC
    assert "Per length class" in text and "Per tenant" in text
    assert (tmp_path / "overload.json").is_file()

    pids = [pid for r in result.runs for pid in r.pids]
    assert len(pids) == len(result.runs) * (1 + SMOKE.backends)  # the sidecar or nginx, and the backends
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
