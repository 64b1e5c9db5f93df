"""The result cache's copy on disk (``cache.disk``): entries that survive a restart.

Every entry the cache stores is also written to ``<dir>/<key>.entry`` (a temporary name, fsync,
rename: a crash never leaves half a file under its final name): one JSON header line -- format
version, status, content type, created-at wall time, key, prompt index, generation -- then the
answer's bytes. Entries leaving the cache (eviction, expiry, invalidation, clear) delete their
files, so the directory holds what the cache holds. At start ``load`` reads it back, newest first,
within ``max_bytes`` and ``ttl_s`` by wall time; a file that is unreadable, of another format,
expired, or made under a non-zero generation is removed, never served.

Why the generation: the counts that prompt writes bump start at zero again after a restart. A key
made under a later generation would become reachable again after as many writes -- with the old
prompt's audio. Such entries are dropped at load; the others carry their index, and a prompt write
to it (or clear_cache) deletes them as it deletes any entry of that index.

All file I/O runs on one worker thread, in the order asked, off the event loop; ``flush`` waits
for what was asked so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.runtime.cache import CachedAnswer
from scheduler.runtime.taskstore.files import unlink_quietly, write_atomically

__all__ = ["FORMAT_VERSION", "DiskCopy", "StoredEntry"]

log = logging.getLogger("glmtts_sidecar.cache")

FORMAT_VERSION = 1
SUFFIX = ".entry"
KEY = re.compile(r"[0-9a-f]{64}")
MAX_HEADER_BYTES = 16 * 1024  # a header line longer than this is no header of ours


@dataclass(frozen=True, kw_only=True)
class StoredEntry:
    """One entry read back: its answer, what it was made with, and its age in seconds."""

    key: str
    answer: CachedAnswer
    index: str | None
    age_s: float


@dataclass(frozen=True, kw_only=True)
class _Header:
    key: str
    status: int
    content_type: str
    created_at: float
    index: str | None
    generation: tuple[int, int]
    size: int


class DiskCopy:
    """The files under ``directory`` (created on ``load``); ``wall``: the wall clock (injectable)."""

    def __init__(self, directory: Path, *, wall: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._wall = wall
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-disk")

    # --- asked from the event loop (queued, in order, on the worker) ----------------------------

    def save(self, key: str, answer: CachedAnswer, *, index: str | None, generation: tuple[int, int]) -> None:
        header = {"v": FORMAT_VERSION, "key": key, "status": answer.status, "content_type": answer.content_type,
                  "created_at": self._wall(), "index": index, "generation": list(generation),
                  "size": answer.size}
        line = json.dumps(header, ensure_ascii=True).encode() + b"\n"
        self._queue(_write, self._path(key), line, answer.body)  # joined on the worker: no copy on the loop

    def delete(self, key: str) -> None:
        self._queue(unlink_quietly, self._path(key))

    def delete_all(self) -> None:
        self._queue(self._delete_all)

    async def flush(self) -> None:
        """Wait until everything asked so far is done."""
        await asyncio.wrap_future(self._worker.submit(lambda: None))

    async def load(self, *, max_bytes: int, ttl_s: float) -> list[StoredEntry]:
        """What the directory holds that may still be served, newest first, within ``max_bytes``
        (answer bytes) and ``ttl_s``; everything else there is removed."""
        return await asyncio.wrap_future(self._worker.submit(self._load, max_bytes, ttl_s))

    async def close(self) -> None:
        """Finish what was asked, then stop the worker."""
        await self.flush()
        self._worker.shutdown(wait=False)

    def _queue(self, work: Callable[..., object], *args: Any) -> None:
        def logged(done: Future[object]) -> None:
            if not done.cancelled() and (error := done.exception()) is not None:
                log.warning("cache disk copy: %s", error)

        self._worker.submit(work, *args).add_done_callback(logged)

    def _path(self, key: str) -> Path:
        if not KEY.fullmatch(key):  # keys are our digests; never let one name another path
            raise ValueError(f"malformed cache key {key!r}")
        return self.directory / f"{key}{SUFFIX}"

    # --- on the worker ---------------------------------------------------------------------------

    def _delete_all(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for path in self.directory.iterdir():
                if path.name.endswith(SUFFIX) or path.name.endswith(".tmp"):
                    unlink_quietly(path)

    def _load(self, max_bytes: int, ttl_s: float) -> list[StoredEntry]:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = self._wall()
        found: list[tuple[_Header, Path]] = []
        for path in self.directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                unlink_quietly(path)  # a write a crash interrupted
                continue
            if not path.name.endswith(SUFFIX):
                continue
            header = _read_header(path)
            if header is None or now - header.created_at >= ttl_s or header.generation != (0, 0):
                unlink_quietly(path)
                continue
            found.append((header, path))
        found.sort(key=lambda item: item[0].created_at, reverse=True)
        loaded: list[StoredEntry] = []
        total = 0
        for header, path in found:
            answer = None if total + header.size > max_bytes else _read_answer(path, header)
            if answer is None:
                unlink_quietly(path)
                continue
            total += header.size
            loaded.append(StoredEntry(key=header.key, answer=answer, index=header.index,
                                      age_s=max(0.0, now - header.created_at)))
        if found:
            log.info("cache disk copy: %d of %d entries loaded (%d bytes)", len(loaded), len(found), total)
        return loaded


def _write(path: Path, header: bytes, body: bytes) -> None:
    write_atomically(path, header + body)


def _read_header(path: Path) -> _Header | None:
    """The file's header when it is one of ours, of this format, naming this file; else None."""
    try:
        with path.open("rb") as file:
            line = file.readline(MAX_HEADER_BYTES + 1)
        fields = json.loads(line) if line.endswith(b"\n") else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(fields, dict) or fields.get("v") != FORMAT_VERSION:
        return None
    key, status, content_type = fields.get("key"), fields.get("status"), fields.get("content_type")
    created_at, index, generation, size = (fields.get("created_at"), fields.get("index"),
                                           fields.get("generation"), fields.get("size"))
    if not (isinstance(key, str) and KEY.fullmatch(key) and path.name == f"{key}{SUFFIX}"):
        return None
    if not (isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599):
        return None
    if not (isinstance(created_at, (int, float)) and not isinstance(created_at, bool) and math.isfinite(created_at)):
        return None
    if not (isinstance(generation, list) and len(generation) == 2 and all(type(g) is int for g in generation)):
        return None
    if not (isinstance(content_type, str) and (index is None or isinstance(index, str))
            and type(size) is int and size >= 0):
        return None
    return _Header(key=key, status=status, content_type=content_type, created_at=float(created_at), index=index,
                   generation=(generation[0], generation[1]), size=size)


def _read_answer(path: Path, header: _Header) -> CachedAnswer | None:
    """The answer's bytes, when the file holds exactly as many as its header says (checked before
    reading: a file far larger than its header claims is not read into memory)."""
    try:
        with path.open("rb") as file:
            line = file.readline(MAX_HEADER_BYTES + 1)
            if os.fstat(file.fileno()).st_size != len(line) + header.size:
                return None
            body = file.read()
    except OSError:
        return None
    if len(body) != header.size:
        return None
    return CachedAnswer(status=header.status, content_type=header.content_type, body=body)
