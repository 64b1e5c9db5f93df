"""What the task store keeps and answers: a task's states and record, a tenant's quota, the errors."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

CALLBACK_STATES = frozenset({"pending", "delivered", "failed"})


class TaskState(enum.Enum):
    QUEUED = "queued"  # accepted and persisted, waiting for a backend
    RUNNING = "running"  # sent to a backend, no answer yet
    SUCCEEDED = "succeeded"  # the WAV is stored and can be fetched
    FAILED = "failed"  # the backend answered with an error, or retries ran out
    EXPIRED = "expired"  # the deadline passed before a result came back
    CANCELLED = "cancelled"  # the client cancelled it before it finished


FINISHED = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.EXPIRED, TaskState.CANCELLED})
UNFINISHED = (TaskState.QUEUED.value, TaskState.RUNNING.value)  # as stored in the `state` column


@dataclass(frozen=True, kw_only=True)
class Task:
    id: str
    tenant: str
    state: TaskState
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    deadline_at: float
    idempotency_key: str | None
    callback_url: str | None
    content_type: str
    chars: int
    attempts: int
    reason: str | None  # why it failed, expired or was cancelled
    # Upstream-shaped result metadata, never the audio: success, message, sample_rate,
    # generation_time, error, audio_bytes, duration_s.
    result: dict[str, Any] | None
    callback_state: str | None  # None, "pending", "delivered" or "failed"
    request_sha256: str | None = None  # request_digest of what was submitted; None: unknown (schema 1)
    band: str | None = None  # the priority band's name; None: unknown (schema 1)
    body_bytes: int = 0  # the stored request body (0 once the task is finished)
    audio_bytes: int = 0  # the stored WAV of a succeeded task

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclass(frozen=True, kw_only=True)
class Quota:
    """What one tenant may keep in the store, and the free space the filesystem must keep."""

    max_tasks: int  # stored tasks of any state, until swept
    max_bytes: int  # request bodies plus audio
    min_free_bytes: int  # free space left on the store's filesystem after the body is written


class StoreError(Exception):
    """The store cannot read or write (disk full, read-only, corrupt, newer schema): answer 503."""


class QuotaExceeded(Exception):
    """A new task would take its tenant past a `Quota` limit: ``limit`` is "tasks" or "bytes"."""

    def __init__(self, *, limit: str, used: int, allowed: int, adding: int, oldest_finished_at: float | None) -> None:
        super().__init__(f"{limit}: {used} stored, {adding} more, {allowed} allowed")
        self.limit = limit
        self.used = used
        self.allowed = allowed
        self.adding = adding
        self.oldest_finished_at = oldest_finished_at  # the tenant's first task the sweep will remove


class DiskLow(Exception):
    """Writing the body would leave less free space than `Quota.min_free_bytes`."""

    def __init__(self, *, free: int, needed: int) -> None:
        super().__init__(f"{free} bytes free, {needed} needed")
        self.free = free
        self.needed = needed


def request_digest(content_type: str, body: bytes) -> str:
    """SHA-256 of what a task was submitted with: an Idempotency-Key is bound to it."""
    digest = hashlib.sha256(content_type.encode("utf-8", "surrogateescape"))
    digest.update(b"\n")
    digest.update(body)
    return digest.hexdigest()
