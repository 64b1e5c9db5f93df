"""Fan-out's cut under noisy service times (scheduler.core.makespan): pure, no clock, no sockets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.makespan import DRAWS, expected_makespan, largest_normal, noise_sigma, tail_share


def test_noise_sigma_inverts_a_log_normal_p95() -> None:
    for sigma in (0.05, 0.25, 0.6):
        assert noise_sigma(2.0, 2.0 * math.exp(1.6448536 * sigma)) == pytest.approx(sigma, rel=1e-6)
    # No spread measured, or nonsense: no noise assumed.
    for mean, p95 in ((2.0, 2.0), (2.0, 1.0), (0.0, 1.0), (-1.0, 2.0), (math.nan, 2.0), (1.0, math.inf)):
        assert noise_sigma(mean, p95) == 0.0


def test_largest_normal_matches_the_known_expectations() -> None:
    # E[max of n standard normals]: 0.5642 (2), 1.0294 (4), 1.4236 (8), 1.7660 (16).
    assert largest_normal(1) == 0.0
    for count, known in ((2, 0.5642), (4, 1.0294), (8, 1.4236), (16, 1.7660)):
        assert largest_normal(count) == pytest.approx(known, rel=0.01)
    assert all(largest_normal(n) < largest_normal(n + 1) for n in range(1, 40))


def test_tail_share_grows_with_the_noise_and_the_lanes() -> None:
    assert tail_share(0.0, 4) == 0.0 and tail_share(0.3, 1) == 0.0 and tail_share(math.nan, 4) == 0.0
    spread = 0.25 * largest_normal(4)
    assert tail_share(0.25, 4) == pytest.approx(spread / (1 + spread))
    assert 0.18 < tail_share(0.25, 4) < 0.22  # about a fifth of a 4-lane request behind its first pieces
    assert tail_share(0.1, 4) < tail_share(0.25, 4) < tail_share(0.25, 8) < 1.0


def test_without_noise_the_makespan_is_the_schedule_s() -> None:
    # Lanes take the next piece as they free: [3, 3] -> [5, 3] -> [5, 5] -> [7, 5].
    assert expected_makespan([3.0, 3.0, 2.0, 2.0, 2.0], 2, 0.0) == pytest.approx(7.0)
    assert expected_makespan([4.0, 1.0, 1.0], 3, 0.0) == pytest.approx(4.0)
    assert expected_makespan([], 4, 0.3) == 0.0
    assert expected_makespan([2.0], 1, 0.0) == pytest.approx(2.0)


def test_noise_lengthens_the_makespan_and_the_estimate_is_repeatable() -> None:
    pieces = [1.0] * 8
    noisy = expected_makespan(pieces, 4, 0.25)
    assert noisy > expected_makespan(pieces, 4, 0.0) == pytest.approx(2.0)
    # The same draws on every call, whatever was asked in between (rows grow independently).
    expected_makespan([1.0] * 40, 4, 0.25)
    assert expected_makespan(pieces, 4, 0.25) == noisy
    # One lane: the sum of log-normals, whose mean is n·exp(σ²/2) (within what DRAWS draws allow).
    alone = expected_makespan([1.0] * 6, 1, 0.2)
    assert alone == pytest.approx(6 * math.exp(0.02), rel=3 * 0.2 / math.sqrt(6 * DRAWS))


def test_under_noise_big_first_pieces_and_small_ones_behind_finish_sooner_than_even_ones() -> None:
    # The same work on 4 lanes: eight even pieces, or four big ones and four small ones behind them.
    even = [1.0] * 8
    tapered = [1.6] * 4 + [0.4] * 4
    assert expected_makespan(tapered, 4, 0.25) < expected_makespan(even, 4, 0.25)
    # Without noise the even cut is as good (both 2.0), and a fixed cost per piece tips it back.
    assert expected_makespan(tapered, 4, 0.0) == expected_makespan(even, 4, 0.0) == pytest.approx(2.0)


@pytest.mark.parametrize(("pieces", "lanes", "sigma", "match"), [
    ([1.0], 0, 0.1, "lanes"), ([1.0], 2, -0.1, "sigma"), ([1.0], 2, math.inf, "sigma"),
    ([1.0, -1.0], 2, 0.1, "piece"), ([math.nan], 2, 0.1, "piece"),
])
def test_bad_input_is_refused_by_name(pieces: list[float], lanes: int, sigma: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expected_makespan(pieces, lanes, sigma)


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.floats(0.0, 100.0), max_size=20), lanes=st.integers(1, 8), sigma=st.floats(0.0, 1.0))
def test_the_makespan_is_at_least_the_longest_piece_and_the_average_load(
        pieces: list[float], lanes: int, sigma: float) -> None:
    if sigma == 0.0 and pieces:
        got = expected_makespan(pieces, lanes, sigma)
        assert got >= max(pieces) - 1e-9 and got >= sum(pieces) / lanes - 1e-9
    assert expected_makespan(pieces, lanes, sigma) >= 0.0
