from __future__ import annotations

import pytest

from backend.backoff import JITTER, STABLE_AFTER_S, Backoff


def delays(backoff: Backoff, n: int, **kwargs: float) -> list[float]:
    return [round(backoff.next_delay(**kwargs), 9) for _ in range(n)]


def test_doubles_up_to_the_ceiling_without_jitter_at_the_midpoint() -> None:
    backoff = Backoff(0.5, 30.0, rand=lambda: 0.5)
    assert delays(backoff, 9) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_jitter_is_plus_minus_twenty_percent_of_the_nominal_delay() -> None:
    assert JITTER == 0.2
    low = Backoff(1.0, 8.0, rand=lambda: 0.0)
    assert delays(low, 5) == [0.8, 1.6, 3.2, 6.4, 6.4]
    high = Backoff(1.0, 8.0, rand=lambda: 0.999999999)
    assert all(d <= n * 1.2 for d, n in zip(delays(high, 5), [1.0, 2.0, 4.0, 8.0, 8.0], strict=True))
    assert delays(Backoff(1.0, 8.0, rand=lambda: 0.75), 2) == [1.1, 2.2]


def test_a_stable_run_resets_the_schedule_and_a_short_one_does_not() -> None:
    backoff = Backoff(0.5, 30.0, rand=lambda: 0.5)
    assert delays(backoff, 4) == [0.5, 1.0, 2.0, 4.0]
    assert backoff.next_delay(ready_for_s=STABLE_AFTER_S - 1) == 8.0
    assert backoff.next_delay(ready_for_s=STABLE_AFTER_S) == 0.5
    assert backoff.nominal_s == 1.0
    backoff.reset()
    assert backoff.nominal_s == 0.5


def test_initial_equal_to_max_stays_constant() -> None:
    assert delays(Backoff(2.0, 2.0, rand=lambda: 0.5), 3) == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_rejects_impossible_bounds(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, maximum)
