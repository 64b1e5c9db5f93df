"""The one middleware: request ids, aiohttp's own refusals in upstream's shape, raised errors as answers.

Every request gets its id under ``REQUEST_ID_KEY`` (the client's X-Request-ID when it is a sane token,
else a new one), echoed on every answer not already sent. 404 and 405 are upstream's (FastAPI's)
bodies; a body over ``limits.max_body_bytes`` is the sidecar's 413, and the connection is closed
rather than the rest of the body read. A handler raises a scheduler.errors.SidecarError or a
glmtts.errors.HTTPDetailError instead of building the answer: this is where it is rendered.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from glmtts.errors import HTTPDetailError
from glmtts.responses import json_response
from scheduler.errors import PayloadTooLarge, SidecarError

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


def make_middleware(max_body_bytes: Callable[[], int]) -> Middleware:
    """``max_body_bytes``: the configured limit now (a reload may change the figure an answer names)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request)
        request[REQUEST_ID_KEY] = rid
        try:
            response = await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            response = json_response({"detail": "Method Not Allowed"}, 405,
                                     {"Allow": ", ".join(sorted(exc.allowed_methods))})
        except web.HTTPNotFound:
            response = json_response({"detail": "Not Found"}, 404)
        except web.HTTPRequestEntityTooLarge:
            response = error_response(too_large_body(max_body_bytes()))
        except (SidecarError, HTTPDetailError) as exc:
            response = error_response(exc)
        if not response.prepared:
            response.headers[REQUEST_ID] = rid
        return response

    return middleware
