from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.runtime import taskstore
from scheduler.runtime.taskstore import FINISHED, StoreError, Task, TaskState, TaskStore
from scheduler.runtime.taskstore import schema as taskstore_schema
from scheduler.runtime.taskstore import store as taskstore_store

T0 = 1_700_000_000.0
RESULT: dict[str, Any] = {
    "success": True,
    "message": "ok",
    "sample_rate": 24000,
    "generation_time": 1.5,
    "error": None,
    "audio_bytes": 12,
    "duration_s": 0.25,
}
WAV = b"RIFF....WAVEdata"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    s = TaskStore(tmp_path / "tasks")
    yield s
    s.close()


def new(store: TaskStore, *, tenant: str = "acme", now: float = T0, body: bytes = b"text=hi", **kw: Any) -> Task:
    task, created = store.create(
        tenant=tenant, body=body, content_type="application/x-www-form-urlencoded", chars=2,
        deadline_at=now + 60, now=now, **kw,
    )
    assert created
    return task


def files(store: TaskStore) -> set[str]:
    return {p.name for sub in ("requests", "results") for p in (store.directory / sub).iterdir()}


def test_lifecycle_create_run_succeed(store: TaskStore) -> None:
    task = new(store, body=b"text=hello", callback_url="http://cb.example/x")
    assert task.state is TaskState.QUEUED and task.attempts == 0 and task.result is None
    assert task.created_at == task.updated_at == T0 and task.deadline_at == T0 + 60
    assert len(task.id) == 32 and task.callback_url == "http://cb.example/x"
    assert store.body(task.id) == b"text=hello"
    assert store.position(task.id) == 1
    assert store.audio_path(task.id) is None

    running = store.mark_running(task.id, T0 + 1)
    assert running is not None and running.state is TaskState.RUNNING
    assert running.attempts == 1 and running.started_at == T0 + 1
    assert store.mark_running(task.id, T0 + 2) is None  # only from QUEUED
    assert store.position(task.id) is None

    done = store.succeed(task.id, wav=WAV, result={**RESULT, "audio_base64": "AAAA"}, now=T0 + 5)
    assert done is not None and done.state is TaskState.SUCCEEDED and done.state in FINISHED
    assert done.finished_at == T0 + 5 and done.result == RESULT  # no audio in the metadata
    path = store.audio_path(task.id)
    assert path is not None and path.read_bytes() == WAV
    assert store.get(task.id, tenant="acme") == done
    assert store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "expired": 0, "cancelled": 0}
    assert not [name for name in files(store) if name.endswith(".tmp")]


def test_idempotency_is_per_tenant(store: TaskStore) -> None:
    first = new(store, idempotency_key="k1")
    again, created = store.create(
        tenant="acme", body=b"other", content_type="x", chars=5, deadline_at=T0 + 9, now=T0 + 1, idempotency_key="k1"
    )
    assert not created and again == first
    other = new(store, tenant="globex", idempotency_key="k1")
    assert other.id != first.id
    assert new(store, idempotency_key="k2").id != first.id
    assert new(store).id != new(store).id  # no key: always new
    assert sum(store.counts().values()) == 5


def test_idempotency_key_reusable_after_sweep(store: TaskStore) -> None:
    first = new(store, idempotency_key="k")
    store.fail(first.id, state=TaskState.FAILED, reason="boom", result=None, now=T0)
    assert store.sweep(now=T0 + 100, ttl_s=10) == 1
    assert new(store, idempotency_key="k", now=T0 + 100).id != first.id


def test_tenant_isolation(store: TaskStore) -> None:
    task = new(store, tenant="acme")
    assert store.get(task.id, tenant="globex") is None
    assert store.cancel(task.id, tenant="globex", now=T0) is None
    assert store.get(task.id, tenant="acme") == task  # untouched
    assert store.get("0" * 32, tenant="acme") is None
    assert store.get("../../etc/passwd", tenant="acme") is None
    assert store.cancel("0" * 32, tenant="acme", now=T0) is None


def test_cancel_while_queued(store: TaskStore) -> None:
    task = new(store)
    cancelled = store.cancel(task.id, tenant="acme", now=T0 + 1)
    assert cancelled is not None and cancelled.state is TaskState.CANCELLED
    assert cancelled.reason == "cancelled by client" and cancelled.finished_at == T0 + 1
    assert store.mark_running(task.id, T0 + 2) is None
    assert store.unfinished() == []
    # Cancelling a finished task changes nothing.
    assert store.cancel(task.id, tenant="acme", now=T0 + 3) == cancelled


def test_cancel_while_running_discards_audio(store: TaskStore) -> None:
    task = new(store)
    store.mark_running(task.id, T0 + 1)
    cancelled = store.cancel(task.id, tenant="acme", now=T0 + 2)
    assert cancelled is not None and cancelled.state is TaskState.CANCELLED
    assert store.succeed(task.id, wav=WAV, result=RESULT, now=T0 + 3) is None
    after = store.get(task.id, tenant="acme")
    assert after is not None and after.state is TaskState.CANCELLED and after.result is None
    assert store.audio_path(task.id) is None
    assert not list((store.directory / "results").iterdir())


def test_cancel_between_check_and_update_discards_audio(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    task = new(store)
    store.mark_running(task.id, T0 + 1)
    real_write = taskstore_store.write_atomically

    def write_then_cancel(path: Path, data: bytes) -> None:
        real_write(path, data)
        store.cancel(task.id, tenant="acme", now=T0 + 2)

    monkeypatch.setattr(taskstore_store, "write_atomically", write_then_cancel)
    assert store.succeed(task.id, wav=WAV, result=RESULT, now=T0 + 3) is None
    assert not list((store.directory / "results").iterdir())


@pytest.mark.parametrize("state", [TaskState.FAILED, TaskState.EXPIRED])
def test_fail_and_expire(store: TaskStore, state: TaskState) -> None:
    task = new(store)
    store.mark_running(task.id, T0 + 1)
    err = {**RESULT, "success": False, "error": "oom"}
    failed = store.fail(task.id, state=state, reason="backend said no", result=err, now=T0 + 2)
    assert failed is not None and failed.state is state and failed.reason == "backend said no"
    assert failed.result == err and failed.finished_at == T0 + 2
    # No-op once finished: neither another failure nor a late success changes it.
    assert store.fail(task.id, state=TaskState.EXPIRED, reason="late", result=None, now=T0 + 3) is None
    assert store.succeed(task.id, wav=WAV, result=RESULT, now=T0 + 4) is None
    assert store.get(task.id, tenant="acme") == failed
    assert store.audio_path(task.id) is None


def test_fail_after_success_is_noop(store: TaskStore) -> None:
    task = new(store)
    store.mark_running(task.id, T0)
    done = store.succeed(task.id, wav=WAV, result=RESULT, now=T0 + 1)
    assert store.fail(task.id, state=TaskState.EXPIRED, reason="deadline", result=None, now=T0 + 2) is None
    assert store.get(task.id, tenant="acme") == done
    with pytest.raises(ValueError):
        store.fail(task.id, state=TaskState.CANCELLED, reason="x", result=None, now=T0)


def test_requeue(store: TaskStore) -> None:
    task = new(store)
    store.requeue(task.id, T0)  # not running: nothing to do
    assert store.get(task.id, tenant="acme") == task
    store.mark_running(task.id, T0 + 1)
    store.requeue(task.id, T0 + 2)
    back = store.get(task.id, tenant="acme")
    assert back is not None and back.state is TaskState.QUEUED and back.started_at is None
    assert back.attempts == 1 and back.updated_at == T0 + 2
    again = store.mark_running(task.id, T0 + 3)
    assert again is not None and again.attempts == 2


def test_unfinished_survive_a_crash(tmp_path: Path) -> None:
    store = TaskStore(tmp_path)
    queued = new(store, now=T0 + 2, body=b"queued")
    running = new(store, now=T0 + 1, body=b"running")
    store.mark_running(running.id, T0 + 3)
    done = new(store, now=T0)
    store.fail(done.id, state=TaskState.FAILED, reason="x", result=None, now=T0 + 4)
    store.close()  # the process dies; a new one opens the same directory

    reopened = TaskStore(tmp_path)
    try:
        left = reopened.unfinished()
        assert [t.id for t in left] == [running.id, queued.id]  # oldest first
        assert [t.state for t in left] == [TaskState.RUNNING, TaskState.QUEUED]
        assert reopened.body(running.id) == b"running" and reopened.body(queued.id) == b"queued"
        assert reopened.counts()["failed"] == 1
    finally:
        reopened.close()


def test_position_ranks_queued_by_creation(store: TaskStore) -> None:
    a, b, c = new(store, now=T0), new(store, now=T0), new(store, now=T0 + 1)
    assert [store.position(t.id) for t in (a, b, c)] == [1, 2, 3]
    store.mark_running(a.id, T0 + 2)
    assert [store.position(t.id) for t in (a, b, c)] == [None, 1, 2]


def test_sweep_by_ttl(store: TaskStore) -> None:
    old = new(store)
    store.mark_running(old.id, T0)
    store.succeed(old.id, wav=WAV, result=RESULT, now=T0 + 10)
    recent = new(store)
    store.fail(recent.id, state=TaskState.FAILED, reason="x", result=None, now=T0 + 90)
    queued = new(store)  # unfinished tasks are never swept, however old
    assert store.sweep(now=T0 + 100, ttl_s=50) == 1
    assert store.get(old.id, tenant="acme") is None
    assert files(store) == {f"{queued.id}.body"}  # a finished task's body went when it finished
    assert store.sweep(now=T0 + 100, ttl_s=50) == 0
    assert store.sweep(now=T0 + 1000, ttl_s=50) == 1
    assert files(store) == {f"{queued.id}.body"}
    assert [t.id for t in store.unfinished()] == [queued.id]


def test_sweep_removes_orphan_files(store: TaskStore) -> None:
    kept = new(store)
    orphans = [
        store.directory / "requests" / f"{'a' * 32}.body",  # crash after the body, before the row
        store.directory / "requests" / f".{'b' * 32}.body.tmp",  # crash while writing the body
        store.directory / "results" / f"{'c' * 32}.wav",
    ]
    for path in orphans:
        path.write_bytes(b"x")
    foreign = store.directory / "results" / "README"
    foreign.write_text("not ours")
    assert store.sweep(now=T0, ttl_s=10) == 0
    assert not any(p.exists() for p in orphans)
    assert foreign.exists()
    assert store.body(kept.id) == b"text=hi"


def test_directory_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tasks"
    path.write_text("")
    with pytest.raises(StoreError, match="not writable"):
        TaskStore(path)


def test_read_only_directory(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.mkdir(mode=0o500)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as a user chmod does not stop (root)")
        with pytest.raises(StoreError, match="not writable"):
            TaskStore(path)
    finally:
        path.chmod(0o700)


def test_requests_dir_replaced_by_a_file(store: TaskStore) -> None:
    requests = store.directory / "requests"
    requests.rmdir()
    requests.write_text("")
    with pytest.raises(StoreError):
        new(store)
    assert sum(store.counts().values()) == 0


def test_disk_full_on_rename_leaves_nothing(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(StoreError, match="No space"):
        new(store, idempotency_key="k")
    assert sum(store.counts().values()) == 0
    assert files(store) == set()
    monkeypatch.undo()
    assert new(store, idempotency_key="k").state is TaskState.QUEUED  # the key was not consumed


def test_database_error_removes_the_body(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**kw: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_insert_row", broken)
    with pytest.raises(StoreError, match="disk is full"):
        new(store)
    assert sum(store.counts().values()) == 0
    assert files(store) == set()


def test_wav_write_failure(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    task = new(store)
    store.mark_running(task.id, T0)

    def no_space(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(StoreError):
        store.succeed(task.id, wav=WAV, result=RESULT, now=T0 + 1)
    after = store.get(task.id, tenant="acme")
    assert after is not None and after.state is TaskState.RUNNING
    assert not list((store.directory / "results").iterdir())


def test_concurrent_creates_keep_every_task(store: TaskStore) -> None:
    ids: list[str] = []
    errors: list[BaseException] = []
    ids_lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(25):
                task = new(store, tenant=f"t{n % 3}", now=T0 + i, body=f"{n}-{i}".encode())
                if i % 2:
                    store.mark_running(task.id, T0 + i)
                with ids_lock:
                    ids.append(task.id)
            store.sweep(now=T0, ttl_s=1)  # orphan scan concurrent with creates must spare them
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 200
    assert sum(store.counts().values()) == 200
    assert {t.id for t in store.unfinished()} == set(ids)
    assert all(store.body(task_id) for task_id in ids)


def test_concurrent_same_idempotency_key_creates_one(store: TaskStore) -> None:
    results: list[tuple[Task, bool]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        r = store.create(tenant="acme", body=b"b", content_type="x", chars=1, deadline_at=T0, now=T0,
                         idempotency_key="same")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({task.id for task, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(files(store)) == 1


def test_callback_state(store: TaskStore) -> None:
    task = new(store, callback_url="http://cb")
    store.set_callback_state(task.id, "pending")
    got = store.get(task.id, tenant="acme")
    assert got is not None and got.callback_state == "pending"
    with pytest.raises(ValueError):
        store.set_callback_state(task.id, "lost")


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    TaskStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "tasks.sqlite3")
    db.execute(f"PRAGMA user_version = {taskstore.SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        TaskStore(tmp_path)


def test_corrupt_database(tmp_path: Path) -> None:
    (tmp_path / "tasks.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        TaskStore(tmp_path)


def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = TaskStore(tmp_path)
    store.close()
    with pytest.raises(StoreError):
        store.counts()


# --- finished tasks keep no body; quotas --------------------------------------------------------------


def _finish(store: TaskStore, task: Task, state: TaskState) -> Task | None:
    if state is TaskState.SUCCEEDED:
        return store.succeed(task.id, wav=WAV, result=RESULT, now=T0 + 1)
    if state is TaskState.CANCELLED:
        return store.cancel(task.id, tenant=task.tenant, now=T0 + 1)
    return store.fail(task.id, state=state, reason="x", result=None, now=T0 + 1)


@pytest.mark.parametrize("state", sorted(FINISHED, key=lambda s: s.value))
@pytest.mark.parametrize("running", [False, True])
def test_a_finished_task_keeps_no_body(store: TaskStore, state: TaskState, running: bool) -> None:
    task = new(store, body=b"text=" + b"x" * 1000)
    assert task.body_bytes == 1005 and store.usage("acme") == (1, 1005)
    if running:
        store.mark_running(task.id, T0)
    finished = _finish(store, task, state)
    assert finished is not None and finished.state is state and finished.body_bytes == 0
    audio = len(WAV) if state is TaskState.SUCCEEDED else 0
    assert finished.audio_bytes == audio and store.usage("acme") == (1, audio)
    assert files(store) == ({f"{task.id}.wav"} if audio else set())
    with pytest.raises(StoreError):
        store.body(task.id)


def test_the_sweep_removes_the_body_a_crash_left_beside_a_finished_task(store: TaskStore) -> None:
    task = new(store)
    kept = new(store)
    body = store.directory / "requests" / f"{task.id}.body"
    saved = body.read_bytes()
    store.fail(task.id, state=TaskState.FAILED, reason="x", result=None, now=T0)
    body.write_bytes(saved)  # as if the process died between the row's update and the unlink
    assert store.sweep(now=T0, ttl_s=100) == 0
    assert files(store) == {f"{kept.id}.body"}


def test_the_request_hash_and_band_are_stored(store: TaskStore) -> None:
    task = new(store, body=b"text=hello", band="batch", idempotency_key="k")
    assert task.request_sha256 == taskstore.request_digest("application/x-www-form-urlencoded", b"text=hello")
    assert task.request_sha256 != taskstore.request_digest("application/x-www-form-urlencoded; charset=utf-8",
                                                           b"text=hello")
    assert task.band == "batch"
    assert store.find("acme", "k") == task and store.find("globex", "k") is None


def small_quota() -> taskstore.Quota:
    return taskstore.Quota(max_tasks=3, max_bytes=100, min_free_bytes=0)


def test_the_quota_caps_tasks_per_tenant(store: TaskStore) -> None:
    quota = small_quota()
    first = new(store, quota=quota, idempotency_key="k")
    new(store, quota=quota)
    store.fail(first.id, state=TaskState.FAILED, reason="x", result=None, now=T0 + 5)
    new(store, quota=quota)
    with pytest.raises(taskstore.QuotaExceeded) as refused:
        new(store, quota=quota)
    assert refused.value.limit == "tasks" and refused.value.used == 3 and refused.value.allowed == 3
    assert refused.value.oldest_finished_at == T0 + 5
    # A retry with a known key is no new task: answered, whatever the quota.
    again, created = store.create(tenant="acme", body=b"text=hi", content_type="x", chars=2, deadline_at=T0,
                                  now=T0, idempotency_key="k", quota=quota)
    assert again.id == first.id and not created
    new(store, tenant="globex", quota=quota)  # another tenant has its own
    assert store.sweep(now=T0 + 100, ttl_s=10) == 1
    new(store, quota=quota)  # room again once the finished task was swept
    assert store.counts()["queued"] == 4 and len(files(store)) == 4


def test_the_quota_caps_bytes_per_tenant(store: TaskStore) -> None:
    quota = small_quota()
    task = new(store, body=b"x" * 60, quota=quota)
    with pytest.raises(taskstore.QuotaExceeded) as refused:
        new(store, body=b"y" * 41, quota=quota)
    assert refused.value.limit == "bytes" and refused.value.used == 60 and refused.value.adding == 41
    new(store, body=b"y" * 40, quota=quota)  # exactly up to the limit
    assert store.usage("acme") == (2, 100)
    store.mark_running(task.id, T0)
    store.succeed(task.id, wav=b"w" * 30, result=RESULT, now=T0 + 1)  # body (60) gone, audio (30) kept
    assert store.usage("acme") == (2, 70)
    new(store, body=b"z" * 30, quota=quota)
    assert len(files(store)) == 3  # nothing of the refused tasks was written


def test_low_disk_refuses_before_writing(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    quota = taskstore.Quota(max_tasks=10, max_bytes=1 << 20, min_free_bytes=1000)
    monkeypatch.setattr(store, "free_bytes", lambda: 1100)
    new(store, body=b"x" * 100, quota=quota)
    with pytest.raises(taskstore.DiskLow) as refused:
        new(store, body=b"x" * 101, quota=quota)
    assert refused.value.free == 1100 and refused.value.needed == 1101
    assert sum(store.counts().values()) == 1 and len(files(store)) == 1


def test_a_failure_of_any_kind_while_creating_leaves_nothing(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kw: Any) -> None:
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(store, "_insert_row", refuse)
    with pytest.raises(UnicodeEncodeError):
        new(store)
    assert sum(store.counts().values()) == 0 and files(store) == set()


def test_delete_removes_a_task_and_its_files(store: TaskStore) -> None:
    task = new(store, idempotency_key="k")
    done = new(store)
    store.mark_running(done.id, T0)
    store.succeed(done.id, wav=WAV, result=RESULT, now=T0)
    assert store.delete(task.id) and store.delete(done.id)
    assert not store.delete(task.id)
    assert sum(store.counts().values()) == 0 and files(store) == set()
    assert new(store, idempotency_key="k").id != task.id  # its key is free again


def test_callbacks_due_are_the_finished_ones_not_yet_announced(store: TaskStore) -> None:
    def task(url: str | None, finish: TaskState | None, callback: str | None) -> str:
        created = new(store, callback_url=url)
        if finish is not None:
            _finish(store, created, finish)
        if callback is not None:
            store.set_callback_state(created.id, callback)
        return created.id

    due = [task("http://cb/1", TaskState.SUCCEEDED, "pending"), task("http://cb/2", TaskState.CANCELLED, None)]
    task("http://cb/3", TaskState.FAILED, "delivered")
    task("http://cb/4", TaskState.EXPIRED, "failed")
    task("http://cb/5", None, None)  # not finished yet: announced when it finishes
    task(None, TaskState.SUCCEEDED, None)
    assert sorted(t.id for t in store.callbacks_due()) == sorted(due)


# --- schema version 1 → 2 ---------------------------------------------------------------------------

SCHEMA_V1 = """
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
FORM_TYPE = "application/x-www-form-urlencoded"
V1_IDS = {"queued": "a" * 32, "running": "b" * 32, "succeeded": "c" * 32, "failed": "d" * 32}


def write_v1_store(directory: Path) -> dict[str, bytes]:
    """A task directory exactly as schema version 1 left it: rows, bodies, a WAV. Returns the bodies."""
    for sub in ("requests", "results"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(directory / "tasks.sqlite3")
    db.executescript(SCHEMA_V1)
    bodies = {}
    for n, (state, task_id) in enumerate(V1_IDS.items()):
        bodies[task_id] = f"input_text=hello+{state}&index=exampleA".encode()
        (directory / "requests" / f"{task_id}.body").write_bytes(bodies[task_id])  # v1 kept every body
        finished = T0 + 10 if state in ("succeeded", "failed") else None
        db.execute(
            "INSERT INTO tasks (id, tenant, state, created_at, updated_at, started_at, finished_at, deadline_at, "
            "idempotency_key, callback_url, content_type, chars, attempts, reason, result, callback_state) "
            "VALUES (?, 'acme', ?, ?, ?, ?, ?, ?, ?, ?, ?, 11, ?, ?, ?, ?)",
            (task_id, state, T0 + n, T0 + n, T0 + 1 if state != "queued" else None, finished, 4e9,
             f"key-{state}", "http://cb/x" if state == "failed" else None, FORM_TYPE,
             0 if state == "queued" else 1, "oom" if state == "failed" else None,
             '{"success":true}' if state == "succeeded" else None, "pending" if state == "failed" else None),
        )
    (directory / "results" / f"{V1_IDS['succeeded']}.wav").write_bytes(WAV)
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    return bodies


def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    bodies = write_v1_store(tmp_path)
    store = TaskStore(tmp_path)
    try:
        db = sqlite3.connect(tmp_path / "tasks.sqlite3")
        assert db.execute("PRAGMA user_version").fetchone()[0] == taskstore.SCHEMA_VERSION == 2
        db.close()
        assert [t.id for t in store.unfinished()] == [V1_IDS["queued"], V1_IDS["running"]]
        for state, task_id in V1_IDS.items():
            task = store.get(task_id, tenant="acme")
            assert task is not None and task.state.value == state and task.band is None
            assert (tmp_path / "requests" / f"{task_id}.body").read_bytes() == bodies[task_id]  # files kept
            assert task.body_bytes == (len(bodies[task_id]) if not task.finished else 0)  # only needed ones count
            assert task.request_sha256 == taskstore.request_digest(FORM_TYPE, bodies[task_id])
            assert store.find("acme", f"key-{state}") == task
        assert store.get(V1_IDS["succeeded"], tenant="acme").audio_bytes == len(WAV)  # type: ignore[union-attr]
        assert store.body(V1_IDS["running"]) == bodies[V1_IDS["running"]]
        path = store.audio_path(V1_IDS["succeeded"])
        assert path is not None and path.read_bytes() == WAV
        assert [t.id for t in store.callbacks_due()] == [V1_IDS["failed"]]
        # The sweep drops the bodies v1 kept for finished tasks; unfinished ones keep theirs.
        assert store.sweep(now=T0 + 20, ttl_s=100) == 0
        assert files(store) == {f"{V1_IDS['queued']}.body", f"{V1_IDS['running']}.body", f"{V1_IDS['succeeded']}.wav"}
        assert store.usage("acme") == (4, len(bodies[V1_IDS["queued"]]) + len(bodies[V1_IDS["running"]]) + len(WAV))
        new(store, now=T0 + 30)  # and it takes new tasks
    finally:
        store.close()
    TaskStore(tmp_path).close()  # opened again: already version 2, nothing to do


def test_a_failed_migration_leaves_version_1_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_v1_store(tmp_path)

    def unreadable(content_type: str, body: bytes) -> str:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(taskstore_schema, "request_digest", unreadable)
    with pytest.raises(StoreError, match="Input/output"):
        TaskStore(tmp_path)
    db = sqlite3.connect(tmp_path / "tasks.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "band" not in {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 4
    db.close()
    monkeypatch.undo()
    store = TaskStore(tmp_path)
    try:
        assert len(store.unfinished()) == 2
    finally:
        store.close()
