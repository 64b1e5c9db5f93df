"""The sidecar's own error answers: each knows its status, reason and Retry-After.

    SidecarError                 {"detail": str, "reason": str, ...}
    ├── PayloadTooLarge   413    body or text over the configured limit
    ├── QueueFull         429    the queue is at its bound (Retry-After: predicted drain time)
    ├── NoBackend         503    no backend can serve: all down or starting
    ├── Draining          503    shutting down: no new work
    ├── Rejected          429/503  admission said no (scheduler.core.admission names the reason)
    ├── DeadlineExpired   408    upstream's wording
    ├── BackendFailed     502    the backend went away before answering, retries exhausted
    ├── Unauthorized      401    admin token missing or wrong
    ├── StoreUnavailable  503    the async task store cannot read or write
    ├── TaskQuotaExceeded 429    a tenant's stored tasks or bytes are at tasks.max_*_per_tenant
    ├── DiskSpaceLow      503    the task store's disk is below tasks.min_free_bytes
    └── IdempotencyKeyReused 422 an Idempotency-Key already names a task with another request

Errors upstream itself would give (validation) are glmtts.errors.HTTPDetailError, answered with
upstream's exact bytes instead.
"""

from __future__ import annotations

import math
from typing import Any

from glmtts.errors import dump_json


class SidecarError(Exception):
    status = 500
    reason = "internal"

    def __init__(self, detail: str, *, retry_after: float | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "reason": self.reason, **self.extra}

    def body_bytes(self) -> bytes:
        return dump_json(self.body())

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class PayloadTooLarge(SidecarError):
    status = 413
    reason = "too_large"


class QueueFull(SidecarError):
    status = 429
    reason = "queue_full"


class NoBackend(SidecarError):
    status = 503
    reason = "no_backend"


class Draining(SidecarError):
    status = 503
    reason = "draining"


class DeadlineExpired(SidecarError):
    status = 408
    reason = "deadline"


class BackendFailed(SidecarError):
    status = 502
    reason = "backend_failed"


class Rejected(SidecarError):
    """Turned away by admission; status and reason come from scheduler.core.admission."""

    def __init__(self, status: int, reason: str, detail: str, *, retry_after: float | None) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.status = status
        self.reason = reason


class Unauthorized(SidecarError):
    status = 401
    reason = "unauthorized"


class StoreUnavailable(SidecarError):
    status = 503
    reason = "store_unavailable"


class TaskQuotaExceeded(SidecarError):
    status = 429
    reason = "task_quota"


class DiskSpaceLow(SidecarError):
    status = 503
    reason = "disk_low"


class IdempotencyKeyReused(SidecarError):
    status = 422
    reason = "idempotency_key_reused"
