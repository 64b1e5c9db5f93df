"""The one middleware: request ids, aiohttp's own refusals in upstream's shape, raised errors as answers.

Every request gets its id under ``REQUEST_ID_KEY`` (the client's X-Request-ID when it is a sane token,
else a new one), echoed on every answer not already sent. 404 and 405 are upstream's (FastAPI's)
bodies; a body over ``limits.max_body_bytes`` is the sidecar's 413, and the connection is closed
rather than the rest of the body read. A handler raises a scheduler.errors.SidecarError or a
glmtts.errors.HTTPDetailError instead of building the answer: this is where it is rendered.

Under ``/v1/`` (OpenAI's speech API) every error answer -- the handlers' and aiohttp's 404, 405
and 413 -- is in OpenAI's shape instead: ``{"error": {"message", "type", "param", "code"}}``, with
``retry-after-ms`` beside ``Retry-After`` and ``x-should-retry: false`` where a retry cannot help
(the official SDKs retry 408, 409, 429 and 5xx by themselves; a retry of a request past or unable
to meet its deadline, too long or malformed would only pile orphaned work on the backends).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from glmtts.errors import HTTPDetailError
from glmtts.responses import json_response
from scheduler.errors import BodyTimeout, InvalidField, PayloadTooLarge, SidecarError, UnknownModel

log = logging.getLogger("glmtts_sidecar")

OPENAI_PREFIX = "/v1/"
# OpenAI's error `type` by status; `code` is OpenAI's where it has one for the case, else the sidecar's reason.
_OPENAI_TYPES = {401: "invalid_request_error", 429: "requests"}
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}

REQUEST_ID = "X-Request-ID"
# Where a request's id is kept on it: a typed key where aiohttp has them (3.14 and later), else a string.
_REQUEST_KEY = getattr(web, "RequestKey", None)
REQUEST_ID_KEY: Any = _REQUEST_KEY("request_id", str) if _REQUEST_KEY is not None else "request_id"


def request_id_of(request: web.Request) -> str:
    """The id the middleware gave `request`."""
    return str(request[REQUEST_ID_KEY])


def error_response(exc: SidecarError | HTTPDetailError) -> web.Response:
    """The answer an error gives: its bytes, status and headers; closing the connection when it says so."""
    headers = exc.headers() if isinstance(exc, SidecarError) else {}
    response = web.Response(body=exc.body_bytes(), status=exc.status,
                            headers={"Content-Type": "application/json", **headers})
    if isinstance(exc, SidecarError) and exc.close:
        response.force_close()
    return response


def too_large_body(limit: int) -> PayloadTooLarge:
    """A request body over ``limits.max_body_bytes``: the rest of it is not read."""
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes", limit=limit, close=True)


def request_id(request: web.Request) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one."""
    given = request.headers.get(REQUEST_ID, "")
    if 0 < len(given) <= 200 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


def openai_error_body(exc: SidecarError | HTTPDetailError) -> dict[str, object]:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    message = exc.detail if isinstance(exc.detail, str) else "Invalid request"
    param = exc.param if isinstance(exc, SidecarError) else None
    reason = exc.reason if isinstance(exc, SidecarError) else None
    return {"error": {"message": message, "type": _openai_type(exc.status), "param": param,
                      "code": _openai_code(exc, reason)}}


def openai_error_response(exc: SidecarError | HTTPDetailError) -> web.Response:
    """An error in OpenAI's shape, for the /v1/ routes."""
    status = exc.status
    headers = exc.headers() if isinstance(exc, SidecarError) else {}
    retry_after = exc.retry_after if isinstance(exc, SidecarError) else None
    if retry_after is not None:
        headers["retry-after-ms"] = str(max(1, math.ceil(retry_after * 1000)))
    if not retryable(exc):
        headers["x-should-retry"] = "false"
    response = json_response(openai_error_body(exc), status, headers)
    if isinstance(exc, SidecarError) and exc.close:
        response.force_close()
    return response


def retryable(exc: SidecarError | HTTPDetailError) -> bool:
    """Whether the same request sent again may succeed: the server was busy or starting (429 with a
    Retry-After, 5xx) or the body was slow to arrive (408 before any work); never a refusal of the
    request itself, a deadline it cannot meet or has passed, or a 429 that names no time to wait."""
    if isinstance(exc, BodyTimeout) or exc.status >= 500:
        return True
    if isinstance(exc, SidecarError) and exc.reason == "deadline_unmeetable":
        # Its Retry-After (when the backlog would have drained enough) stays for a client that
        # decides for itself; an SDK retrying on its own would only queue more work that misses.
        return False
    return exc.status == 429 and isinstance(exc, SidecarError) and exc.retry_after is not None


def _openai_type(status: int) -> str:
    if status in _OPENAI_TYPES:
        return _OPENAI_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def _openai_code(exc: SidecarError | HTTPDetailError, reason: str | None) -> str | None:
    if isinstance(exc, InvalidField):
        return "invalid_value"
    if isinstance(exc, UnknownModel):
        return "model_not_found"
    if isinstance(exc, PayloadTooLarge) and exc.param == "input":
        return "string_above_max_length"
    if exc.status == 429:
        return _OPENAI_CODES[429] if reason in ("queue_full", "tenant_queue_full", "rate_limited") else reason
    return _OPENAI_CODES.get(exc.status, reason)


def _framework_error(status: int, message: str) -> SidecarError:
    """aiohttp's own refusal as an error the OpenAI renderer takes; OpenAI's wording for a bad URL."""
    error = SidecarError(message)
    error.status = status
    error.reason = {404: "not_found", 405: "method_not_allowed", 500: "internal"}.get(status, "bad_request")
    return error


def make_middleware(max_body_bytes: Callable[[], int]) -> Middleware:
    """``max_body_bytes``: the configured limit now (a reload may change the figure an answer names)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request)
        request[REQUEST_ID_KEY] = rid
        openai = request.path.startswith(OPENAI_PREFIX)
        render = openai_error_response if openai else error_response
        try:
            response = await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            allow = {"Allow": ", ".join(sorted(exc.allowed_methods))}
            if openai:
                response = openai_error_response(
                    _framework_error(405, f"Method {request.method} is not allowed on {request.path}"))
                response.headers.update(allow)
            else:
                response = json_response({"detail": "Method Not Allowed"}, 405, allow)
        except web.HTTPNotFound:
            response = (openai_error_response(_framework_error(404,
                                                               f"Invalid URL ({request.method} {request.path})"))
                        if openai else json_response({"detail": "Not Found"}, 404))
        except web.HTTPRequestEntityTooLarge:
            response = render(too_large_body(max_body_bytes()))
        except (SidecarError, HTTPDetailError) as exc:
            response = render(exc)
        except web.HTTPException:
            raise
        except Exception:
            if not openai:
                raise  # aiohttp's own 500, as before
            # An OpenAI client parses every error body: a bug still answers in its shape (and is logged).
            log.exception("request %s to %s failed", rid, request.path)
            response = openai_error_response(_framework_error(500, "The server had an error processing the request"))
        if not response.prepared:
            response.headers[REQUEST_ID] = rid
        return response

    return middleware
