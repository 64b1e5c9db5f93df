"""The sidecar's own error answers: each knows its status, reason, headers and whether it ends the connection.

    SidecarError                    {"detail": str, "reason": str, ...}
    ├── BadRequest            400   a header or parameter the sidecar cannot use
    │   ├── BadTimeout              X-Request-Timeout is not a number of seconds
    │   ├── BadAuthorization        the Authorization header is not ASCII
    │   ├── BadIdempotencyKey       Idempotency-Key is not 1..200 printable ASCII characters
    │   ├── CallbackNotAllowed      X-Callback-URL is outside tasks.callbacks.allow
    │   ├── BadHeader               X-Fanout is not on or off
    │   ├── NonAsciiHeader          a header a task stores is not ASCII ("header": its name)
    │   ├── InvalidField            a field of a JSON body (the OpenAI API) is wrong (``param``: its name)
    │   └── InvalidConfig           a reload found the file invalid ("problems": what is wrong)
    ├── Unauthorized          401   admin token missing or wrong (WWW-Authenticate: Bearer)
    ├── PromptPathNotAllowed  403   a prompt write names a file outside prompts.allowed_dirs
    ├── UnknownBackend        404   no backend has this id
    ├── UnknownTask           404   no task with this id, or not the caller's
    ├── UnknownVoice          404   an OpenAI API voice that is no configured voice or prompt index
    ├── UnknownModel          404   an OpenAI API model that is not configured
    ├── BodyTimeout           408   the request body did not arrive in time (closes the connection)
    ├── DeadlineExpired       408   upstream's wording
    ├── NoAudio               409   the task has no audio (yet) ("status": the task's)
    ├── PayloadTooLarge       413   body or text over the configured limit
    ├── IdempotencyKeyReused  422   an Idempotency-Key already names a task with another request
    ├── TaskQuotaExceeded     429   a tenant's stored tasks or bytes are at tasks.max_*_per_tenant
    ├── RateLimited           429   a tenant's requests are over its rate (tenants.*.rate)
    ├── Refused            4xx/5xx  status and reason named by a layer that knows no HTTP
    │   ├── Rejected                admission said no (scheduler.core.admission names the reason)
    │   └── NotAttributed           the request names no tenant it may use (scheduler.core.tenants)
    ├── BackendFailed         502   the backend went away before answering, retries exhausted
    ├── PartialFailure        502   a write fanned out to the backends got different answers
    ├── NoBackend             503   no backend can serve: all down or starting
    ├── Draining              503   shutting down: no new work
    ├── StoreUnavailable      503   the async task store cannot read or write
    └── DiskSpaceLow          503   the task store's disk is below tasks.min_free_bytes

``param`` names the request field an error is about (None: none), for the OpenAI API's error
shape, which scheduler.http.middleware renders on its routes instead of the body above.

Errors upstream itself would give (validation) are glmtts.errors.HTTPDetailError, answered with
upstream's exact bytes instead. scheduler.http.middleware renders both.
"""

from __future__ import annotations

import math
from typing import Any

from glmtts.errors import dump_json


class SidecarError(Exception):
    status = 500
    reason = "internal"
    # Close the connection after the answer: the rest of the client's body is not read.
    close = False
    param: str | None = None

    def __init__(self, detail: str, *, retry_after: float | None = None, close: bool | None = None,
                 param: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.extra = extra
        if close is not None:
            self.close = close
        if param is not None:
            self.param = param

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "reason": self.reason, **self.extra}

    def body_bytes(self) -> bytes:
        return dump_json(self.body())

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class BadRequest(SidecarError):
    status = 400
    reason = "bad_request"


class BadTimeout(BadRequest):
    reason = "bad_timeout"


class BadAuthorization(BadRequest):
    reason = "bad_authorization"


class BadIdempotencyKey(BadRequest):
    reason = "bad_idempotency_key"


class InvalidField(BadRequest):
    reason = "invalid_field"


class CallbackNotAllowed(BadRequest):
    reason = "callback_not_allowed"


class BadHeader(BadRequest):
    reason = "bad_header"


class NonAsciiHeader(BadRequest):
    reason = "non_ascii_header"


class InvalidConfig(BadRequest):
    reason = "invalid_config"


class Unauthorized(SidecarError):
    status = 401
    reason = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer", **super().headers()}


class PromptPathNotAllowed(SidecarError):
    status = 403
    reason = "prompt_path_not_allowed"


class UnknownBackend(SidecarError):
    status = 404
    reason = "unknown_backend"


class UnknownTask(SidecarError):
    status = 404
    reason = "unknown_task"


class UnknownVoice(SidecarError):
    status = 404
    reason = "unknown_voice"
    param = "voice"


class UnknownModel(SidecarError):
    status = 404
    reason = "unknown_model"
    param = "model"


class BodyTimeout(SidecarError):
    status = 408
    reason = "body_timeout"
    close = True


class DeadlineExpired(SidecarError):
    status = 408
    reason = "deadline"


class NoAudio(SidecarError):
    status = 409
    reason = "no_audio"


class PayloadTooLarge(SidecarError):
    status = 413
    reason = "too_large"


class IdempotencyKeyReused(SidecarError):
    status = 422
    reason = "idempotency_key_reused"


class TaskQuotaExceeded(SidecarError):
    status = 429
    reason = "task_quota"


class RateLimited(SidecarError):
    """Retry-After: the seconds until the tenant's bucket has a token (scheduler.runtime.ratelimit)."""

    status = 429
    reason = "rate_limited"


class Refused(SidecarError):
    """Turned away by a layer below HTTP (scheduler.core), which names the status and reason itself."""

    def __init__(self, status: int, reason: str, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.status = status
        self.reason = reason


class Rejected(Refused):
    """Turned away by admission (scheduler.core.admission)."""


class NotAttributed(Refused):
    """The request names no tenant or band it may use (scheduler.core.tenants.TenantError)."""


class BackendFailed(SidecarError):
    status = 502
    reason = "backend_failed"


class PartialFailure(SidecarError):
    status = 502
    reason = "partial_failure"


class NoBackend(SidecarError):
    status = 503
    reason = "no_backend"


class Draining(SidecarError):
    status = 503
    reason = "draining"


class StoreUnavailable(SidecarError):
    status = 503
    reason = "store_unavailable"


class DiskSpaceLow(SidecarError):
    status = 503
    reason = "disk_low"
