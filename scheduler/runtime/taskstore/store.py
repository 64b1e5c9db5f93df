"""The task store: SQLite rows in `<dir>/tasks.sqlite3`, request bodies and WAVs as files beside it.

Files are written atomically *before* the row that names them, so a crash leaves at worst an
orphan file, which `sweep` removes; a row never names a missing or half-written file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from scheduler.runtime.taskstore.files import (
    FILE_NAME,
    body_file,
    probe_writable,
    temporary_path,
    unlink_quietly,
    wav_file,
    write_atomically,
)
from scheduler.runtime.taskstore.model import (
    CALLBACK_STATES,
    FINISHED,
    UNFINISHED,
    DiskLow,
    Quota,
    QuotaExceeded,
    StoreError,
    Task,
    TaskState,
    request_digest,
)
from scheduler.runtime.taskstore.schema import COLUMNS, dump_result, guard, open_schema, task_from_row, transaction


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
                probe_writable(path)
        except OSError as exc:
            raise StoreError(f"task store directory {self.directory} is not writable: {exc}") from exc
        db_path = self.directory / "tasks.sqlite3"
        try:
            self._db = sqlite3.connect(db_path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open task database {db_path}: {exc}") from exc
        try:
            open_schema(self._db, db_path, requests=self._requests, results=self._results)
        except BaseException:
            self._db.close()
            raise

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
            with self._lock, guard("cannot read tasks"):
                self._check_quota(tenant, len(body), quota)
        task_id = uuid.uuid4().hex
        body_path = self._body_path(task_id)
        with self._lock:
            self._pending.add(task_id)
        try:
            try:
                write_atomically(body_path, body)
                with self._lock, transaction(self._db):
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
                    row = self._db.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
                    task = task_from_row(row)
            except BaseException as exc:  # whatever went wrong (or cancelled us): leave nothing
                unlink_quietly(body_path)
                unlink_quietly(temporary_path(body_path))
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
        return self._select("WHERE state IN (?, ?) ORDER BY created_at, seq", UNFINISHED)

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
        with self._lock, guard("cannot read tasks"):
            tasks, stored = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(body_bytes + audio_bytes), 0) FROM tasks WHERE tenant = ?", (tenant,)
            ).fetchone()
        return int(tasks), int(stored)

    def counts(self) -> dict[str, int]:
        """Tasks by state, every state present."""
        counts = {state.value: 0 for state in TaskState}
        with self._lock, guard("cannot count tasks"):
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"):
                counts[str(state)] = int(n)
        return counts

    def position(self, task_id: str) -> int | None:
        """1-based rank among QUEUED tasks by creation; None when not queued. Rough: the
        scheduler's queue, with its bands and fair shares, gives the real order."""
        with self._lock, guard(f"cannot rank task {task_id}"):
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
            write_atomically(path, wav)
        except OSError as exc:
            unlink_quietly(temporary_path(path))
            raise StoreError(f"cannot store the audio of task {task_id}: {exc}") from exc
        try:
            task = self._finish(
                task_id,
                "state = ?, finished_at = ?, updated_at = ?, result = ?, reason = NULL, audio_bytes = ?",
                (TaskState.SUCCEEDED.value, now, now, dump_result(result), len(wav)),
            )
        except BaseException:
            unlink_quietly(path)
            raise
        if task is None:  # cancelled (or expired) between the check and the update
            unlink_quietly(path)
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
            (state.value, now, now, reason, None if result is None else dump_result(result)),
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
        with self._lock, guard(f"cannot delete task {task_id}"):
            with transaction(self._db):
                gone = self._db.execute("DELETE FROM tasks WHERE id = ?", (task_id,)).rowcount
            unlink_quietly(self._body_path(task_id))
            unlink_quietly(self._wav_path(task_id))
        return bool(gone)

    def set_callback_state(self, task_id: str, state: str) -> None:
        if state not in CALLBACK_STATES:
            raise ValueError(f"callback state must be one of {sorted(CALLBACK_STATES)}, not {state!r}")
        with self._lock, guard(f"cannot update task {task_id}"), transaction(self._db):
            self._db.execute("UPDATE tasks SET callback_state = ? WHERE id = ?", (state, task_id))

    # -- housekeeping -------------------------------------------------------------------------

    def sweep(self, *, now: float, ttl_s: float) -> int:
        """Delete tasks finished more than `ttl_s` ago, with their files, and files no row names
        (a crash between writing a file and inserting its row). Returns how many tasks went."""
        finished = tuple(state.value for state in FINISHED)
        marks = ", ".join("?" for _ in finished)
        with self._lock, guard("cannot sweep tasks"):
            with transaction(self._db):
                ids = [
                    str(row[0])
                    for row in self._db.execute(
                        f"SELECT id FROM tasks WHERE state IN ({marks}) AND finished_at < ?", (*finished, now - ttl_s)
                    )
                ]
                self._db.executemany("DELETE FROM tasks WHERE id = ?", [(task_id,) for task_id in ids])
            # Rows first, files second: a crash in between leaves orphans, never a row without files.
            for task_id in ids:
                unlink_quietly(self._body_path(task_id))
                unlink_quietly(self._wav_path(task_id))
            # A body is kept only while its task may still run; a WAV while its row exists.
            rows = {str(task_id): str(state) for task_id, state in self._db.execute("SELECT id, state FROM tasks")}
            running = {task_id for task_id, state in rows.items() if state in UNFINISHED} | self._pending
            known = set(rows) | self._pending
            for folder, keep in ((self._requests, running), (self._results, known)):
                for entry in folder.iterdir():
                    match = FILE_NAME.match(entry.name)
                    if match is not None and match.group(1) not in keep:
                        unlink_quietly(entry)
        return len(ids)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- internals ----------------------------------------------------------------------------

    def _body_path(self, task_id: str) -> Path:
        return body_file(self._requests, task_id)

    def _wav_path(self, task_id: str) -> Path:
        return wav_file(self._results, task_id)

    def _get_any(self, task_id: str) -> Task | None:
        tasks = self._select("WHERE id = ?", (task_id,))
        return tasks[0] if tasks else None

    def _by_key_locked(self, tenant: str, key: str) -> Task | None:
        with guard("cannot read tasks"):
            row = self._db.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE tenant = ? AND idempotency_key = ?", (tenant, key)
            ).fetchone()
        return None if row is None else task_from_row(row)

    def _select(self, where: str, params: tuple[Any, ...]) -> list[Task]:
        with self._lock, guard("cannot read tasks"):
            rows = self._db.execute(f"SELECT {COLUMNS} FROM tasks {where}", params).fetchall()
        return [task_from_row(row) for row in rows]

    def _transition(
        self, task_id: str, assignments: str, params: tuple[Any, ...], *, from_states: tuple[str, ...]
    ) -> Task | None:
        marks = ", ".join("?" for _ in from_states)
        with self._lock, guard(f"cannot update task {task_id}"), transaction(self._db):
            changed = self._db.execute(
                f"UPDATE tasks SET {assignments} WHERE id = ? AND state IN ({marks})", (*params, task_id, *from_states)
            ).rowcount
        return self._get_any(task_id) if changed else None

    def _finish(self, task_id: str, assignments: str, params: tuple[Any, ...]) -> Task | None:
        """An unfinished task's move to a final state; its body is no longer needed and goes
        (row first: a crash in between leaves a body the sweep removes)."""
        task = self._transition(task_id, f"{assignments}, body_bytes = 0", params, from_states=UNFINISHED)
        if task is not None:
            unlink_quietly(self._body_path(task_id))
        return task
