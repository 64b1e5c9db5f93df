"""The fan-out benchmark's pure parts: its texts, answer checks, plan, arm configs, verdicts and report."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from bench.fanout import (
    EN_SENTENCES,
    LONG_CHARS,
    SHORT_TEXTS,
    SMOKE,
    TEXT_STRIDES,
    ZH_SENTENCES,
    IdleSetup,
    arm_order,
    idle_texts,
    make_plan,
    model_speedup,
    parser,
    plausible,
    round_plan,
    stream_audio_s,
    tts_audio_s,
)
from bench.fanout_report import (
    DATA,
    EN_OFF,
    EN_ON,
    GE,
    GOODPUT_PLOT,
    IDLE_ARMS,
    LATENCY_PLOT,
    LE,
    REPORT,
    SHORT,
    STREAM_MP3,
    STREAM_PCM,
    TTFB_PLOT,
    ZH_OFF,
    ZH_ON,
    FanoutResult,
    IdleResult,
    Sample,
    arm_stats,
    idle_verdicts,
    overload_verdicts,
    write_report,
)
from bench.loadgen import Record
from bench.overload import production_fanout, sidecar_yaml
from bench.overload_spec import HIGH, HIGH_FANOUT, BenchResult, Cell, CellResult, RunResult, Setup
from bench.summary import summarize
from glmtts.audio import Pcm, encode
from glmtts.emulator.timing import ServiceModel
from glmtts.emulator.voice import speech_seconds
from glmtts.split import split_balanced
from glmtts.text import units
from glmtts.wav import write_wav
from scheduler.config.fanout import FanoutConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- texts and answers ------------------------------------------------------------------------

def test_long_texts_are_whole_sentences_of_about_500_characters_new_every_repetition() -> None:
    texts = [idle_texts(rep) for rep in range(IdleSetup().reps)]  # a new long text each repetition
    for kind, sentences in (("zh-500", ZH_SENTENCES), ("en-500", EN_SENTENCES)):
        seen = {t[kind] for t in texts}
        assert len(seen) == len(texts), kind
        assert len(texts) <= len(TEXT_STRIDES) * len(sentences)
        for text in seen:
            assert LONG_CHARS[0] <= len(text) <= LONG_CHARS[1], (kind, len(text))
            assert text[-1] in "。！？.!?", text[-1]
            assert any(text.startswith(s) for s in sentences)
    # The short texts come round in order.
    assert [t["zh-20"] for t in texts] == [SHORT_TEXTS[rep % len(SHORT_TEXTS)] for rep in range(len(texts))]
    assert len(set(SHORT_TEXTS)) == len(SHORT_TEXTS)
    assert all(15 <= len(t["zh-20"]) <= 25 for t in texts)


def test_audio_is_plausible_only_near_what_the_emulator_voice_gives_the_text() -> None:
    text = idle_texts(0)["zh-500"]
    expected = speech_seconds(units(text))
    assert plausible(expected, text) is None
    assert plausible(1.3 * expected, text) is None
    assert plausible(0.5 * expected, text) is not None  # a truncated stream
    assert plausible(2.0 * expected, text) is not None


def test_a_tts_answer_counts_its_wav_and_refuses_failures() -> None:
    wav = write_wav(b"\x00\x00" * 24000 * 3, 24000)
    body = json.dumps({"success": True, "audio_base64": base64.b64encode(wav).decode()}).encode()
    seconds, error = tts_audio_s(body)
    assert error is None and seconds == pytest.approx(3.0)
    assert tts_audio_s(json.dumps({"success": False, "error": "x"}).encode())[0] is None
    assert tts_audio_s(b"<html>")[0] is None
    assert tts_audio_s(json.dumps({"success": True, "audio_base64": "AAAA"}).encode())[0] is None


def test_streamed_pcm_is_counted_and_mp3_decoded() -> None:
    assert stream_audio_s(b"\x00\x00" * 48000, "pcm") == (2.0, None)
    assert stream_audio_s(b"\x00" * 3, "pcm")[0] is None
    pcm = Pcm(samples=b"\x10\x00\xf0\xff" * 24000, rate=24000)  # 2 s
    seconds, error = stream_audio_s(encode(pcm, "mp3"), "mp3")
    assert error is None and seconds == pytest.approx(2.0, abs=0.1)
    assert stream_audio_s(b"not an mp3 at all" * 10, "mp3")[0] is None


def test_the_model_speedup_is_what_the_cut_and_the_noise_allow() -> None:
    texts = [idle_texts(rep)["zh-500"] for rep in range(2)]
    config = FanoutConfig(pieces_per_slot=2)
    # No noise: whole service over the slowest lane of the sidecar's own cut, computed by hand.
    model, expected = ServiceModel(), []
    for text in texts:
        free = [0.0] * 4
        pieces = split_balanced(text, lanes=8, min_chars=config.min_chars, max_chars=config.max_chars)
        for piece in sorted(pieces, key=units, reverse=True):  # the longest start first
            free[free.index(min(free))] += model.mean_seconds(units(piece))
        expected.append((model.mean_seconds(units(text)), max(free)))
    quiet = model_speedup(texts, lanes=4, fanout=config, sigma=0.0, draws=3)
    wholes, spans = sorted(w for w, _ in expected), sorted(m for _, m in expected)
    assert quiet == pytest.approx((sum(wholes) / 2) / (sum(spans) / 2))
    assert 3.0 < quiet < 4.0  # four lanes, each piece paying the per-request base
    # Noise costs a split more than a whole text (the slowest lane decides); seeded, so repeatable.
    noisy = model_speedup(texts, lanes=4, fanout=config, sigma=0.25, draws=400)
    assert noisy < quiet and noisy == model_speedup(texts, lanes=4, fanout=config, sigma=0.25, draws=400)
    assert model_speedup(texts, lanes=1, fanout=config, sigma=0.0, draws=3) == pytest.approx(
        model_speedup(texts, lanes=1, fanout=config, sigma=0.0, draws=3))
    assert model_speedup(texts, lanes=1, fanout=config, sigma=0.0, draws=3) < 1.0  # one lane: only the bases


def test_arms_alternate_in_rotating_order() -> None:
    orders = [arm_order(rep) for rep in range(len(IDLE_ARMS))]
    assert all(sorted(a.name for a in order) == sorted(a.name for a in IDLE_ARMS) for order in orders)
    assert len({order[0].name for order in orders}) == len(IDLE_ARMS)


# --- plan and configurations ------------------------------------------------------------------

def test_the_default_plan_is_four_backends_at_time_scale_005_both_traces_and_loads() -> None:
    plan = make_plan(parser().parse_args([]))
    assert plan.idle is not None and plan.overload is not None
    assert (plan.idle.time_scale, plan.idle.backends) == (0.05, 4)
    assert plan.overload.setup.time_scale == 0.05
    assert [c.trace for c in plan.overload.cells] == ["mix", "bimodal"]
    for cell in plan.overload.cells:
        assert cell.backends == 4 and cell.gpus == ["0", "1", "2", "3"]
        assert cell.points() == [(HIGH, 1.3), (HIGH_FANOUT, 1.3), (HIGH, 2.5), (HIGH_FANOUT, 2.5)]
    assert make_plan(parser().parse_args(["--smoke"])) is SMOKE
    only = make_plan(parser().parse_args(["--skip-overload", "--reps", "3"]))
    assert only.overload is None and only.idle is not None and only.idle.reps == 3
    assert plan.rounds == 4 and make_plan(parser().parse_args(["--rounds", "3"])).rounds == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parser().parse_args(["--rounds", bad])


def test_rounds_replay_a_trace_of_their_own_seed_and_reverse_the_arm_order_every_other_round() -> None:
    plan = make_plan(parser().parse_args([])).overload
    assert plan is not None
    first, second, third = (round_plan(plan, i) for i in range(3))
    assert first == plan  # round 0 is the plan as given
    assert [first.setup.seed, second.setup.seed, third.setup.seed] == [plan.setup.seed + i for i in range(3)]
    assert replace(second.setup, seed=plan.setup.seed) == plan.setup  # nothing else changes
    for a, b, c in zip(first.cells, second.cells, third.cells, strict=True):
        assert a.arms == (HIGH, HIGH_FANOUT) and b.arms == (HIGH_FANOUT, HIGH) and c.arms == a.arms
        assert b.points() == [(HIGH_FANOUT, 1.3), (HIGH, 1.3), (HIGH_FANOUT, 2.5), (HIGH, 2.5)]
        assert (b.trace, b.loads, b.backends) == (a.trace, a.loads, a.backends)


def test_the_fanout_arm_is_sidecar_high_plus_the_production_fanout_section() -> None:
    setup, cell = Setup(time_scale=0.05), SMOKE.overload.cells[0] if SMOKE.overload else None
    assert cell is not None
    high = sidecar_yaml(HIGH, setup, cell, port=8049, base_port=18050)
    fan = sidecar_yaml(HIGH_FANOUT, setup, cell, port=8049, base_port=18050)
    assert fan.startswith(high) and "fanout" not in high
    config = yaml.safe_load(fan)
    assert config["fanout"] == production_fanout() and config["fanout"]["enabled"] is True
    production = yaml.safe_load(Path("config/glmtts-production.yaml").read_text()).get("fanout") or {}
    assert {k: v for k, v in config["fanout"].items() if k != "enabled"} == \
        {k: v for k, v in production.items() if k != "enabled"}
    with pytest.raises(ValueError, match="unknown sidecar arm"):
        sidecar_yaml("sidecar-high+nothing", setup, cell, port=8049, base_port=18050)


# --- verdicts from synthetic results ------------------------------------------------------------

def _sample(arm: str, latency: float, *, rep: int = 0, ttfb: float | None = None, valid: bool = True,
            pieces: int | None = None) -> Sample:
    return Sample(arm=arm, rep=rep, chars=500, units=500.0, status=200 if valid else 502, valid=valid,
                  latency_s=latency, ttfb_s=ttfb, audio_s=110.0, expected_audio_s=110.2, pieces=pieces,
                  error=None if valid else "backend failed")


def _idle(speedup_zh: float = 4.0, ttfb: float = 0.2) -> list[Sample]:
    samples = []
    for rep, wobble in enumerate((0.9, 1.0, 1.1)):
        samples += [_sample(ZH_OFF, 4.0 * wobble, rep=rep, pieces=1),
                    _sample(ZH_ON, 4.0 * wobble / speedup_zh, rep=rep, pieces=4),
                    _sample(EN_OFF, 1.2 * wobble, rep=rep), _sample(EN_ON, 0.5 * wobble, rep=rep),
                    _sample(SHORT, 0.2 * wobble, rep=rep),
                    _sample(STREAM_PCM, 1.5, rep=rep, ttfb=ttfb * wobble),
                    _sample(STREAM_MP3, 1.6, rep=rep, ttfb=0.5 * wobble)]
    return samples


def test_idle_verdicts_are_ratios_of_medians_against_their_targets() -> None:
    zh, en, pcm, mp3 = idle_verdicts(_idle())
    assert (zh.op, zh.target, zh.met) == (GE, 3.0, True) and zh.measured == pytest.approx(4.0)
    assert en.met is False and en.measured == pytest.approx(1.2 / 0.5)
    assert (pcm.op, pcm.target, pcm.met) == (LE, 1.5, True) and pcm.measured == pytest.approx(0.2 / 0.2)
    assert mp3.met is False and mp3.measured == pytest.approx(0.5 / 0.2)
    assert idle_verdicts(_idle(speedup_zh=2.5))[0].met is False


def test_an_invalid_answer_fails_its_verdict_and_a_missing_arm_leaves_it_open() -> None:
    samples = [*_idle(), _sample(ZH_ON, 0.01, rep=9, valid=False)]
    zh = idle_verdicts(samples)[0]
    assert zh.met is False and "1 of 4 answers invalid" in zh.note
    assert zh.measured == pytest.approx(4.0)  # the error's 0.01 s is in no median
    assert arm_stats(ZH_ON, samples).valid == 3
    without_short = [s for s in _idle() if s.arm != SHORT]
    pcm = idle_verdicts(without_short)[2]
    assert pcm.met is None and SHORT in pcm.note
    assert all(v.met is None for v in idle_verdicts([]))


def _run(arm: str, load: float, goodput: float) -> RunResult:
    records = [Record(tenant="heavy", cls="short", chars=20, intended_s=0.0, send_lag_s=0.0, latency_s=0.1,
                      status=200, reason=None, success=True, backend=None, units=20.0)]
    summary = summarize(records, config=arm, load=load, backends=4, duration_s=10.0, slo_s=lambda c: 1.0,
                        work_s=lambda u: u, weights={"heavy": 1.0})
    return RunResult(summary=replace(summary, goodput=goodput), records=records, config_yaml=f"# {arm}\n")


def _bench(runs: list[RunResult], skipped: dict[str, str] | None = None) -> BenchResult:
    cell = Cell(backends=4, trace="bimodal", curve="default", arms=(HIGH, HIGH_FANOUT), loads=(1.3, 2.5),
                oracle_loads=())
    return BenchResult(setup=Setup(time_scale=0.05), wall_s=1.0, command="x",
                       cells=[CellResult(cell=cell, mean_work_s=0.9, runs=runs, skipped=skipped or {})])


def test_overload_verdicts_compare_goodput_with_and_without_fanout_per_load() -> None:
    bench = _bench([_run(HIGH, 1.3, 0.80), _run(HIGH_FANOUT, 1.3, 0.78), _run(HIGH, 2.5, 0.9),
                    _run(HIGH_FANOUT, 2.5, 0.81)])
    low, high = overload_verdicts([bench])
    assert low.met is True and low.measured == pytest.approx(0.975)
    assert high.met is False and high.measured == pytest.approx(0.9)
    assert "bimodal at 2.5×" in high.name and HIGH_FANOUT in high.name
    assert low.note == ""  # one round: nothing to list


def test_overload_verdicts_sum_goodput_over_the_rounds_and_list_each_round() -> None:
    rounds = [_bench([_run(HIGH, 2.5, 1.0), _run(HIGH_FANOUT, 2.5, 0.90)]),
              _bench([_run(HIGH_FANOUT, 2.5, 1.1), _run(HIGH, 2.5, 1.0)])]
    verdict = overload_verdicts(rounds)[1]
    assert verdict.measured == pytest.approx(2.0 / 2.0) and verdict.met is True  # (0.9 + 1.1) / (1 + 1)
    assert verdict.note == "rounds: 0.90 (fan-out second), 1.10 (fan-out first)"
    # Summed, not averaged ratios: a round with little goodput weighs little.
    skewed = [_bench([_run(HIGH, 2.5, 0.1), _run(HIGH_FANOUT, 2.5, 0.2)]),
              _bench([_run(HIGH, 2.5, 1.0), _run(HIGH_FANOUT, 2.5, 0.8)])]
    assert overload_verdicts(skewed)[1].measured == pytest.approx(1.0 / 1.1)
    assert overload_verdicts(skewed)[1].met is False


def test_overload_verdicts_name_what_did_not_run() -> None:
    bench = _bench([_run(HIGH, 1.3, 0.8), _run(HIGH, 2.5, 0.0)], skipped={HIGH_FANOUT: "the sidecar rejects it"})
    low, high = overload_verdicts([bench])
    assert low.met is None and "the sidecar rejects it" in low.note
    assert high.met is None
    zero = overload_verdicts([_bench([_run(HIGH, 1.3, 0.0), _run(HIGH_FANOUT, 1.3, 0.5)])])[0]
    assert zero.met is None and zero.measured is None
    # A round that lost an arm is named, and the verdict stays open, whatever the other rounds say.
    partial = [_bench([_run(HIGH, 1.3, 0.8), _run(HIGH_FANOUT, 1.3, 0.8)]), _bench([_run(HIGH, 1.3, 0.8)])]
    low = overload_verdicts(partial)[0]
    assert low.met is None and f"{HIGH_FANOUT} 1.3×" in low.note
    assert overload_verdicts([]) == []


def test_the_report_shows_the_measured_figures_configs_and_plots(tmp_path: Path) -> None:
    idle = IdleResult(samples=_idle(), config_yaml="listen: {port: 1}\nfanout: {enabled: true}\n", time_scale=0.05,
                      backends=4, reps=3, model_speedup={"zh-500": 3.17, "en-500": 2.97})
    bench = _bench([_run(HIGH, 1.3, 0.80), _run(HIGH_FANOUT, 1.3, 0.78), _run(HIGH, 2.5, 0.9),
                    _run(HIGH_FANOUT, 2.5, 0.81)])
    second = _bench([_run(HIGH_FANOUT, 1.3, 0.82), _run(HIGH, 1.3, 0.80), _run(HIGH_FANOUT, 2.5, 0.85),
                     _run(HIGH, 2.5, 0.9)])
    second.setup = replace(second.setup, seed=second.setup.seed + 1)
    result = FanoutResult(idle=idle, overload=[bench, second], command="python -m bench.fanout --reps 3",
                          wall_s=60.0, machine={"CPUs": 2})
    text = write_report(result, tmp_path).read_text()
    assert (tmp_path / REPORT).read_text() == text
    assert "Reproduce: `python -m bench.fanout --reps 3`" in text
    data = json.loads((tmp_path / DATA).read_text())
    for verdict in data["verdicts"]:
        shown = "–" if verdict["measured"] is None else f"{verdict['measured']:.2f}"
        assert f"| {verdict['name']} | {shown} | {verdict['op']} {verdict['target']:g} |" in text
    assert [v["met"] for v in data["verdicts"]] == [True, False, True, False, True, False]
    assert data["verdicts"][1]["note"] == "model, no overhead: 2.97"
    assert "What the cut and the noise alone allow: zh-500 3.17, en-500 2.97." in text
    assert data["idle"]["model_speedup"] == {"zh-500": 3.17, "en-500": 2.97}
    assert data["overload"]["goodput_ratio"]["bimodal"] == {"1.3": pytest.approx(1.6 / 1.6),
                                                           "2.5": pytest.approx(1.66 / 1.8)}
    assert [r["setup"]["seed"] for r in data["overload"]["rounds"]] == [20240611, 20240612]
    assert "2 rounds of every point (trace seeds 20240611, 20240612" in text
    assert "| bimodal | 2 | sidecar-high+fanout | 1.3× |" in text  # every round's runs are shown
    zh_on = next(s for s in data["idle"]["stats"] if s["arm"] == ZH_ON)
    assert zh_on["pieces"] == [4] and zh_on["latency_p50"] == pytest.approx(1.0)
    assert f"| {ZH_ON} | 3 | 3 | 500 | 1.000 |" in text
    assert "fanout: {enabled: true}" in text and f"# {HIGH_FANOUT}" in text
    assert text.index("## Verdicts") < text.index("## Idle pool") < text.index("## Overload") \
        < text.index("## Configurations")
    for plot in (LATENCY_PLOT, TTFB_PLOT, GOODPUT_PLOT):
        assert f"]({plot})" in text
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC


def test_the_overload_runs_read_how_often_the_sidecar_split_from_its_metrics() -> None:
    from prometheus_client import generate_latest

    from bench.fanout_report import _fanout_cells
    from bench.overload import FANOUT_METRIC
    from scheduler.runtime.metrics import Metrics

    metrics = Metrics()
    for pieces in (4, 8, 3):
        metrics.fanout(pieces=pieces)
    for reason in ("pressure", "pressure", "busy"):
        metrics.fanout(declined=reason)
    text = generate_latest(metrics.registry).decode()
    counts = {("split" if kind == "pieces_count" else f"declined {reason}"): float(value)
              for kind, reason, value in FANOUT_METRIC.findall(text)}
    assert counts["split"] == 3 and counts["declined pressure"] == 2 and counts["declined busy"] == 1
    assert _fanout_cells(counts) == ["3", "2/1"]
    assert _fanout_cells({}) == ["–", "–"]  # no metrics read
    assert _fanout_cells({"split": 0, "declined disabled": 40, "declined pressure": 0}) == ["off", "off"]
