from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.core.cost import Prediction
from scheduler.core.deadlines import (
    SEED_TIERS,
    Deadline,
    LearnedPolicy,
    Tier,
    TiersPolicy,
    client_budget,
    make_policy,
    shed_message,
    timeout_message,
)

ANY = Prediction(mean_s=3.5, p95_s=4.55)


def p95(seconds: float) -> Prediction:
    return Prediction(mean_s=seconds / 1.3, p95_s=seconds)


@pytest.mark.parametrize(
    ("chars", "timeout_s"), [(0, 60.0), (1, 60.0), (50, 60.0), (51, 300.0), (200, 300.0), (201, 600.0), (10**6, 600.0)]
)
def test_seed_tiers_boundaries(chars: int, timeout_s: float) -> None:
    assert TiersPolicy(SEED_TIERS).budget_s(chars=chars, prediction=ANY) == timeout_s


def test_tiers_ignore_the_prediction() -> None:
    policy = TiersPolicy()
    assert policy.budget_s(chars=10, prediction=p95(1000.0)) == 60.0


@pytest.mark.parametrize(
    ("tiers", "problem"),
    [
        ([], "last tier"),
        ([Tier(max_chars=50, timeout_s=60)], "last tier"),
        ([Tier(max_chars=None, timeout_s=60), Tier(max_chars=None, timeout_s=60)], "only the last"),
        (
            [Tier(max_chars=200, timeout_s=60), Tier(max_chars=50, timeout_s=60), Tier(max_chars=None, timeout_s=1)],
            "increase",
        ),
        ([Tier(max_chars=None, timeout_s=0)], "timeout_s"),
        ([Tier(max_chars=None, timeout_s=math.inf)], "timeout_s"),
    ],
)
def test_invalid_tiers_are_rejected(tiers: list[Tier], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TiersPolicy(tiers)


@pytest.mark.parametrize(("p95_s", "budget"), [(0.0, 10.0), (1.0, 10.0), (10.0, 25.0), (100.0, 205.0), (500.0, 900.0)])
def test_learned_is_p95_times_factor_plus_buffer_clamped(p95_s: float, budget: float) -> None:
    policy = LearnedPolicy(factor=2.0, buffer_s=5.0, min_s=10.0, max_s=900.0)
    assert policy.budget_s(chars=100, prediction=p95(p95_s)) == pytest.approx(budget)


@given(st.floats(min_value=0, allow_nan=False))
def test_learned_budget_stays_within_its_bounds(p95_s: float) -> None:
    policy = LearnedPolicy(factor=3.0, buffer_s=10.0, min_s=20.0, max_s=600.0)
    assert 20.0 <= policy.budget_s(chars=1, prediction=p95(p95_s)) <= 600.0


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"factor": 0.0}, "factor"),
        ({"buffer_s": -1.0}, "buffer_s"),
        ({"min_s": 0.0}, "min_s"),
        ({"min_s": 700.0}, "must not exceed"),
        ({"max_s": math.nan}, "max_s"),
    ],
)
def test_invalid_learned_settings_are_rejected(kwargs: dict[str, float], problem: str) -> None:
    settings = {"factor": 2.0, "buffer_s": 5.0, "min_s": 10.0, "max_s": 600.0} | kwargs
    with pytest.raises(ValueError, match=problem):
        LearnedPolicy(**settings)


def test_make_policy_by_name() -> None:
    settings = {"factor": 2.0, "buffer_s": 5.0, "min_s": 10.0, "max_s": 600.0}
    tiers = make_policy("tiers", tiers=SEED_TIERS, **settings)
    learned = make_policy("learned", tiers=SEED_TIERS, **settings)
    assert isinstance(tiers, TiersPolicy) and isinstance(learned, LearnedPolicy)
    assert learned.budget_s(chars=5, prediction=p95(100.0)) == 205.0
    with pytest.raises(ValueError, match="unknown deadline policy 'fifo'"):
        make_policy("fifo", tiers=SEED_TIERS, **settings)


@pytest.mark.parametrize(
    ("policy_s", "header", "max_s", "budget"),
    [
        (60.0, None, None, 60.0),
        (60.0, None, 30.0, 30.0),
        (60.0, "10", None, 10.0),
        (60.0, "2.5", None, 2.5),
        (60.0, " 7.25 ", None, 7.25),
        (60.0, ".5", None, 0.5),
        (60.0, "5.", None, 5.0),
        (60.0, "+5", None, 5.0),
        (60.0, "600", None, 60.0),  # never extends the policy
        (60.0, "45", 30.0, 30.0),  # nor max_s
        (60.0, "9" * 32, None, 60.0),
    ],
)
def test_client_budget_only_shortens(policy_s: float, header: str | None, max_s: float | None, budget: float) -> None:
    assert client_budget(policy_s, header, max_s=max_s) == budget


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("abc", "must be a number"),
        ("10s", "must be a number"),
        ("1e3", "must be a number"),
        ("1_0", "must be a number"),
        ("١٢", "must be a number"),  # Arabic-Indic digits: float() takes them, we do not
        ("0x10", "must be a number"),
        ("0", "must be positive"),
        ("0.000", "must be positive"),
        ("-5", "must be positive"),
        ("inf", "must be a finite"),
        ("-Infinity", "must be a finite"),
        ("NaN", "must be a finite"),
        ("1" * 33, "too long"),
        ("5" * 10_000, "too long"),
    ],
)
def test_client_budget_rejects_invalid_headers(header: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as error:
        client_budget(60.0, header)
    assert "X-Request-Timeout" in str(error.value)


@given(st.floats(min_value=1e-3, max_value=1e6), st.floats(min_value=1e-3, max_value=1e6))
def test_client_budget_is_never_more_than_the_policy(policy_s: float, asked: float) -> None:
    assert client_budget(policy_s, f"{asked:.6f}") <= policy_s


@pytest.mark.parametrize(
    ("timeout_s", "shown"),
    [(60, "60"), (60.0, "60"), (300.0, "300"), (2.5, "2.5"), (0.1234, "0.123"), (12.0004, "12"), (7.25, "7.25")],
)
def test_timeout_message_matches_upstream(timeout_s: float, shown: str) -> None:
    assert timeout_message(timeout_s, 42) == f"Request timeout after {shown} seconds. Text length: 42 characters."


def test_deadline_remaining_and_expiry() -> None:
    deadline = Deadline.start(100.0, 60.0)
    assert deadline == Deadline(at=160.0, budget_s=60.0)
    assert deadline.remaining(100.0) == 60.0
    assert deadline.remaining(159.5) == 0.5
    assert not deadline.expired(159.999)
    assert deadline.expired(160.0)
    assert deadline.remaining(170.0) == 0.0


def test_a_shed_request_is_told_upstreams_words_and_why_it_was_answered_early() -> None:
    message = shed_message(2.5, 40, 1.25)
    assert message.startswith(timeout_message(2.5, 40))
    assert "1.250 seconds" in message and "not started" in message
