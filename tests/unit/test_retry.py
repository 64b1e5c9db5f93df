"""The retry budget (scheduler.core.retry): a floor of concurrent retries, a ratio of recent requests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.retry import RetryBudget


def test_min_concurrent_is_always_allowed() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrent=3, window_s=10.0)
    assert [budget.try_acquire(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.active == 3
    budget.release()
    assert budget.try_acquire(0.0)


def test_the_ratio_of_recent_requests_raises_the_floor() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrent=1, window_s=10.0)
    for i in range(50):
        budget.record_request(i * 0.1)
    granted = sum(budget.try_acquire(5.0) for _ in range(20))
    assert granted == 10  # 20 % of 50


def test_requests_leave_the_window() -> None:
    budget = RetryBudget(ratio=0.5, min_concurrent=1, window_s=10.0)
    for _ in range(10):
        budget.record_request(0.0)
    assert sum(budget.try_acquire(9.999) for _ in range(10)) == 5  # still inside (0, 10)
    for _ in range(5):
        budget.release()
    assert sum(budget.try_acquire(10.0) for _ in range(10)) == 1  # a request at 0 is out at 10: the floor only


def test_release_never_goes_negative() -> None:
    budget = RetryBudget()
    budget.release()
    assert budget.active == 0


@settings(max_examples=200, deadline=None, database=None)
@given(ratio=st.floats(0.0, 1.0), min_concurrent=st.integers(0, 5), window_s=st.floats(0.5, 30.0),
       events=st.lists(st.tuples(st.sampled_from(["request", "acquire", "release"]), st.floats(0.0, 5.0)),
                       max_size=80))
def test_retries_in_flight_stay_within_the_budget(ratio: float, min_concurrent: int, window_s: float,
                                                  events: list[tuple[str, float]]) -> None:
    """A permit is granted iff retries in flight < max(min_concurrent, int(ratio x requests in the
    last window_s)); so granted permits never exceed that bound at grant time."""
    budget = RetryBudget(ratio=ratio, min_concurrent=min_concurrent, window_s=window_s)
    now = 0.0
    requests: list[float] = []
    for kind, dt in events:
        now += dt
        if kind == "request":
            budget.record_request(now)
            requests.append(now)
        elif kind == "acquire":
            recent = sum(1 for t in requests if t > now - window_s)
            limit = max(min_concurrent, int(ratio * recent))
            before = budget.active
            assert budget.try_acquire(now) == (before < limit)
            assert budget.active <= max(limit, before)
        else:
            before = budget.active
            budget.release()
            assert budget.active == max(0, before - 1)
