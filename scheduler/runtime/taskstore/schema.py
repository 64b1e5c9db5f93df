"""The SQLite side of the store: the `tasks` table, opening and upgrading it, rows to tasks.

Schema history (`user_version`): 1, the first; 2 adds the request's SHA-256 (Idempotency-Key reuse
with another request is told apart), the priority band by name (kept across a restart) and the
bytes each task keeps on disk (per-tenant quotas). An older database is upgraded in place when it
is opened, in one transaction; a newer one is refused.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scheduler.runtime.taskstore.files import body_file, wav_file
from scheduler.runtime.taskstore.model import UNFINISHED, StoreError, Task, TaskState, request_digest

SCHEMA_VERSION = 2

# Schema version 1, exactly as it was created; later versions are reached by upgrades.
_SCHEMA_V1 = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'expired', 'cancelled')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    deadline_at REAL NOT NULL,
    idempotency_key TEXT,
    callback_url TEXT,
    content_type TEXT NOT NULL,
    chars INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    result TEXT,
    callback_state TEXT
);
CREATE UNIQUE INDEX tasks_idempotency ON tasks (tenant, idempotency_key);
CREATE INDEX tasks_state ON tasks (state, created_at);
CREATE INDEX tasks_finished_at ON tasks (finished_at);
"""

_V2_COLUMNS = (
    "request_sha256 TEXT",
    "band TEXT",
    "body_bytes INTEGER NOT NULL DEFAULT 0",
    "audio_bytes INTEGER NOT NULL DEFAULT 0",
)

# What `task_from_row` reads, in its order.
COLUMNS = (
    "id, tenant, state, created_at, updated_at, started_at, finished_at, deadline_at, idempotency_key, "
    "callback_url, content_type, chars, attempts, reason, result, callback_state, request_sha256, band, "
    "body_bytes, audio_bytes"
)


def open_schema(db: sqlite3.Connection, db_path: Path, *, requests: Path, results: Path) -> None:
    """Set the connection up and bring the database to `SCHEMA_VERSION` (create, or upgrade in one
    transaction); StoreError for a newer one or any failure. ``requests``/``results``: the
    store's folders, which an upgrade reads."""
    with guard(f"cannot open task database {db_path}"):
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        with transaction(db):
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"task database {db_path} has schema version {version}, newer than this sidecar's "
                    f"{SCHEMA_VERSION}: upgrade the sidecar or point tasks.state_dir elsewhere"
                )
            if version == 0:
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        db.execute(statement)
                version = 1
            if version < SCHEMA_VERSION:
                _upgrade_to_v2(db, requests, results)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _upgrade_to_v2(db: sqlite3.Connection, requests: Path, results: Path) -> None:
    """Schema 1 → 2, inside the opening transaction: the new columns, filled in from the files
    on disk (a request's hash only where an Idempotency-Key needs it). Schema 1 kept the bodies
    of finished tasks too; they are no longer counted, and the next sweep removes them."""
    for column in _V2_COLUMNS:
        db.execute(f"ALTER TABLE tasks ADD COLUMN {column}")
    rows = db.execute("SELECT id, state, content_type, idempotency_key FROM tasks").fetchall()
    for task_id, state, content_type, key in rows:
        body, wav = body_file(requests, task_id), wav_file(results, task_id)
        body_bytes = body.stat().st_size if state in UNFINISHED and body.is_file() else 0
        audio_bytes = wav.stat().st_size if state == TaskState.SUCCEEDED.value and wav.is_file() else 0
        digest = None
        if key is not None and body.is_file():
            digest = request_digest(content_type, body.read_bytes())
        db.execute(
            "UPDATE tasks SET request_sha256 = ?, body_bytes = ?, audio_bytes = ? WHERE id = ?",
            (digest, body_bytes, audio_bytes, task_id),
        )


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextlib.contextmanager
def guard(what: str) -> Iterator[None]:
    """Any failure to read or write, as StoreError saying ``what`` could not be done."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{what}: {exc}") from exc


def task_from_row(row: tuple[Any, ...]) -> Task:
    """A row of `COLUMNS` as a Task; StoreError for one that is not ours or is damaged."""
    (task_id, tenant, state, created_at, updated_at, started_at, finished_at, deadline_at, key, callback_url,
     content_type, chars, attempts, reason, result, callback_state, request_sha256, band, body_bytes,
     audio_bytes) = row
    try:
        return Task(
            id=task_id,
            tenant=tenant,
            state=TaskState(state),
            created_at=created_at,
            updated_at=updated_at,
            started_at=started_at,
            finished_at=finished_at,
            deadline_at=deadline_at,
            idempotency_key=key,
            callback_url=callback_url,
            content_type=content_type,
            chars=chars,
            attempts=attempts,
            reason=reason,
            result=None if result is None else json.loads(result),
            callback_state=callback_state,
            request_sha256=request_sha256,
            band=band,
            body_bytes=body_bytes,
            audio_bytes=audio_bytes,
        )
    except ValueError as exc:  # an unknown state or broken JSON: the file is not ours or is damaged
        raise StoreError(f"corrupt task row {task_id!r}: {exc}") from exc


def dump_result(result: dict[str, Any]) -> str:
    # The audio lives in results/<id>.wav; never in the database.
    return json.dumps({k: v for k, v in result.items() if k != "audio_base64"}, separators=(",", ":"))
