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

Schema history (`user_version`): 1, the first; 2 adds the request's SHA-256 (Idempotency-Key reuse
with another request is told apart), the priority band by name (kept across a restart) and the
bytes each task keeps on disk (per-tenant quotas). An older database is upgraded in place when it
is opened, in one transaction; a newer one is refused.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

SCHEMA_VERSION = 2
CALLBACK_STATES = frozenset({"pending", "delivered", "failed"})


class TaskState(enum.Enum):
    QUEUED = "queued"  # accepted and persisted, waiting for a backend
    RUNNING = "running"  # sent to a backend, no answer yet
    SUCCEEDED = "succeeded"  # the WAV is stored and can be fetched
    FAILED = "failed"  # the backend answered with an error, or retries ran out
    EXPIRED = "expired"  # the deadline passed before a result came back
    CANCELLED = "cancelled"  # the client cancelled it before it finished


FINISHED = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.EXPIRED, TaskState.CANCELLED})
_UNFINISHED = (TaskState.QUEUED.value, TaskState.RUNNING.value)


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


# Schema version 1, exactly as it was created; later versions are reached by _UPGRADES.
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

_COLUMNS = (
    "id, tenant, state, created_at, updated_at, started_at, finished_at, deadline_at, idempotency_key, "
    "callback_url, content_type, chars, attempts, reason, result, callback_state, request_sha256, band, "
    "body_bytes, audio_bytes"
)
# <id>.body / <id>.wav, and their temporary names .<id>.body.tmp / .<id>.wav.tmp
_FILE_NAME = re.compile(r"^\.?([0-9a-f]{32})\.(?:body|wav)(?:\.tmp)?$")


class TaskStore:
    """SQLite in `<dir>/tasks.sqlite3`, request bodies and WAVs as files beside it.

    All methods block and are thread-safe (one connection behind a lock); the event loop calls them
    through `asyncio.to_thread`. Times come in as `now` (unix seconds). Every failure to read or
    write is raised as `StoreError`.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._requests = self.directory / "requests"
        self._results = self.directory / "results"
        self._lock = threading.Lock()
        # Ids whose files are being written but whose row may not exist yet: not orphans.
        self._pending: set[str] = set()
        try:
            for path in (self.directory, self._requests, self._results):
                path.mkdir(parents=True, exist_ok=True)
                _probe_writable(path)
        except OSError as exc:
            raise StoreError(f"task store directory {self.directory} is not writable: {exc}") from exc
        db_path = self.directory / "tasks.sqlite3"
        try:
            self._db = sqlite3.connect(db_path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open task database {db_path}: {exc}") from exc
        try:
            self._open_schema(db_path)
        except BaseException:
            self._db.close()
            raise

    def _open_schema(self, db_path: Path) -> None:
        with self._guard(f"cannot open task database {db_path}"):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self._transaction():
                version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"task database {db_path} has schema version {version}, newer than this sidecar's "
                        f"{SCHEMA_VERSION}: upgrade the sidecar or point tasks.state_dir elsewhere"
                    )
                if version == 0:
                    for statement in _SCHEMA_V1.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    version = 1
                if version < SCHEMA_VERSION:
                    self._upgrade_to_v2()
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _upgrade_to_v2(self) -> None:
        """Schema 1 → 2, inside the opening transaction: the new columns, filled in from the files
        on disk (a request's hash only where an Idempotency-Key needs it). Schema 1 kept the bodies
        of finished tasks too; they are no longer counted, and the next sweep removes them."""
        for column in _V2_COLUMNS:
            self._db.execute(f"ALTER TABLE tasks ADD COLUMN {column}")
        rows = self._db.execute("SELECT id, state, content_type, idempotency_key FROM tasks").fetchall()
        for task_id, state, content_type, key in rows:
            body_path, wav_path = self._body_path(task_id), self._wav_path(task_id)
            body_bytes = body_path.stat().st_size if state in _UNFINISHED and body_path.is_file() else 0
            audio_bytes = wav_path.stat().st_size if state == TaskState.SUCCEEDED.value and wav_path.is_file() else 0
            digest = None
            if key is not None and body_path.is_file():
                digest = request_digest(content_type, body_path.read_bytes())
            self._db.execute(
                "UPDATE tasks SET request_sha256 = ?, body_bytes = ?, audio_bytes = ? WHERE id = ?",
                (digest, body_bytes, audio_bytes, task_id),
            )

    # -- creation -----------------------------------------------------------------------------

    def create(
        self,
        *,
        tenant: str,
        body: bytes,
        content_type: str,
        chars: int,
        deadline_at: float,
        now: float,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        band: str | None = None,
        quota: Quota | None = None,
    ) -> tuple[Task, bool]:
        """Persist a new QUEUED task; returns (task, created).

        A key this tenant already used (on a task not yet swept) returns that task and False,
        whatever the body (the caller compares `request_sha256`) and whatever the quota. Else
        `quota` is checked: QuotaExceeded or DiskLow, nothing written. The body is durable before
        the row exists; on any failure nothing is left.
        """
        if idempotency_key is not None:
            existing = self.find(tenant, idempotency_key)
            if existing is not None:
                return existing, False
        if quota is not None:
            self._check_disk(len(body), quota)
            with self._lock, self._guard("cannot read tasks"):
                self._check_quota(tenant, len(body), quota)
        task_id = uuid.uuid4().hex
        body_path = self._body_path(task_id)
        with self._lock:
            self._pending.add(task_id)
        try:
            try:
                _write_atomically(body_path, body)
                with self._lock, self._transaction():
                    if idempotency_key is not None:
                        existing = self._by_key_locked(tenant, idempotency_key)
                        if existing is not None:  # a concurrent create with the same key won
                            body_path.unlink(missing_ok=True)
                            return existing, False
                    if quota is not None:  # again, atomically: concurrent creates of one tenant
                        self._check_quota(tenant, len(body), quota)
                    self._insert_row(
                        task_id=task_id,
                        tenant=tenant,
                        content_type=content_type,
                        chars=chars,
                        deadline_at=deadline_at,
                        now=now,
                        idempotency_key=idempotency_key,
                        callback_url=callback_url,
                        request_sha256=request_digest(content_type, body),
                        band=band,
                        body_bytes=len(body),
                    )
                    # Read back inside the transaction: once it commits, nothing can fail any more.
                    task = _task(self._db.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone())
            except BaseException as exc:  # whatever went wrong (or cancelled us): leave nothing
                _unlink_quietly(body_path)
                _unlink_quietly(_tmp_path(body_path))
                if isinstance(exc, (OSError, sqlite3.Error)):
                    raise StoreError(f"cannot persist task: {exc}") from exc
                raise
        finally:
            with self._lock:
                self._pending.discard(task_id)
        return task, True

    def _insert_row(
        self,
        *,
        task_id: str,
        tenant: str,
        content_type: str,
        chars: int,
        deadline_at: float,
        now: float,
        idempotency_key: str | None,
        callback_url: str | None,
        request_sha256: str,
        band: str | None,
        body_bytes: int,
    ) -> None:
        self._db.execute(
            "INSERT INTO tasks (id, tenant, state, created_at, updated_at, deadline_at, idempotency_key, "
            "callback_url, content_type, chars, request_sha256, band, body_bytes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (task_id, tenant, TaskState.QUEUED.value, now, now, deadline_at, idempotency_key, callback_url,
             content_type, chars, request_sha256, band, body_bytes),
        )

    def _check_disk(self, adding: int, quota: Quota) -> None:
        try:
            free = self.free_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read the free space of {self.directory}: {exc}") from exc
        if free - adding < quota.min_free_bytes:
            raise DiskLow(free=free, needed=adding + quota.min_free_bytes)

    def _check_quota(self, tenant: str, adding: int, quota: Quota) -> None:
        """Under the lock: QuotaExceeded when one more task of ``adding`` bytes does not fit."""
        tasks, stored, oldest = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(body_bytes + audio_bytes), 0), MIN(finished_at) FROM tasks WHERE tenant = ?",
            (tenant,),
        ).fetchone()
        if tasks + 1 > quota.max_tasks:
            raise QuotaExceeded(limit="tasks", used=tasks, allowed=quota.max_tasks, adding=1, oldest_finished_at=oldest)
        if stored + adding > quota.max_bytes:
            raise QuotaExceeded(limit="bytes", used=stored, allowed=quota.max_bytes, adding=adding,
                                oldest_finished_at=oldest)

    def free_bytes(self) -> int:
        """Free space on the store's filesystem, for an unprivileged writer."""
        stats = os.statvfs(self.directory)
        return stats.f_bavail * stats.f_frsize

    # -- reading ------------------------------------------------------------------------------

    def get(self, task_id: str, *, tenant: str) -> Task | None:
        """The task, or None when it is unknown or another tenant owns it."""
        task = self._get_any(task_id)
        return task if task is not None and task.tenant == tenant else None

    def body(self, task_id: str) -> bytes:
        """The original request body of a task not yet swept."""
        try:
            return self._body_path(task_id).read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read the body of task {task_id}: {exc}") from exc

    def audio_path(self, task_id: str) -> Path | None:
        """The WAV of a SUCCEEDED task; None for any other task."""
        task = self._get_any(task_id)
        if task is None or task.state is not TaskState.SUCCEEDED:
            return None
        path = self._wav_path(task_id)
        return path if path.is_file() else None

    def find(self, tenant: str, idempotency_key: str) -> Task | None:
        """The tenant's task created with this Idempotency-Key, if not yet swept."""
        with self._lock:
            return self._by_key_locked(tenant, idempotency_key)

    def unfinished(self) -> list[Task]:
        """QUEUED and RUNNING tasks, oldest first: what a restarted sidecar re-queues."""
        return self._select("WHERE state IN (?, ?) ORDER BY created_at, seq", _UNFINISHED)

    def callbacks_due(self) -> list[Task]:
        """Finished tasks with a callback URL whose announcement never ended (pending, or not
        begun): what a restarted sidecar announces again."""
        finished = tuple(state.value for state in FINISHED)
        marks = ", ".join("?" for _ in finished)
        return self._select(
            f"WHERE state IN ({marks}) AND callback_url IS NOT NULL AND "
            "(callback_state IS NULL OR callback_state = 'pending') ORDER BY finished_at, seq",
            finished,
        )

    def usage(self, tenant: str) -> tuple[int, int]:
        """(stored tasks, stored bytes: bodies plus audio) of a tenant: what its Quota counts."""
        with self._lock, self._guard("cannot read tasks"):
            tasks, stored = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(body_bytes + audio_bytes), 0) FROM tasks WHERE tenant = ?", (tenant,)
            ).fetchone()
        return int(tasks), int(stored)

    def counts(self) -> dict[str, int]:
        """Tasks by state, every state present."""
        counts = {state.value: 0 for state in TaskState}
        with self._lock, self._guard("cannot count tasks"):
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"):
                counts[str(state)] = int(n)
        return counts

    def position(self, task_id: str) -> int | None:
        """1-based rank among QUEUED tasks by creation; None when not queued. Rough: the
        scheduler's queue, with its bands and fair shares, gives the real order."""
        with self._lock, self._guard(f"cannot rank task {task_id}"):
            row = self._db.execute(
                "SELECT created_at, seq FROM tasks WHERE id = ? AND state = ?", (task_id, TaskState.QUEUED.value)
            ).fetchone()
            if row is None:
                return None
            ahead = self._db.execute(
                "SELECT COUNT(*) FROM tasks WHERE state = ? AND (created_at < ? OR (created_at = ? AND seq < ?))",
                (TaskState.QUEUED.value, row[0], row[0], row[1]),
            ).fetchone()[0]
        return int(ahead) + 1

    # -- transitions --------------------------------------------------------------------------

    def mark_running(self, task_id: str, now: float) -> Task | None:
        """QUEUED → RUNNING, one more attempt; None (and no change) from any other state."""
        return self._transition(
            task_id,
            "state = ?, started_at = ?, updated_at = ?, attempts = attempts + 1",
            (TaskState.RUNNING.value, now, now),
            from_states=(TaskState.QUEUED.value,),
        )

    def requeue(self, task_id: str, now: float) -> None:
        """RUNNING → QUEUED: the backend went away before answering."""
        self._transition(
            task_id,
            "state = ?, started_at = NULL, updated_at = ?",
            (TaskState.QUEUED.value, now),
            from_states=(TaskState.RUNNING.value,),
        )

    def succeed(self, task_id: str, *, wav: bytes, result: dict[str, Any], now: float) -> Task | None:
        """Store the WAV, then mark SUCCEEDED (the body goes). None, with the audio discarded, when
        the task finished meanwhile (cancelled, expired) or is unknown."""
        current = self._get_any(task_id)
        if current is None or current.finished:
            return None
        path = self._wav_path(task_id)
        try:
            _write_atomically(path, wav)
        except OSError as exc:
            _unlink_quietly(_tmp_path(path))
            raise StoreError(f"cannot store the audio of task {task_id}: {exc}") from exc
        try:
            task = self._finish(
                task_id,
                "state = ?, finished_at = ?, updated_at = ?, result = ?, reason = NULL, audio_bytes = ?",
                (TaskState.SUCCEEDED.value, now, now, _dump_result(result), len(wav)),
            )
        except BaseException:
            _unlink_quietly(path)
            raise
        if task is None:  # cancelled (or expired) between the check and the update
            _unlink_quietly(path)
        return task

    def fail(
        self, task_id: str, *, state: TaskState, reason: str, result: dict[str, Any] | None, now: float
    ) -> Task | None:
        """Mark FAILED or EXPIRED; None (no change) when unknown or already finished."""
        if state not in (TaskState.FAILED, TaskState.EXPIRED):
            raise ValueError(f"fail() takes FAILED or EXPIRED, not {state}")
        return self._finish(
            task_id,
            "state = ?, finished_at = ?, updated_at = ?, reason = ?, result = ?",
            (state.value, now, now, reason, None if result is None else _dump_result(result)),
        )

    def cancel(self, task_id: str, *, tenant: str, now: float) -> Task | None:
        """QUEUED/RUNNING → CANCELLED. A finished task is returned unchanged; None when unknown or
        another tenant's."""
        if self.get(task_id, tenant=tenant) is None:
            return None
        self._finish(
            task_id,
            "state = ?, finished_at = ?, updated_at = ?, reason = ?",
            (TaskState.CANCELLED.value, now, now, "cancelled by client"),
        )
        return self.get(task_id, tenant=tenant)

    def delete(self, task_id: str) -> bool:
        """Remove a task and its files, whatever its state (a task that was never announced to
        its client: admission refused it, or the client left while it was stored)."""
        with self._lock, self._guard(f"cannot delete task {task_id}"):
            with self._transaction():
                gone = self._db.execute("DELETE FROM tasks WHERE id = ?", (task_id,)).rowcount
            _unlink_quietly(self._body_path(task_id))
            _unlink_quietly(self._wav_path(task_id))
        return bool(gone)

    def set_callback_state(self, task_id: str, state: str) -> None:
        if state not in CALLBACK_STATES:
            raise ValueError(f"callback state must be one of {sorted(CALLBACK_STATES)}, not {state!r}")
        with self._lock, self._guard(f"cannot update task {task_id}"), self._transaction():
            self._db.execute("UPDATE tasks SET callback_state = ? WHERE id = ?", (state, task_id))

    # -- housekeeping -------------------------------------------------------------------------

    def sweep(self, *, now: float, ttl_s: float) -> int:
        """Delete tasks finished more than `ttl_s` ago, with their files, and files no row names
        (a crash between writing a file and inserting its row). Returns how many tasks went."""
        finished = tuple(state.value for state in FINISHED)
        marks = ", ".join("?" for _ in finished)
        with self._lock, self._guard("cannot sweep tasks"):
            with self._transaction():
                ids = [
                    str(row[0])
                    for row in self._db.execute(
                        f"SELECT id FROM tasks WHERE state IN ({marks}) AND finished_at < ?", (*finished, now - ttl_s)
                    )
                ]
                self._db.executemany("DELETE FROM tasks WHERE id = ?", [(task_id,) for task_id in ids])
            # Rows first, files second: a crash in between leaves orphans, never a row without files.
            for task_id in ids:
                _unlink_quietly(self._body_path(task_id))
                _unlink_quietly(self._wav_path(task_id))
            # A body is kept only while its task may still run; a WAV while its row exists.
            rows = {str(task_id): str(state) for task_id, state in self._db.execute("SELECT id, state FROM tasks")}
            running = {task_id for task_id, state in rows.items() if state in _UNFINISHED} | self._pending
            known = set(rows) | self._pending
            for folder, keep in ((self._requests, running), (self._results, known)):
                for entry in folder.iterdir():
                    match = _FILE_NAME.match(entry.name)
                    if match is not None and match.group(1) not in keep:
                        _unlink_quietly(entry)
        return len(ids)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- internals ----------------------------------------------------------------------------

    def _body_path(self, task_id: str) -> Path:
        return self._requests / f"{_checked_id(task_id)}.body"

    def _wav_path(self, task_id: str) -> Path:
        return self._results / f"{_checked_id(task_id)}.wav"

    def _get_any(self, task_id: str) -> Task | None:
        tasks = self._select("WHERE id = ?", (task_id,))
        return tasks[0] if tasks else None

    def _by_key_locked(self, tenant: str, key: str) -> Task | None:
        with self._guard("cannot read tasks"):
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE tenant = ? AND idempotency_key = ?", (tenant, key)
            ).fetchone()
        return None if row is None else _task(row)

    def _select(self, where: str, params: tuple[Any, ...]) -> list[Task]:
        with self._lock, self._guard("cannot read tasks"):
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM tasks {where}", params).fetchall()
        return [_task(row) for row in rows]

    def _transition(
        self, task_id: str, assignments: str, params: tuple[Any, ...], *, from_states: tuple[str, ...]
    ) -> Task | None:
        marks = ", ".join("?" for _ in from_states)
        with self._lock, self._guard(f"cannot update task {task_id}"), self._transaction():
            changed = self._db.execute(
                f"UPDATE tasks SET {assignments} WHERE id = ? AND state IN ({marks})", (*params, task_id, *from_states)
            ).rowcount
        return self._get_any(task_id) if changed else None

    def _finish(self, task_id: str, assignments: str, params: tuple[Any, ...]) -> Task | None:
        """An unfinished task's move to a final state; its body is no longer needed and goes
        (row first: a crash in between leaves a body the sweep removes)."""
        task = self._transition(task_id, f"{assignments}, body_bytes = 0", params, from_states=_UNFINISHED)
        if task is not None:
            _unlink_quietly(self._body_path(task_id))
        return task

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{what}: {exc}") from exc


def _task(row: tuple[Any, ...]) -> Task:
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


def _dump_result(result: dict[str, Any]) -> str:
    # The audio lives in results/<id>.wav; never in the database.
    return json.dumps({k: v for k, v in result.items() if k != "audio_base64"}, separators=(",", ":"))


def _checked_id(task_id: str) -> str:
    # Ids come from URLs: never let one name a path outside the store.
    if not re.fullmatch(r"[0-9a-f]{32}", task_id):
        raise StoreError(f"malformed task id {task_id!r}")
    return task_id


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = _tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _probe_writable(directory: Path) -> None:
    probe = directory / f".probe-{uuid.uuid4().hex}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    probe.unlink()


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
