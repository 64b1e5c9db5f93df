from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.core.cost import REFIT_EVERY, CostModel, CostPriors

KEY = (24000, False)
OTHER = (32000, True)
REPO = Path(__file__).resolve().parents[2]


def feed(
    model: CostModel,
    *,
    a: float,
    b: float,
    n: int,
    sigma: float = 0.2,
    seed: int = 0,
    key: tuple[int, bool] = KEY,
    outliers: float = 0.0,
    outlier_factor: float = 20.0,
) -> None:
    """`n` completions of a true line a + b·units with log-normal noise, texts of 5..600 units."""
    rng = random.Random(seed)
    for _ in range(n):
        units = math.exp(rng.uniform(math.log(5), math.log(600)))
        actual = (a + b * units) * math.exp(rng.gauss(0.0, sigma))
        if rng.random() < outliers:
            actual *= outlier_factor
        model.observe(units, key, actual)


def relative_error(model: CostModel, a: float, b: float, units: float, key: tuple[int, bool] = KEY) -> float:
    return abs(model.predict(units, key).mean_s / (a + b * units) - 1)


def test_priors_reproduce_the_seeds_short_and_long_times() -> None:
    model = CostModel()
    assert model.predict(20, KEY).mean_s == pytest.approx(3.5)
    assert model.predict(500, KEY).mean_s == pytest.approx(80.0)
    assert model.predict(500, KEY).p95_s == pytest.approx(80.0 * 1.3)
    assert model.samples(KEY) == 0
    assert model.reload_s == 20.0


@pytest.mark.parametrize("seed", range(5))
def test_learns_a_true_line_from_noisy_samples_within_ten_percent(seed: int) -> None:
    model = CostModel()
    a, b = 1.5, 0.25  # 1.7x the prior at 20 units, 1.6x at 500
    feed(model, a=a, b=b, n=104, seed=seed)
    for units in (20, 50, 100, 200, 500):
        assert relative_error(model, a, b, units) < 0.10
    assert model.describe()["24000:false"]["b_s_per_unit"] == pytest.approx(b, rel=0.10)


@pytest.mark.parametrize("seed", range(5))
def test_five_percent_outliers_at_twenty_times_barely_move_the_mean(seed: int) -> None:
    clean, dirty = CostModel(), CostModel()
    feed(clean, a=1.5, b=0.25, n=200, seed=seed)
    feed(dirty, a=1.5, b=0.25, n=200, seed=seed, outliers=0.05)
    for units in (20, 100, 500):
        shift = dirty.predict(units, KEY).mean_s / clean.predict(units, KEY).mean_s - 1
        assert abs(shift) < 0.10
        assert relative_error(dirty, 1.5, 0.25, units) < 0.10


def test_a_cold_first_request_and_a_stuck_one_do_not_skew_the_line() -> None:
    model = CostModel()
    model.observe(500, KEY, 80.0 * 3)  # a fresh process's first long request
    model.observe(20, KEY, 3.5 * 20)  # stuck
    feed(model, a=0.3125, b=0.159375, n=62, sigma=0.05)
    assert relative_error(model, 0.3125, 0.159375, 20) < 0.05
    assert relative_error(model, 0.3125, 0.159375, 500) < 0.05


def test_one_disagreeing_completion_moves_the_prediction_a_little_and_a_few_move_it_all_the_way() -> None:
    model = CostModel()
    prior = model.predict(100, KEY).mean_s
    model.observe(100, KEY, 3 * prior)  # a cold first request, or a prior 3x too low: one cannot tell yet
    assert 1.0 < model.predict(100, KEY).mean_s / prior < 1.1
    for _ in range(4):
        model.observe(100, KEY, 3 * prior)
    assert model.predict(100, KEY).mean_s / prior == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("truth", [20.0, 1 / 20.0])
def test_a_prior_twenty_times_off_is_learned_within_forty_completions(truth: float, seed: int) -> None:
    """The backends are 20x slower or 20x faster than the prior line, with 25 % noise: after at
    most 40 completions every length is predicted within 30 %."""
    model = CostModel()
    a, b = model.priors.base_s * truth, model.priors.per_unit_s * truth
    feed(model, a=a, b=b, n=40, sigma=0.25, seed=seed)
    for units in (10, 20, 100, 300, 500):
        assert relative_error(model, a, b, units) < 0.30


@pytest.mark.parametrize("truth", [20.0, 1 / 20.0])
def test_a_prior_twenty_times_off_is_mostly_outvoted_by_the_third_completion(truth: float) -> None:
    model = CostModel()
    a, b = model.priors.base_s * truth, model.priors.per_unit_s * truth
    feed(model, a=a, b=b, n=3, sigma=0.0)
    assert relative_error(model, a, b, 100) < 0.10


def test_a_single_stuck_first_request_does_not_swing_a_right_prior() -> None:
    model = CostModel()
    prior = model.predict(20, KEY).mean_s
    model.observe(20, KEY, 20 * prior)
    assert model.predict(20, KEY).mean_s / prior < 1.1
    feed(model, a=model.priors.base_s, b=model.priors.per_unit_s, n=6, sigma=0.1)
    assert relative_error(model, model.priors.base_s, model.priors.per_unit_s, 20) < 0.10


def test_a_prediction_is_confirmed_once_its_latest_completions_agree_with_it() -> None:
    model = CostModel()
    assert not model.confirmed(KEY)
    model.observe(100, KEY, 1.2 * model.predict(100, KEY).mean_s)
    assert model.confirmed(KEY) and not model.confirmed(OTHER)
    off = CostModel()
    prior = off.predict(100, KEY).mean_s
    model_says = []
    for _ in range(3):
        off.observe(100, KEY, prior / 20)
        model_says.append(off.confirmed(KEY))
    assert model_says == [False, False, True]  # the third completion outvotes the prior: now it agrees


# --- warm-ups: an upper bound on a warm request ------------------------------------------------------


def test_a_warm_up_faster_than_the_prior_lowers_it() -> None:
    model = CostModel()
    prior = model.predict(15, KEY).mean_s
    model.observe_warmup(15, KEY, 0.1 * prior)  # backends far faster than the prior, even cold
    assert model.predict(15, KEY).mean_s == pytest.approx(0.1 * prior)
    assert model.predict(500, KEY).mean_s == pytest.approx(0.1 * CostModel().predict(500, KEY).mean_s)
    assert model.samples(KEY) == 0  # completions only
    assert model.predict(15, OTHER) == CostModel().predict(15, OTHER)  # its own configuration only


def test_a_warm_up_slower_than_the_prior_teaches_nothing() -> None:
    model = CostModel()
    before = model.predict(15, KEY)
    model.observe_warmup(15, KEY, 9 * before.mean_s)  # a model load plus a cold start
    assert model.predict(15, KEY) == before
    for bad in (math.nan, math.inf, -1.0):
        model.observe_warmup(15, KEY, bad)
        model.observe_warmup(bad, KEY, 1.0)
    assert model.predict(15, KEY) == before


def test_the_median_of_recent_warm_ups_sets_the_bound() -> None:
    model = CostModel()
    prior = model.predict(15, KEY).mean_s
    for factor in (0.2, 0.3, 5.0):  # one backend loaded its model first: the median ignores it
        model.observe_warmup(15, KEY, factor * prior)
    assert model.predict(15, KEY).mean_s == pytest.approx(0.3 * prior)


def test_warm_ups_do_not_hold_back_what_completions_teach() -> None:
    model = CostModel()
    prior_a, prior_b = model.priors.base_s, model.priors.per_unit_s
    for _ in range(4):
        model.observe_warmup(15, KEY, 0.3 * model.priors.base_s + 0.3 * prior_b * 15)  # cold: 3x the truth
    feed(model, a=prior_a * 0.1, b=prior_b * 0.1, n=5, sigma=0.1)
    assert relative_error(model, prior_a * 0.1, prior_b * 0.1, 100) < 0.15


@pytest.mark.parametrize(("sigma", "low", "high"), [(0.05, 1.0, 1.2), (0.2, 1.25, 1.55), (0.35, 1.55, 2.0)])
def test_p95_reflects_the_noise(sigma: float, low: float, high: float) -> None:
    # Log-normal noise: the p95 sits exp(1.645·sigma) above the median (1.09, 1.39, 1.78).
    model = CostModel()
    feed(model, a=1.0, b=0.2, n=256, sigma=sigma)
    prediction = model.predict(300, KEY)
    assert low < prediction.p95_s / prediction.mean_s < high


def test_model_keys_learn_independently() -> None:
    model = CostModel()
    feed(model, a=1.0, b=0.1, n=104, key=KEY)
    feed(model, a=2.0, b=0.4, n=104, key=OTHER, seed=1)
    assert relative_error(model, 1.0, 0.1, 300, KEY) < 0.10
    assert relative_error(model, 2.0, 0.4, 300, OTHER) < 0.10
    assert model.samples(KEY) == model.samples(OTHER) == 104
    unseen = (24000, True)
    assert model.predict(20, unseen) == CostModel().predict(20, unseen)
    assert set(model.describe()) == {"24000:false", "32000:true"}


def test_a_key_learns_from_its_first_completion() -> None:
    model = CostModel()
    prior = model.predict(100, KEY).mean_s
    model.observe(100, KEY, 100.0)  # 6x the prior line
    assert prior < model.predict(100, KEY).mean_s < 1.1 * prior
    model.observe(100, KEY, 100.0)
    model.observe(100, KEY, 100.0)
    assert model.predict(100, KEY).mean_s == pytest.approx(100.0, rel=0.1)


def test_refits_are_cached_between_batches_of_new_samples() -> None:
    model = CostModel()
    for i in range(10 * REFIT_EVERY):
        model.observe(20 + i, KEY, 5.0 + i / 10)
        for _ in range(20):
            model.predict(20 + i, KEY)
    # One refit per completion up to REFIT_EVERY, then one per REFIT_EVERY completions.
    assert model.fit_count == REFIT_EVERY + 9
    for _ in range(1000):
        model.predict(100, KEY)
    assert model.fit_count == REFIT_EVERY + 9


@pytest.mark.parametrize("actual", [math.nan, math.inf, -1.0])
def test_invalid_observations_are_ignored(actual: float) -> None:
    model = CostModel()
    model.observe(20, KEY, actual, backend_id="b0")
    model.observe(math.nan, KEY, 3.0, backend_id="b0")
    model.observe(-5, KEY, 3.0)
    assert model.samples(KEY) == 0
    assert model.describe() == {}


def test_a_slow_backend_is_flagged_only_after_enough_samples_and_only_when_slow() -> None:
    priors = CostPriors()
    model = CostModel(priors)
    backends = ["b0", "b1", "b2", "b3"]
    rng = random.Random(7)
    for i in range(4 * priors.slow_min_samples):
        backend = backends[i % 4]
        units = rng.uniform(10, 400)
        speed = 3.0 if backend == "b3" else 1.0
        if i == 4 * priors.slow_min_samples - 1:  # b3's last sample: it has min - 1 so far
            assert model.slow_backends() == set()
            assert model.backend_factor("b3") == 1.0
        model.observe(units, KEY, speed * CostModel().predict(units, KEY).mean_s, backend_id=backend)
    assert model.slow_backends() == {"b3"}
    assert model.backend_factor("b3") > priors.slow_ratio
    assert all(model.backend_factor(b) < 1.2 for b in backends[:3])
    model.forget_backend("b3")
    assert model.slow_backends() == set()
    assert model.backend_factor("unknown") == 1.0


def test_a_uniformly_fast_pool_has_no_slow_backend() -> None:
    model = CostModel()
    for i in range(100):
        model.observe(50, KEY, 0.5 * CostModel().predict(50, KEY).mean_s, backend_id=f"b{i % 2}")
    assert model.slow_backends() == set()


@given(
    st.lists(
        st.tuples(st.floats(0, 2000), st.floats(0, 1000)),
        max_size=3 * REFIT_EVERY,
    ),
    st.floats(0, 5000),
    st.floats(0, 5000),
)
def test_prediction_is_non_decreasing_in_units_and_p95_at_least_the_mean(
    samples: list[tuple[float, float]], u1: float, u2: float
) -> None:
    model = CostModel()
    for units, actual in samples:
        model.observe(units, KEY, actual)
    low, high = sorted((u1, u2))
    p_low, p_high = model.predict(low, KEY), model.predict(high, KEY)
    assert 0 <= p_low.mean_s <= p_high.mean_s
    assert p_low.p95_s >= p_low.mean_s
    fit = model.describe().get("24000:false")
    if fit is not None:
        assert fit["a_s"] >= 0 and fit["b_s_per_unit"] > 0


def test_priors_are_validated() -> None:
    with pytest.raises(ValueError, match="per_unit_s"):
        CostPriors(per_unit_s=0)
    with pytest.raises(ValueError, match="window"):
        CostPriors(window=2)
    with pytest.raises(ValueError, match="base_s must be finite"):
        CostPriors(base_s=math.inf)


def test_the_pure_core_imports_neither_asyncio_nor_aiohttp() -> None:
    code = ("import scheduler.core.cost, scheduler.core.deadlines, sys; "
            "print('asyncio' in sys.modules, 'aiohttp' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"
