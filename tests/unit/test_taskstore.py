from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler import taskstore
from scheduler.taskstore import FINISHED, StoreError, Task, TaskState, TaskStore

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
    real_write = taskstore._write_atomically

    def write_then_cancel(path: Path, data: bytes) -> None:
        real_write(path, data)
        store.cancel(task.id, tenant="acme", now=T0 + 2)

    monkeypatch.setattr(taskstore, "_write_atomically", write_then_cancel)
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
    assert files(store) == {f"{recent.id}.body", f"{queued.id}.body"}
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
