"""The overload benchmark runs end to end (its --smoke size) and writes a complete report."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.overload import CONFIGS, SMOKE, run
from bench.overload_report import CDF_PLOT, GOODPUT_PLOT, MAIN_COLUMNS, write_report
from bench.summary import jain_index, max_min_fair, percentile
from tests.support import pid_gone, wait_until

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main_table(markdown: str) -> list[list[str]]:
    lines = markdown.splitlines()
    header = "| " + " | ".join(MAIN_COLUMNS) + " |"
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


@pytest.mark.timeout(150)
def test_smoke_benchmark_reports_every_config_and_load_and_leaves_no_process(tmp_path: Path) -> None:
    result = run(SMOKE, command="python -m bench.overload --smoke", progress=False)
    report = write_report(result, tmp_path)
    text = report.read_text()

    rows = _main_table(text)
    assert {(r[0], r[1]) for r in rows} == {(c, f"{load:g}×") for c in CONFIGS for load in SMOKE.loads}, text
    for row in rows:
        assert len(row) == len(MAIN_COLUMNS), row
        values = dict(zip(MAIN_COLUMNS, row, strict=True))
        offered, goodput = float(values["offered req/s"]), float(values["goodput req/s"])
        assert offered > 0 and 0 <= goodput <= offered, row
        assert float(values["goodput % of capacity"]) >= 0, row
        assert int(values["rejected"]) >= 0, row
        for column in ("short p50 s", "short p99 s", "long p50 s", "long p99 s", "orphaned backend s"):
            _number(values[column])  # parses, or is explicitly absent
        jain = _number(values["Jain"])
        assert jain is None or 1 / 3 - 1e-9 <= jain <= 1 + 1e-9, row
    lowest = [r for r in rows if r[1] == f"{min(SMOKE.loads):g}×"]
    assert all(float(r[3]) > 0 for r in lowest), "nothing was served below capacity"

    assert "Reproduce: `python -m bench.overload --smoke`" in text
    for plot in (CDF_PLOT, GOODPUT_PLOT):
        assert f"]({plot})" in text
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC
    assert "Per length class" in text and "Per tenant" in text
    assert (tmp_path / "overload.json").is_file()

    pids = [pid for r in result.runs for pid in r.pids]
    assert len(pids) == len(result.runs) * (1 + SMOKE.backends)
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
