from __future__ import annotations

import json

import pytest

from backend.health import HealthResult, HealthTracker, parse_health


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


HEALTHY_IDLE = body(status="healthy", model_loaded=False, model_sample_rate=None, model_use_phoneme=None,
                    prompt_cache_count=2)


def test_healthy_without_a_loaded_model_has_no_model_key() -> None:
    assert parse_health(200, HEALTHY_IDLE) == HealthResult(healthy=True, model_key=None)


@pytest.mark.parametrize(("rate", "phoneme"), [(24000, False), (32000, True)])
def test_healthy_with_a_loaded_model_reports_its_key(rate: int, phoneme: bool) -> None:
    answer = body(status="healthy", model_loaded=True, model_sample_rate=rate, model_use_phoneme=phoneme,
                  prompt_cache_count=0)
    assert parse_health(200, answer) == HealthResult(healthy=True, model_key=(rate, phoneme))


@pytest.mark.parametrize("answer", [
    body(status="healthy", model_loaded=False, model_sample_rate=24000, model_use_phoneme=False),
    body(status="healthy", model_loaded=True, model_sample_rate=None, model_use_phoneme=False),
    body(status="healthy", model_loaded=True, model_sample_rate=True, model_use_phoneme=False),
    body(status="healthy", model_loaded=True, model_sample_rate=24000, model_use_phoneme="no"),
    body(status="healthy"),
])
def test_a_missing_or_inconsistent_model_is_no_key_but_still_healthy(answer: bytes) -> None:
    assert parse_health(200, answer) == HealthResult(healthy=True, model_key=None)


@pytest.mark.parametrize(("status", "answer", "error"), [
    (503, body(detail="emulated unhealthy period"), "health answered HTTP 503"),
    (404, body(detail="Not Found"), "health answered HTTP 404"),
    (200, b"<html>ok</html>", "health answer is not JSON"),
    (200, b"\xff\xfe", "health answer is not JSON"),
    (200, b"[1, 2]", "health answer is not a JSON object"),
    (200, body(status="degraded"), "health status is 'degraded'"),
    (200, body(model_loaded=True), "health status is None"),
])
def test_unhealthy_answers_say_why(status: int, answer: bytes, error: str) -> None:
    assert parse_health(status, answer) == HealthResult(healthy=False, error=error)


def test_tracker_falls_after_fall_failures_in_a_row_and_rises_after_rise_successes() -> None:
    tracker = HealthTracker(rise=2, fall=3)
    assert tracker.healthy and tracker.unhealthy_since is None
    assert [tracker.record(False, t) for t in (1.0, 2.0)] == [False, False]
    assert tracker.record(True, 3.0) is False  # breaks the failure streak
    assert [tracker.record(False, t) for t in (4.0, 5.0, 6.0)] == [False, False, True]
    assert not tracker.healthy and tracker.unhealthy_since == 6.0 and tracker.bad_streak == 3
    assert tracker.record(True, 7.0) is False
    assert tracker.record(False, 8.0) is False  # a failure in between starts the rise again
    assert tracker.record(True, 9.0) is False
    assert tracker.record(True, 10.0) is True
    assert tracker.healthy and tracker.unhealthy_since is None and tracker.good_streak == 2


def test_tracker_mark_down_needs_rise_successes_and_keeps_the_first_down_time() -> None:
    tracker = HealthTracker(rise=1, fall=3)
    tracker.record(True, 1.0)
    tracker.mark_down(2.0)
    assert not tracker.healthy and tracker.unhealthy_since == 2.0
    tracker.mark_down(3.0)
    assert tracker.unhealthy_since == 2.0
    assert tracker.record(True, 4.0) is True and tracker.healthy


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0)])
def test_tracker_rejects_impossible_counts(rise: int, fall: int) -> None:
    with pytest.raises(ValueError):
        HealthTracker(rise=rise, fall=fall)
