"""The scale-out benchmark's pure parts: the split arm's sidecar configs, its plan, the request
accounting, the verdict and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import overload, scaleout
from bench.loadgen import Arrival, Record
from bench.overload_spec import HIGH, TENANTS, BenchResult, Cell, CellResult, RunResult, Setup
from bench.scaleout import SMOKE, Runner, ShardCell, make_plan, parser, shard_yaml
from bench.scaleout_report import (
    ACCOUNT_COLUMNS,
    CDF_PLOT,
    CLASS_PLOT,
    DATA,
    RATIO_PLOT,
    REPORT,
    SINGLE,
    SPLIT,
    ScaleoutResult,
    account,
    describe,
    label,
    proxy_error,
    verdicts,
    write_report,
)
from bench.summary import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL = Cell(backends=4, trace="mix", curve="default", arms=(SINGLE, SPLIT), loads=(1.3, 2.5), oracle_loads=())


def _backends(text: str) -> dict[str, object]:
    section = yaml.safe_load(text)["backends"]
    assert isinstance(section, dict)
    return section


# --- the arms' configurations -----------------------------------------------------------------

def test_the_split_sidecars_share_out_the_single_sidecars_gpus_and_seeds() -> None:
    setup = Setup(time_scale=0.05)
    single = overload.sidecar_yaml(HIGH, setup, CELL, port=9000, base_port=9100)
    shards = [shard_yaml(setup, CELL, s, port=9001 + s, base_port=9200 + 10 * s) for s in range(2)]
    assert [_backends(t)["gpus"] for t in shards] == [["0", "1"], ["2", "3"]]
    assert _backends(single)["gpus"] == ["0", "1", "2", "3"]

    def seeds(text: str) -> list[str]:
        section = _backends(text)
        command = section["command"]
        assert isinstance(command, list)
        template = command[command.index("--seed") + 1]
        gpus = section["gpus"]
        assert isinstance(gpus, list)
        return [template.format(gpu=gpu, index=index) for index, gpu in enumerate(gpus)]

    # Every emulator keeps the GPU id and jitter seed it has behind the single sidecar.
    assert seeds(shards[0]) + seeds(shards[1]) == seeds(single) == ["0", "1", "2", "3"]


def test_a_split_sidecar_is_sidecar_high_with_only_its_share_of_the_pool() -> None:
    setup = Setup(time_scale=0.05)
    two = Cell(backends=2, trace="mix", curve="default", arms=(HIGH,), loads=(1.3,), oracle_loads=())
    reference = yaml.safe_load(overload.sidecar_yaml(HIGH, setup, two, port=9001, base_port=9200))
    shard = yaml.safe_load(shard_yaml(setup, CELL, 1, port=9001, base_port=9200))
    assert set(shard) == set(reference)
    for key in set(reference) - {"backends"}:
        assert shard[key] == reference[key], key
    assert {k: v for k, v in shard["backends"].items() if k not in ("gpus", "command")} == \
        {k: v for k, v in reference["backends"].items() if k not in ("gpus", "command")}
    seed = reference["backends"]["command"].index("{index}")
    assert shard["backends"]["command"][:seed] == reference["backends"]["command"][:seed]


def test_a_shard_cell_numbers_its_gpus_from_its_first() -> None:
    part = ShardCell(backends=2, trace="mix", curve="default", arms=(HIGH,), loads=(1.3,), oracle_loads=(),
                     first_gpu=2)
    assert part.gpus == ["2", "3"]
    assert CELL.gpus == ["0", "1", "2", "3"]


def test_the_default_plan_is_both_traces_at_13_and_25_on_four_backends() -> None:
    plan = make_plan(parser().parse_args([]))
    assert [c.trace for c in plan.cells] == ["mix", "bimodal"]
    assert all(c.backends == 4 and c.loads == (1.3, 2.5) and c.arms == (SINGLE, SPLIT) for c in plan.cells)
    assert plan.setup.time_scale == 0.05 and plan.setup.duration_s == 60.0
    assert plan.runs == 8
    # The arms alternate load by load, so both see the machine in the same state.
    assert plan.cells[0].points() == [(SINGLE, 1.3), (SPLIT, 1.3), (SINGLE, 2.5), (SPLIT, 2.5)]
    assert make_plan(parser().parse_args(["--smoke"])) is SMOKE and SMOKE.runs == 2
    assert make_plan(parser().parse_args(["--traces", "bimodal", "--loads", "2.5"])).runs == 2


def test_every_arm_is_described_and_no_other() -> None:
    assert "one sidecar" in describe(SINGLE) and "nginx" in describe(SPLIT)
    with pytest.raises(ValueError):
        describe("3x1")


# --- every request counted --------------------------------------------------------------------

def _record(status: int | None, *, reason: str | None = None, success: bool | None = None,
            backend: str | None = None, chars: int = 20, latency: float = 0.1, at: float = 0.0) -> Record:
    return Record(tenant="heavy", cls="short", chars=chars, intended_s=at, send_lag_s=0.0, latency_s=latency,
                  status=status, reason=reason, success=success, backend=backend, units=float(chars))


def test_an_answer_nginx_made_itself_is_told_from_a_sidecars() -> None:
    assert proxy_error(_record(502))  # no reason, no backend: nginx's own
    assert proxy_error(_record(503))  # the outer config's error_page for 502/504
    assert proxy_error(_record(429))  # its limit_req
    assert not proxy_error(_record(502, reason="backend_failed"))  # the sidecar's
    assert not proxy_error(_record(503, reason="no_backend"))
    assert not proxy_error(_record(429, reason="deadline_unmeetable"))
    assert not proxy_error(_record(503, backend="gpu0-0"))  # upstream's, forwarded
    assert not proxy_error(_record(500))  # nginx makes no 500 here
    assert not proxy_error(_record(None, reason="timeout"))


def test_every_request_is_accounted_once() -> None:
    records = [_record(200, success=True, backend="gpu0-0"), _record(200, success=False, backend="gpu1-0"),
               _record(429, reason="deadline_unmeetable"), _record(503, reason="draining"), _record(408),
               _record(400, reason="bad_request"), _record(502, reason="backend_failed"), _record(502),
               _record(None, reason="timeout")]
    counts = account(records)
    assert list(counts) == list(ACCOUNT_COLUMNS[6:])
    assert set(counts.values()) == {1} and sum(counts.values()) == len(records)


def test_a_run_that_loses_a_record_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    trace = [Arrival(0.1 * i, "heavy", "从前有座山", 5, "short") for i in range(3)]

    def lossy(*args: object) -> overload.Ran:
        return overload.Ran(records=[_record(200, success=True)] * 2, orphaned=None, pids=[], config_yaml="x: 1\n")

    monkeypatch.setattr(overload, "run_sidecar", lossy)
    runner = Runner()
    with pytest.raises(RuntimeError, match="3 arrivals sent but 2 recorded"):
        runner(SINGLE, Setup(), CELL, trace, "label", Path("/nonexistent"), False)
    with pytest.raises(ValueError, match="unknown arm"):
        runner("3x1", Setup(), CELL, trace, "label", Path("/nonexistent"), False)

    def whole(*args: object) -> overload.Ran:
        return overload.Ran(records=[_record(200, success=True)] * 3, orphaned=None, pids=[], config_yaml="x: 1\n")

    monkeypatch.setattr(overload, "run_sidecar", whole)
    assert len(runner(SINGLE, Setup(), CELL, trace, "label", Path("/nonexistent"), False).records) == 3
    assert (runner.sent, runner.recorded) == (3, 3) and runner.files == {f"{SINGLE}: the sidecar": "x: 1\n"}


# --- verdict and report -----------------------------------------------------------------------

def _run(arm: str, load: float, *, good: int, late: int = 0, nginx_errors: int = 0) -> RunResult:
    """`good` short answers in SLO, `late` long ones after it, `nginx_errors` 502 pages."""
    records = [_record(200, success=True, backend="gpu0-0", latency=0.1 + 0.01 * i, at=0.1 * i) for i in range(good)]
    records += [_record(200, success=True, backend="gpu1-0", chars=300, latency=5.0) for _ in range(late)]
    records += [_record(502) for _ in range(nginx_errors)]
    summary = summarize(records, config=arm, load=load, backends=4, duration_s=10.0,
                        slo_s=lambda chars: 1.0, work_s=lambda u: u / 20, weights={t.name: t.weight for t in TENANTS})
    return RunResult(summary=summary, records=records, pids=[1], wall_s=3.0)


def _result(runs: list[RunResult], trace: str = "mix") -> ScaleoutResult:
    cell = Cell(backends=4, trace=trace, curve="default", arms=(SINGLE, SPLIT), loads=(1.3, 2.5), oracle_loads=())
    bench = BenchResult(setup=Setup(time_scale=0.05), wall_s=60.0, command="python -m bench.scaleout --traces mix",
                        cells=[CellResult(cell=cell, mean_work_s=0.5, runs=runs)])
    sent = {label(trace, r.summary.config, r.summary.load): len(r.records) + 4 for r in runs}
    return ScaleoutResult(bench=bench, machine={"CPUs": 2}, proxy="the outer nginx",
                          files={f"{SINGLE}: the sidecar": "listen: {port: 1}\n",
                                 f"{SPLIT}: the outer nginx.conf": "upstream sidecars { least_conn; }\n"},
                          sent=sent, recorded=dict(sent))


def test_the_verdict_is_the_goodput_ratio_against_09_per_trace_and_load() -> None:
    result = _result([_run(SINGLE, 1.3, good=20), _run(SPLIT, 1.3, good=19), _run(SINGLE, 2.5, good=20),
                      _run(SPLIT, 2.5, good=17, nginx_errors=3)])
    low, high = verdicts(result.bench)
    assert low.ratio == pytest.approx(0.95) and low.met is True
    assert high.ratio == pytest.approx(0.85) and high.met is False
    assert high.name == f"mix at 2.5×: goodput {SPLIT} / {SINGLE}"


def test_a_missing_run_or_no_goodput_leaves_the_verdict_open() -> None:
    low, high = verdicts(_result([_run(SINGLE, 1.3, good=0, late=2), _run(SPLIT, 1.3, good=5),
                                  _run(SINGLE, 2.5, good=5)]).bench)
    assert low.met is None and low.ratio is None and "no goodput" in low.note
    assert high.met is None and high.note == f"no run: {SPLIT} 2.5×"


def test_the_report_shows_the_measured_figures_every_request_configs_and_plots(tmp_path: Path) -> None:
    runs = [_run(SINGLE, 1.3, good=20, late=2), _run(SPLIT, 1.3, good=19, late=2), _run(SINGLE, 2.5, good=20),
            _run(SPLIT, 2.5, good=17, nginx_errors=3)]
    result = _result(runs)
    text = write_report(result, tmp_path).read_text()
    assert (tmp_path / REPORT).read_text() == text
    data = json.loads((tmp_path / DATA).read_text())
    assert "Reproduce: `python -m bench.scaleout --traces mix`" in text
    for v in data["verdicts"]:
        shown = "–" if v["ratio"] is None else f"{v['ratio']:.2f}"
        assert f"| {v['name']} | {v['single']:.3f} | {v['split']:.3f} | {shown} | ≥ 0.9 |" in text
    assert [v["met"] for v in data["verdicts"]] == [True, False]
    (cell,) = data["cells"]
    for run in cell["runs"]:
        assert sum(run["account"].values()) == run["summary"]["requests"] == run["sent"] - 4
    errors = next(r for r in cell["runs"] if r["arm"] == SPLIT and r["load"] == 2.5)["account"]["nginx's own"]
    assert errors == 3
    assert f"| mix | {SPLIT} | 2.5× | 24 | 24 | 20 | 17 | 0 | 0 | 0 | 0 | 0 | 0 | 3 | 0 |" in text
    p99 = next(r for r in cell["runs"] if r["arm"] == SINGLE and r["load"] == 1.3)["p99_by_class"]["long"]
    assert p99 == pytest.approx(5.0) and "| mix | 1.3× | long |" in text
    assert "listen: {port: 1}" in text and "```nginx\nupstream sidecars { least_conn; }" in text
    assert text.index("## Verdict") < text.index("## Per class") < text.index("## Every request") \
        < text.index("## Configurations")
    for plot in (RATIO_PLOT, CLASS_PLOT, CDF_PLOT):
        assert f"]({plot})" in text
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC


def test_the_module_names_its_arms_as_the_report_does() -> None:
    assert scaleout.SMOKE.cells[0].arms == (SINGLE, SPLIT) == ("1x4", "2x2")
