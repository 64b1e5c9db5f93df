"""The overload benchmark's arithmetic: work goodput, SLOs and the sidecar's tiers, traces, plan, verdicts."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from bench.loadgen import BIMODAL_MIX, LENGTH_MIX, MIXES, Record, Tenant, make_trace
from bench.overload import make_plan, parser, sidecar_yaml, warm_up
from bench.overload_report import GE, LE, Verdict, arm_verdicts, cell_classes, flat_verdicts, judge, oracle
from bench.overload_spec import (
    ARMS,
    FLAT_ARMS,
    HIGH,
    LOW,
    NGINX,
    ORACLES,
    SEED,
    SLOTS1,
    Cell,
    Setup,
    arrival_rate,
    slo_s,
)
from bench.summary import RunSummary, length_class, summarize
from glmtts.emulator.timing import BASE_S, PER_UNIT_S, ServiceModel

WEIGHTS = {"a": 1.0, "b": 1.0}


def _record(*, chars: int = 20, units: float = 1.0, latency: float = 0.1, status: int | None = 200,
            success: bool | None = True, reason: str | None = None, tenant: str = "a", at: float = 0.0) -> Record:
    return Record(tenant=tenant, cls=length_class(chars), chars=chars, intended_s=at, send_lag_s=0.0,
                  latency_s=latency, status=status, reason=reason, success=success, backend=None, units=units)


def _summarize(records: list[Record], **kwargs: object) -> RunSummary:
    options: dict[str, object] = {"config": "x", "load": 1.0, "backends": 2, "duration_s": 10.0,
                                  "slo_s": lambda chars: 1.0, "work_s": lambda u: u, "weights": WEIGHTS}
    options.update(kwargs)
    return summarize(records, **options)  # type: ignore[arg-type]


# --- summary: work goodput, SLO attainment, refusals, fairness ---------------------------------

def test_goodput_is_work_per_backend_second_by_class() -> None:
    records = [_record(chars=20, units=4.0), _record(chars=100, units=6.0), _record(chars=400, units=10.0)]
    s = _summarize(records)
    assert s.goodput == pytest.approx(20.0 / (2 * 10.0))
    assert s.class_goodput == pytest.approx({"short": 0.2, "medium": 0.3, "long": 0.5})
    assert s.offered == pytest.approx(s.goodput)
    assert s.in_slo_pct == {"short": 100.0, "medium": 100.0, "long": 100.0}
    assert (s.refused, s.late, s.refused_late_work_pct) == (0, 0, 0.0)


def test_a_late_answer_counts_neither_in_goodput_nor_in_slo() -> None:
    s = _summarize([_record(units=3.0, latency=0.5), _record(units=1.0, latency=1.5)])
    assert s.goodput == pytest.approx(3.0 / 20.0)
    assert s.class_in_slo["short"] == 1 and s.in_slo_pct["short"] == pytest.approx(50.0)
    assert s.late == 1 and s.refused == 0
    assert s.refused_late_work_pct == pytest.approx(25.0)
    assert s.latency_s["short"][1] is not None  # still a 200 answer for the latency percentiles


def test_an_answer_after_the_window_is_in_slo_but_not_goodput() -> None:
    s = _summarize([_record(units=2.0, at=9.8, latency=0.5)])
    assert s.goodput == 0.0
    assert s.in_slo_pct["short"] == 100.0


def test_a_refusal_is_a_miss() -> None:
    records = [_record(units=1.0), _record(units=3.0, status=429, success=None, reason="deadline_unmeetable"),
               _record(units=1.0, status=503, success=None, reason="no_backend"),
               _record(units=1.0, status=408, success=None, reason="deadline"),
               _record(units=1.0, status=None, success=None, reason="timeout")]
    s = _summarize(records)
    assert (s.refused, s.late, s.refused_late) == (2, 2, 4)
    assert s.in_slo_pct["short"] == pytest.approx(20.0)
    assert s.refused_late_work_pct == pytest.approx(100.0 * 6.0 / 7.0)
    assert s.goodput == pytest.approx(1.0 / 20.0)


def test_a_backend_error_is_neither_refused_nor_late_but_still_out_of_slo() -> None:
    s = _summarize([_record(units=1.0, status=200, success=False), _record(units=1.0, status=500, success=None)])
    assert (s.refused, s.late) == (0, 0)
    assert s.in_slo_pct["short"] == 0.0
    assert s.failures == {"backend error": 2}


def test_jain_is_over_work_against_a_max_min_share_of_offered_work() -> None:
    # a offers 9 work, b offers 1; the 6 served split max-min fair is b 1, a 5.
    fair = [_record(tenant="a", units=5.0), _record(tenant="a", units=4.0, status=429, success=None),
            _record(tenant="b", units=1.0)]
    s = _summarize(fair)
    assert s.tenants["a"].offered == pytest.approx(0.9) and s.tenants["b"].offered == pytest.approx(0.1)
    assert s.tenants["b"].fair == pytest.approx(0.1) and s.tenants["a"].fair == pytest.approx(0.5)
    assert s.jain == pytest.approx(1.0)
    # The same work served, but all of it to a: b gets nothing of its fair share.
    starved = [_record(tenant="a", units=5.0), _record(tenant="a", units=1.0),
               _record(tenant="b", units=1.0, status=429, success=None)]
    assert _summarize(starved).jain == pytest.approx((1.2 + 0) ** 2 / (2 * 1.2 ** 2))
    # Counting requests, a tenant of many cheap requests would look favoured; in work it is not.
    cheap = [_record(tenant="a", units=1.0) for _ in range(5)] + [_record(tenant="b", units=5.0)]
    assert _summarize(cheap).jain == pytest.approx(1.0)


def test_work_is_the_service_models_mean_times_the_scale() -> None:
    setup = Setup(time_scale=0.03)
    assert setup.work_s(100.0) == pytest.approx((BASE_S + PER_UNIT_S * 100.0) * 0.03)
    assert setup.work_s(100.0) == pytest.approx(ServiceModel().mean_seconds(100.0) * 0.03)


# --- SLO and the sidecar's deadlines -------------------------------------------------------------

def test_dynamic_slo_is_the_seeds_dynamic_timeouts_continuous_and_scaled() -> None:
    assert slo_s(1, "dynamic", 1.0) == pytest.approx(17.0)
    assert slo_s(50, "dynamic", 1.0) == pytest.approx(17.0)
    assert slo_s(100, "dynamic", 1.0) == pytest.approx(1.5 * (3.5 + 76.5 * 100 / 200))
    assert slo_s(137, "dynamic", 1.0) == pytest.approx(1.5 * (3.5 + 76.5 * 137 / 200))  # not truncated
    assert slo_s(200, "dynamic", 1.0) == pytest.approx(1.5 * 80.0)
    assert slo_s(201, "dynamic", 1.0) == pytest.approx(240.0)
    assert slo_s(100, "dynamic", 0.03) == pytest.approx(0.03 * slo_s(100, "dynamic", 1.0))
    assert [slo_s(c, "lenient", 0.5) for c in (50, 51, 200, 201)] == pytest.approx([30.0, 150.0, 150.0, 300.0])


def _deadline(tiers: list[dict[str, float | None]], chars: int) -> float:
    tier = next(t for t in tiers if t["max_chars"] is None or chars <= t["max_chars"])
    timeout, per_char = tier["timeout_s"], tier.get("per_char_s", 0.0)
    assert timeout is not None and per_char is not None
    return timeout + per_char * chars


@pytest.mark.parametrize("policy", ["dynamic", "lenient"])
@pytest.mark.parametrize("arm", [SEED, HIGH, LOW, SLOTS1, *ORACLES])
def test_every_sidecar_arms_yaml_deadline_is_the_slo(policy: str, arm: str) -> None:
    setup = Setup(time_scale=0.03, slo=policy)
    cell = Cell(backends=2, trace="mix", curve="default", arms=ARMS, loads=(1.0,), oracle_loads=(1.0,))
    config = yaml.safe_load(sidecar_yaml(arm, setup, cell, port=8049, base_port=18050))
    assert config["deadlines"]["policy"] == "tiers"
    tiers = config["deadlines"]["tiers"]
    for chars in [*range(1, 260), 480, 500, 520, 5000]:
        assert _deadline(tiers, chars) == pytest.approx(setup.slo_s(chars), rel=1e-9), chars


def test_operator_arms_write_only_what_an_operator_writes() -> None:
    setup = Setup(time_scale=0.03)
    cell = Cell(backends=4, trace="mix", curve="flat", arms=ARMS, loads=(1.0,), oracle_loads=(1.0,))
    true_cost = (BASE_S * 0.03, PER_UNIT_S * 0.03)
    for arm, error, slots in [(HIGH, 2.0, None), (LOW, 0.5, None), (SLOTS1, 2.0, 1),
                              *((o, 1.0, n) for n, o in enumerate(ORACLES, 1))]:
        config = yaml.safe_load(sidecar_yaml(arm, setup, cell, port=8049, base_port=18050))
        assert set(config) == {"listen", "backends", "deadlines", "cost", "tenants"}, arm
        expected_keys = {"command", "env", "gpus", "base_port", "health"} | ({"slots"} if slots else set())
        assert set(config["backends"]) == expected_keys, arm
        assert config["backends"].get("slots") == slots
        assert set(config["deadlines"]) == {"policy", "tiers"}
        assert (config["cost"]["base_s"], config["cost"]["per_unit_s"]) == pytest.approx(
            (true_cost[0] * error, true_cost[1] * error))
        assert config["backends"]["command"][-4:] == ["--throughput", "1", "--seed", "{index}"]
        assert "--jitter" in config["backends"]["command"]
    seed = yaml.safe_load(sidecar_yaml(SEED, setup, cell, port=8049, base_port=18050))
    assert seed["queue"] == {"order": "fifo"} and seed["backends"]["slots"] == 13
    assert seed["deadlines"]["reject_unmeetable"] is False
    assert all(c["max_in_service"] is None for c in seed["classes"])


# --- traces and the plan -------------------------------------------------------------------------

TENANTS = (Tenant(name="a", key=None, share=0.6), Tenant(name="b", key=None, share=0.4))


def test_bimodal_mix_is_short_and_long_only() -> None:
    trace = make_trace(seed=3, rate=1.0, duration_s=math.inf, tenants=TENANTS, max_requests=4000, mix=BIMODAL_MIX)
    short = [a for a in trace if a.chars <= 50]
    assert all(15 <= a.chars <= 25 for a in short)
    assert all(480 <= a.chars <= 520 for a in trace if a.chars > 50)
    assert len(short) / len(trace) == pytest.approx(0.8, abs=0.03)
    assert MIXES == {"mix": LENGTH_MIX, "bimodal": BIMODAL_MIX}
    assert cell_classes("bimodal") == ["short", "long"] and cell_classes("mix") == ["short", "medium", "long"]


@pytest.mark.parametrize("mix", list(MIXES))
def test_same_seed_gives_the_same_trace_shape_at_any_rate(mix: str) -> None:
    slow = make_trace(seed=7, rate=2.0, duration_s=100.0, tenants=TENANTS, mix=MIXES[mix])
    fast = make_trace(seed=7, rate=8.0, duration_s=25.0, tenants=TENANTS, mix=MIXES[mix])
    assert len(slow) == len(fast)
    assert [(a.tenant, a.text) for a in slow] == [(a.tenant, a.text) for a in fast]
    assert [a.at_s for a in fast] == pytest.approx([a.at_s / 4 for a in slow])


def test_a_load_offers_that_multiple_of_the_pools_work_per_second() -> None:
    assert arrival_rate(2.5, 4, 0.5) == pytest.approx(20.0)  # 20 req/s x 0.5 s = 10 = 2.5 x 4


def test_the_default_plan_is_the_whole_matrix() -> None:
    plan = make_plan(parser().parse_args([]))
    keys = [c.key for c in plan.cells]
    assert keys == ["2 backends, mix, default curve", "4 backends, mix, default curve",
                    "2 backends, bimodal, default curve", "4 backends, bimodal, default curve",
                    "2 backends, bimodal, flat curve"]
    for cell in plan.cells[:4]:
        assert (SEED in cell.arms) == (cell.backends == 4)
        points = cell.points()
        assert {load for arm, load in points if arm in ORACLES} == {2.5}
        assert {load for arm, load in points if arm == NGINX} == {0.5, 1.0, 1.3, 2.5}
    assert plan.cells[-1].arms == FLAT_ARMS and plan.cells[-1].backends == 2
    assert plan.runs == 2 * (3 * 4 + 4) + 2 * (4 * 4 + 4) + 2 * 4
    setup = plan.setup
    assert (setup.time_scale, setup.duration_s, setup.preroll_s, setup.slo) == (0.02, 20.0, 10.0, "dynamic")


def test_the_plan_follows_its_flags() -> None:
    args = parser().parse_args(["--backends", "2", "--traces", "bimodal", "--arms", "nginx", "sidecar-high",
                                "--loads", "1.3", "--no-flat"])
    plan = make_plan(args)
    assert [(c.key, c.points()) for c in plan.cells] == [
        ("2 backends, bimodal, default curve", [(NGINX, 1.3), (HIGH, 1.3)])]
    flat = make_plan(parser().parse_args(["--curve", "flat", "--backends", "4", "--slo", "lenient"]))
    assert {c.curve for c in flat.cells} == {"flat"} and all(c.arms == FLAT_ARMS for c in flat.cells)
    assert flat.setup.slo == "lenient"


# --- the oracle and the verdicts -----------------------------------------------------------------

def _run(arm: str, load: float, **fields: object) -> RunSummary:
    base = _summarize([], config=arm, load=load)
    return replace(base, **fields)  # type: ignore[arg-type]


def test_the_oracle_is_the_best_of_its_sweep() -> None:
    runs = [_run(o, 2.5, goodput=g) for o, g in zip(ORACLES, (0.7, 1.1, 0.9, 0.8), strict=True)]
    runs += [_run(o, 1.0, goodput=5.0) for o in ORACLES] + [_run(HIGH, 2.5, goodput=9.0)]
    assert oracle(runs, 2.5) == (1.1, list(ORACLES))
    assert oracle(runs[:1], 2.5) == (0.7, [ORACLES[0]])
    assert oracle(runs, 1.3) == (None, [])


def test_judge_met_not_met_missing() -> None:
    common = {"cell": "c", "arm": HIGH, "load": 1.3, "name": "n", "unit": "work/backend-s"}
    met = judge(op=GE, measured=1.0, target=0.9, **common)  # type: ignore[arg-type]
    assert met.met is True and met.miss_by is None
    missed = judge(op=GE, measured=0.5, target=0.9, **common)  # type: ignore[arg-type]
    assert missed.met is False and missed.miss_by == pytest.approx(0.4)
    over = judge(op=LE, measured=3, target=1, **common)  # type: ignore[arg-type]
    assert over.met is False and over.miss_by == 2
    missing = judge(op=GE, measured=1.0, target=None, absent=["nginx 1.3×"], **common)  # type: ignore[arg-type]
    assert missing.met is None and "nginx 1.3×" in missing.note
    undefined = judge(op=GE, measured=None, target=0.98, undefined="no goodput", **common)  # type: ignore[arg-type]
    assert undefined.met is False and undefined.note == "no goodput"


def _by(verdicts: list[Verdict], load: float, name: str) -> Verdict:
    return next(v for v in verdicts if v.load == load and v.name == name)


def test_verdicts_compare_with_nginx_and_the_oracle_of_the_same_cell() -> None:
    latency = {"short": (0.1, 0.2), "medium": (None, None), "long": (1.0, 2.0)}
    pct = {"short": 99.5, "medium": None, "long": 40.0}
    runs = [
        _run(NGINX, 0.5), _run(HIGH, 0.5, refused=0, late=1),
        _run(NGINX, 1.0, late=3, latency_s=latency), _run(HIGH, 1.0, refused=1, late=1,
                                                          latency_s={**latency, "long": (1.0, 2.3)}),
        _run(NGINX, 1.3, goodput=0.8, in_slo_pct={**pct, "long": 50.0}), _run(HIGH, 1.3, goodput=0.9, in_slo_pct=pct),
        _run(NGINX, 2.5, goodput=0.4), _run(HIGH, 2.5, goodput=0.85, in_slo_pct=pct, jain=0.99),
        _run(ORACLES[0], 2.5, goodput=0.9), _run(ORACLES[1], 2.5, goodput=1.0),
    ]
    verdicts = arm_verdicts("c", HIGH, runs, ["short", "long"])
    assert _by(verdicts, 0.5, "nothing refused or late").met is False
    assert _by(verdicts, 1.0, "refused + late ≤ nginx's late").met is True
    assert _by(verdicts, 1.0, "p99 short ≤ 1.1× nginx's").met is True
    p99_long = _by(verdicts, 1.0, "p99 long ≤ 1.1× nginx's")
    assert p99_long.met is False and p99_long.miss_by == pytest.approx(2.3 - 2.2)
    assert _by(verdicts, 1.3, "goodput ≥ nginx's").met is True
    assert _by(verdicts, 1.3, "short in SLO ≥ 99 %").met is True
    long_13 = _by(verdicts, 1.3, "long in SLO ≥ nginx's − 5 points")
    assert long_13.met is False and long_13.target == pytest.approx(45.0)
    assert _by(verdicts, 2.5, "goodput ≥ 2× nginx's").met is True
    vs_oracle = _by(verdicts, 2.5, "goodput ≥ 90 % of the oracle's")
    assert vs_oracle.target == pytest.approx(0.9) and vs_oracle.met is False
    assert "only" in vs_oracle.note  # two of the four oracle arms ran
    assert _by(verdicts, 2.5, "Jain ≥ 0.98").met is True
    assert not any(v.met is None for v in verdicts)


def test_verdicts_whose_runs_are_missing_say_so() -> None:
    verdicts = arm_verdicts("c", LOW, [_run(LOW, 2.5, goodput=1.0)], ["short", "long"])
    assert all(v.met is None for v in verdicts if v.load != 2.5)
    assert _by(verdicts, 2.5, "goodput ≥ 2× nginx's").met is None
    assert _by(verdicts, 2.5, "goodput ≥ 90 % of the oracle's").met is None
    assert _by(verdicts, 1.3, "goodput ≥ nginx's").measured is None


def test_flat_curve_verdict_at_every_load_is_strict() -> None:
    runs = [_run(HIGH, 0.5, goodput=0.5), _run(SLOTS1, 0.5, goodput=0.5), _run(HIGH, 1.0, goodput=0.79),
            _run(SLOTS1, 1.0, goodput=0.8), _run(HIGH, 2.5, goodput=1.0)]
    verdicts = flat_verdicts("c", runs, (0.5, 1.0, 2.5))
    assert [v.met for v in verdicts] == [True, False, None]


def test_the_preroll_is_left_out_and_the_measured_window_starts_at_its_end() -> None:
    from bench.overload import measured_window

    def rec(at: float) -> Record:
        return Record(tenant="heavy", cls="short", chars=20, intended_s=at, send_lag_s=0.0, latency_s=0.1,
                      status=200, reason=None, success=True, backend="b", units=20.0)

    kept = measured_window([rec(0.0), rec(9.99), rec(10.0), rec(25.5)], 10.0)
    assert [r.intended_s for r in kept] == [0.0, 15.5]


def test_the_readme_block_is_written_from_the_json_between_its_markers(tmp_path: Path) -> None:
    from bench import overload_readme

    def run(arm: str, load: float, goodput: float) -> dict[str, object]:
        return {"arm": arm, "load": load, "summary": {"goodput": goodput}}

    verdict = {"met": True}
    data = {
        "setup": {"time_scale": 0.02, "duration_s": 20.0, "preroll_s": 10.0, "jitter": 0.25},
        "cells": [
            {"backends": 2, "trace": "bimodal", "curve": "default", "loads": [2.5], "oracle_loads": [2.5],
             "runs": [run("nginx", 2.5, 0.3), run("sidecar-high", 2.5, 0.75), run("oracle-slots1", 2.5, 0.7),
                      run("oracle-slots2", 2.5, 0.81)],
             "verdicts": [verdict, {"met": False}, {"met": None}]},
            {"backends": 2, "trace": "bimodal", "curve": "flat", "loads": [1.0], "oracle_loads": [],
             "runs": [run("sidecar-high", 1.0, 0.9), run("slots1", 1.0, 0.88)], "verdicts": [verdict]},
        ],
    }
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{overload_readme.START}\nold figures\n{overload_readme.END}\noutro\n")
    overload_readme.update(readme, data)
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| 2 backends, bimodal | 2.5× | 0.30 | – | 0.75 | – | 0.81 |" in text  # the oracle: the best of the sweep
    assert "met 2 of the 3 verdicts" in text
    assert "1×: 0.90 vs 0.88" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- overload:start -->"):
        overload_readme.update(readme, data)


async def test_the_warm_up_sends_whole_requests_to_every_backend(aiohttp_server: Any) -> None:
    seen: list[dict[str, str]] = []
    served = iter(["gpu0-0", "gpu1-0,gpu2-0", "gpu3-0"] * 10)

    async def tts(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await request.read()
        return web.Response(body=b"{}", headers={"X-Backend": next(served)})

    app = web.Application()
    app.router.add_post("/api/v1/tts", tts)
    server = await aiohttp_server(app)
    backends = await warm_up(str(server.make_url("")).rstrip("/"), Setup(warmup_rounds=1), 4, "key-0123")
    assert backends == {"gpu0-0", "gpu1-0", "gpu2-0", "gpu3-0"}  # a split answer's list counts each
    assert seen and all(h["X-Fanout"] == "off" and h["Authorization"] == "Bearer key-0123" for h in seen)
