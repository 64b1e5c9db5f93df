"""Persistence of async tasks (`POST /api/v1/tasks`): nothing accepted is lost across a crash.

Layout under one directory:

    tasks.sqlite3           one row per task (WAL, synchronous=NORMAL, user_version = schema)
    requests/<id>.body      the original request body, forwarded byte for byte when the task runs
    results/<id>.wav        the audio of a succeeded task

Files are written atomically (temporary name, fsync, rename, fsync of the directory) *before* the
row that names them, so a crash leaves at worst an orphan file, which `sweep` removes; a row never
names a missing or half-written file. A request body is deleted as soon as its task is finished
(succeeded, failed, expired or cancelled): only a task that may still run needs it.

`create` refuses a task that would take a tenant past its `Quota` (stored tasks, stored bytes:
bodies plus audio) or leave the filesystem with less free space than the quota keeps.

Modules: `model` (what is stored and the errors), `schema` (the SQLite table, its versions and
upgrades), `files` (paths and atomic writes), `store` (`TaskStore`, which uses them all).
"""

from __future__ import annotations

from scheduler.runtime.taskstore.model import (
    CALLBACK_STATES,
    FINISHED,
    DiskLow,
    Quota,
    QuotaExceeded,
    StoreError,
    Task,
    TaskState,
    request_digest,
)
from scheduler.runtime.taskstore.schema import SCHEMA_VERSION
from scheduler.runtime.taskstore.store import TaskStore

__all__ = [
    "CALLBACK_STATES",
    "FINISHED",
    "SCHEMA_VERSION",
    "DiskLow",
    "Quota",
    "QuotaExceeded",
    "StoreError",
    "Task",
    "TaskState",
    "TaskStore",
    "request_digest",
]
