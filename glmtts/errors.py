"""The one exception tree of the `glmtts` package.

    GLMTTSError
    ├── HTTPDetailError        an answer upstream gives as ``{"detail": ...}`` with a status
    │   ├── FormError          400: the body is not a well-formed form (glmtts.form)
    │   ├── ValidationFailed   422: FastAPI-style field errors (glmtts.contract)
    │   └── PayloadTooLarge    413: body or text over a configured limit
    └── ClientError            raised by glmtts.client
        ├── APIError           the server answered with an error status (status, detail)
        ├── GenerationFailed   200 with ``success: false`` (upstream's inference failure)
        ├── BadResponse        the answer is not what the contract promises
        └── TransportError     no answer: refused, reset, timed out
"""

from __future__ import annotations

import json
from typing import Any


def dump_json(obj: Any) -> bytes:
    """Serialise like FastAPI's JSONResponse, so our bodies are byte-identical to upstream's."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


class GLMTTSError(Exception):
    """Base of every error this package raises on purpose."""


class HTTPDetailError(GLMTTSError):
    """An error answer in upstream's shape: ``{"detail": detail}`` with ``status``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else f"HTTP {status}")
        self.status = status
        self.detail = detail

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail}

    def body_bytes(self) -> bytes:
        return dump_json(self.body())


class ValidationFailed(HTTPDetailError):
    """FastAPI's request validation error: 422 with a list of field errors."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(422, errors)
        self.errors = errors

    def __str__(self) -> str:
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in self.errors)


class PayloadTooLarge(HTTPDetailError):
    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class ClientError(GLMTTSError):
    """Something went wrong talking to a GLM-TTS server."""


class APIError(ClientError):
    def __init__(self, status: int, detail: Any, *, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.body = body


class GenerationFailed(ClientError):
    """Upstream answered 200 but ``success`` is false; ``error`` is its message."""

    def __init__(self, message: str, error: str | None, generation_time: float | None) -> None:
        super().__init__(f"{message}: {error}")
        self.message = message
        self.error = error
        self.generation_time = generation_time


class BadResponse(ClientError):
    pass


class TransportError(ClientError):
    pass
