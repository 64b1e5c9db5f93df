"""scheduler.errors: the one tree of the sidecar's error answers, and how the middleware renders them."""

from __future__ import annotations

import json
import re

import pytest

from glmtts.errors import HTTPDetailError
from scheduler import errors
from scheduler.errors import (
    BodyTimeout,
    DeadlineExpired,
    InvalidField,
    NoBackend,
    NotAttributed,
    PayloadTooLarge,
    Refused,
    Rejected,
    SidecarError,
    Unauthorized,
    UnknownModel,
    UnknownVoice,
)
from scheduler.http.middleware import error_response, openai_error_response, too_large_body


def subclasses(cls: type[SidecarError]) -> set[type[SidecarError]]:
    found = set(cls.__subclasses__())
    return found.union(*(subclasses(c) for c in cls.__subclasses__()))


def drawn() -> dict[str, str]:
    """The tree in the module docstring: class name -> the status column as drawn."""
    doc = errors.__doc__ or ""
    return {m[1]: m[2] for m in re.finditer(r"[├└]── (\w+)\s+(\S+)", doc)}


def test_the_drawn_tree_is_the_tree() -> None:
    classes = {c.__name__: c for c in subclasses(SidecarError) if c.__module__ == errors.__name__}
    tree = drawn()
    assert set(tree) == set(classes)
    for name, status in tree.items():
        if status.isdigit():
            assert classes[name].status == int(status), name
    # Each class names its own reason, but those whose instances are given theirs by scheduler.core.
    named = [c for c in classes.values() if not issubclass(c, Refused)]
    assert all(c.reason != SidecarError.reason for c in named)
    assert len({c.reason for c in named}) == len(named)


def test_a_body_is_serialised_as_upstreams_fastapi_does() -> None:
    exc = PayloadTooLarge("input_text is 301 characters; the limit is 300 — 字", limit=300)
    assert exc.body_bytes() == ('{"detail":"input_text is 301 characters; the limit is 300 — 字","reason":"too_large",'
                                '"limit":300}').encode()
    assert exc.headers() == {} and exc.close is False


@pytest.mark.parametrize("retry_after,header", [(0.0, "1"), (0.2, "1"), (1.0, "1"), (2.1, "3"), (30.0, "30")])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(retry_after: float, header: str) -> None:
    assert NoBackend("No backend is ready", retry_after=retry_after).headers() == {"Retry-After": header}


def test_unauthorized_asks_for_a_bearer_token() -> None:
    exc = Unauthorized("This endpoint needs the admin token (Authorization: Bearer <token>)")
    assert (exc.status, exc.reason, exc.headers()) == (401, "unauthorized", {"WWW-Authenticate": "Bearer"})


def test_refusals_from_the_core_carry_their_own_status_and_reason() -> None:
    rejected = Rejected(429, "queue_full", "The queue is full", retry_after=4.5)
    assert (rejected.status, rejected.reason, rejected.headers()) == (429, "queue_full", {"Retry-After": "5"})
    assert rejected.body() == {"detail": "The queue is full", "reason": "queue_full"}
    tenant = NotAttributed(401, "unauthorized", "Unknown API key")
    assert (tenant.status, tenant.reason, tenant.headers()) == (401, "unauthorized", {})
    assert Rejected.status == SidecarError.status  # the instance's, not the class's


def test_what_closes_the_connection() -> None:
    assert BodyTimeout("The request body did not arrive within 2 s").close is True
    assert DeadlineExpired("late").close is False
    assert PayloadTooLarge("too long").close is False
    big = too_large_body(65536)
    assert big.close is True
    assert big.body_bytes() == (b'{"detail":"Request body is larger than the limit of 65536 bytes",'
                                b'"reason":"too_large","limit":65536}')


def test_error_response_renders_bytes_status_headers_and_closing() -> None:
    response = error_response(NoBackend("No backend is ready", retry_after=1.0))
    assert (response.status, response.body) == (503, b'{"detail":"No backend is ready","reason":"no_backend"}')
    assert dict(response.headers) == {"Content-Type": "application/json", "Retry-After": "1"}
    assert response.keep_alive is None  # left to the connection
    closing = error_response(too_large_body(10))
    assert closing.status == 413 and closing.keep_alive is False


def test_error_response_renders_upstreams_errors_as_they_are() -> None:
    response = error_response(HTTPDetailError(422, [{"loc": ["body", "input_text"], "msg": "Field required"}]))
    assert response.status == 422
    assert response.body == b'{"detail":[{"loc":["body","input_text"],"msg":"Field required"}]}'
    assert dict(response.headers) == {"Content-Type": "application/json"}
    assert response.keep_alive is None


# --- OpenAI's shape, on the /v1/ routes -------------------------------------------------------------


@pytest.mark.parametrize(("exc", "status", "type_", "code", "should_retry"), [
    (InvalidField("speed must be a number, not a string", param="speed"), 400, "invalid_request_error",
     "invalid_value", "false"),
    (Unauthorized("Unknown API key"), 401, "invalid_request_error", "invalid_api_key", "false"),
    (UnknownModel("The model 'x' does not exist"), 404, "invalid_request_error", "model_not_found", "false"),
    (UnknownVoice("The voice 'x' is unknown"), 404, "invalid_request_error", "unknown_voice", "false"),
    (DeadlineExpired("past its deadline"), 408, "invalid_request_error", "deadline", "false"),
    (BodyTimeout("slow body"), 408, "invalid_request_error", "body_timeout", None),
    (PayloadTooLarge("input is 9 characters", limit=8, param="input"), 413, "invalid_request_error",
     "string_above_max_length", "false"),
    (Rejected(429, "queue_full", "The queue is full", retry_after=2.5), 429, "requests", "rate_limit_exceeded", None),
    (Rejected(429, "deadline_unmeetable", "Cannot meet it"), 429, "requests", "deadline_unmeetable", "false"),
    (Rejected(429, "deadline_unmeetable", "Cannot meet it yet", retry_after=4.0), 429, "requests",
     "deadline_unmeetable", "false"),
    (NoBackend("No backend is ready", retry_after=1.0), 503, "server_error", "no_backend", None),
    (HTTPDetailError(400, "input_text is required"), 400, "invalid_request_error", None, "false"),
])
def test_openai_errors_carry_type_code_param_and_whether_a_retry_can_help(
        exc: SidecarError | HTTPDetailError, status: int, type_: str, code: str | None,
        should_retry: str | None) -> None:
    response = openai_error_response(exc)
    assert response.status == status
    assert response.body is not None
    error = json.loads(response.body)["error"]  # type: ignore[arg-type]
    assert error == {"message": str(exc), "type": type_, "param": getattr(exc, "param", None), "code": code}
    assert response.headers.get("x-should-retry") == should_retry


def test_openai_retry_after_comes_in_seconds_and_milliseconds() -> None:
    response = openai_error_response(Rejected(429, "queue_full", "The queue is full", retry_after=2.5))
    assert (response.headers["Retry-After"], response.headers["retry-after-ms"]) == ("3", "2500")
    assert "retry-after-ms" not in openai_error_response(DeadlineExpired("late")).headers
