"""The store's files: where a task's body and WAV live, and writing them so a crash never leaves
half a file under its final name (temporary name, fsync, rename, fsync of the directory)."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path

from scheduler.runtime.taskstore.model import StoreError

# <id>.body / <id>.wav, and their temporary names .<id>.body.tmp / .<id>.wav.tmp
FILE_NAME = re.compile(r"^\.?([0-9a-f]{32})\.(?:body|wav)(?:\.tmp)?$")


def body_file(requests: Path, task_id: str) -> Path:
    return requests / f"{checked_id(task_id)}.body"


def wav_file(results: Path, task_id: str) -> Path:
    return results / f"{checked_id(task_id)}.wav"


def checked_id(task_id: str) -> str:
    # Ids come from URLs: never let one name a path outside the store.
    if not re.fullmatch(r"[0-9a-f]{32}", task_id):
        raise StoreError(f"malformed task id {task_id!r}")
    return task_id


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_atomically(path: Path, data: bytes) -> None:
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_writable(directory: Path) -> None:
    probe = directory / f".probe-{uuid.uuid4().hex}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    probe.unlink()


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
