"""bench.audio_formats --smoke writes a report measuring every format this machine can encode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.audio_formats import DOCS_BEGIN, DOCS_END, RATES, SMOKE, docs_table, main, write_docs
from glmtts.audio import FORMATS, available


def test_the_smoke_run_reports_every_available_format_at_both_rates(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "audio_formats.json").read_text())
    report = (tmp_path / "audio_formats.md").read_text()
    assert capsys.readouterr().out == report

    usable = [fmt for fmt in FORMATS if available(fmt) is None]
    assert [(c["format"], c["rate"]) for c in data["cells"]] == [(f, r) for f in usable for r in RATES]
    assert data["unavailable"] == {f: available(f) for f in FORMATS if f not in usable}
    assert data["command"] == f"python -m bench.audio_formats --smoke --out {tmp_path}"
    assert data["cpu_model"] and data["versions"]["soundfile"] != "not installed"
    for cell in data["cells"]:
        samples = cell["cpu_s_per_audio_s"]
        assert len(samples) == SMOKE.repetitions and all(s >= 0 for s in samples)
        assert min(samples) <= cell["median"] <= cell["p90"] <= max(samples)
        assert f"| {cell['format']} | {cell['rate']} | {1000 * cell['median']:.2f} |" in report
    by_cell = {(c["format"], c["rate"]): c for c in data["cells"]}
    for rate in RATES:  # sizes are the encoder's real output: wav is the samples plus its 44-byte header
        wav = by_cell["wav", rate]
        assert wav["bytes"] == 2 * round(wav["audio_s"] * rate) + 44
        assert by_cell["pcm", rate]["bytes_per_audio_s"] == pytest.approx(48000, rel=1e-3)  # always 24 kHz
        assert by_cell["flac", rate]["bytes"] < wav["bytes"]
    for why in data["unavailable"].values():
        assert why in report


def test_the_docs_table_is_the_committed_reports_figures() -> None:
    """docs/openai.md's format table is rendered from bench/reports/audio_formats.json, never typed."""
    root = Path(__file__).resolve().parents[2]
    data = json.loads((root / "bench/reports/audio_formats.json").read_text())
    docs = (root / "docs/openai.md").read_text()
    assert docs_table(data) in docs
    for cell in data["cells"]:
        assert f"{1000 * cell['median']:.2f}" in docs_table(data)


def test_write_docs_replaces_only_the_marked_table(tmp_path: Path) -> None:
    data = {"command": "python -m bench.audio_formats", "cpu_model": "cpu", "unavailable": {"aac": "no av"},
            "cells": [{"format": "mp3", "rate": 24000, "median": 0.0065, "bytes_per_audio_s": 5000.0}]}
    page = tmp_path / "page.md"
    page.write_text(f"before\n{DOCS_BEGIN}\nold table\n{DOCS_END}\nafter\n")
    write_docs(page, data)
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old table" not in text
    assert "| mp3 | 6.50 | 40 |" in text and "Not measured there: aac (no av)." in text
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no audio-formats table markers"):
        write_docs(page, data)
