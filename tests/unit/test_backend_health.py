from __future__ import annotations

import json

import pytest

from backend.health import HealthResult, parse_health


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
