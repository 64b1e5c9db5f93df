"""The result cache: backends' successful TTS answers, and the single flight of identical requests.

A cached answer is the backend's whole JSON body (the OpenAI route encodes its format after the
cache), keyed by a digest of every input that changes the audio (``request_key``): the text, the
prompt index with its generation (bumped by every prompt write through the sidecar; a global one
by clear_cache) or an uploaded prompt's bytes, and every synthesis field. Entries are per tenant
unless the cache is shared.

``ResultCache`` is bookkeeping only -- LRU by bytes, TTL against an injected clock, generations --
and testable without sockets or sleeps. ``ResultCache.flight`` is the single flight: the first of
identical requests runs the synthesis in a task of its own (the backend cannot cancel, so the task
outlives its client leaving); the others await the same task, each at most until its own
deadline. Its success is stored, its failure reaches every waiter and is not stored; the in-flight
map forgets it when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from glmtts.contract import TTSRequest
from glmtts.loop import wait_for
from scheduler.config import CacheConfig

__all__ = ["CachedAnswer", "Copy", "Flight", "ResultCache", "StoppedWaiting", "request_key"]

log = logging.getLogger("glmtts_sidecar.cache")

T = TypeVar("T")
KEY_VERSION = 1  # bumped when what a key covers changes
# Indexes whose generation is tracked at most: writes naming ever new indexes cannot grow memory
# without bound; past it, a global bump (every older key unreachable) lets the counts start over.
MAX_TRACKED_INDEXES = 10_000


@dataclass(frozen=True, kw_only=True)
class CachedAnswer:
    """A backend's successful answer, as a client receives it again."""

    status: int
    content_type: str
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)


class Copy(Protocol):
    """Where stored entries are also kept (scheduler.runtime.cache_disk.DiskCopy): told of every
    entry stored and every one dropped, without waiting."""

    def save(self, key: str, answer: CachedAnswer, *, index: str | None, generation: tuple[int, int]) -> None: ...

    def delete(self, key: str) -> None: ...

    def delete_all(self) -> None: ...


@dataclass(frozen=True)
class _Entry:
    answer: CachedAnswer
    stored_at: float
    index: str | None  # the prompt index it was made with (None: an uploaded prompt)


def request_key(tts: TTSRequest, *, tenant: str | None, generation: tuple[int, int],
                prompt_config: object = None, fan_out: object = None) -> str:
    """The digest of every input that changes a synthesis. ``tenant``: None in a shared cache.
    ``generation``: (the global generation, the index's), from ``ResultCache.generation``.
    ``prompt_config``: the prompt's configuration as the backends report it, where known.
    ``fan_out``: None for a request always synthesized whole, else how a split one's pieces are
    joined (scheduler.runtime.fanout): its answer may be joined pieces.
    CPU-bound only for a large uploaded prompt (hashed here)."""
    upload = tts.prompt_audio
    fields = {
        "v": KEY_VERSION, "tenant": tenant, "text": tts.input_text, "index": tts.index or None,
        "generation": list(generation), "prompt_config": prompt_config, "prompt_text": tts.prompt_text,
        "upload": None if upload is None else {"name": upload.filename,
                                               "sha256": hashlib.sha256(upload.data).hexdigest()},
        "seed": tts.seed, "sample_rate": tts.sample_rate, "use_cache": tts.use_cache,
        "use_phoneme": tts.use_phoneme, "sampling": tts.sampling, "beam_size": tts.beam_size,
        "sample_method": tts.sample_method, "fan_out": fan_out,
    }
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResultCache:
    """Bounded by ``max_bytes`` (answer bodies, least recently used evicted first) and ``ttl_s``."""

    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._global_generation = 0
        self._generations: dict[str, int] = {}
        self._flights: dict[str, Flight[object]] = {}
        self._copy: Copy | None = None

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def configure(self, config: CacheConfig) -> None:
        """A reload: new bounds from now on; what no longer fits goes (all of it when disabled)."""
        self.config = config
        if not config.enabled:
            self.clear()
        self._evict(0)

    def keep_copy(self, copy: Copy | None, loaded: Iterable[tuple[str, CachedAnswer, str | None, float]] = ()) -> None:
        """From now on, every entry stored or dropped is also saved to or deleted from ``copy``
        (None: no longer). ``loaded``: (key, answer, index, age in seconds) of entries read back
        from it, newest first; stored as made under generation (0, 0), within the bounds."""
        self._copy = copy
        if not self.config.enabled:
            if copy is not None:
                copy.delete_all()
            return
        now, room = self._clock(), self.config.max_bytes - self._bytes
        chosen: list[tuple[str, _Entry]] = []
        for key, answer, index, age_s in loaded:  # newest first: they are the ones kept within the bound
            if (key in self._entries or age_s >= self.config.ttl_s or self.generation(index) != (0, 0)
                    or answer.size > room):
                if copy is not None and key not in self._entries:
                    copy.delete(key)
                continue
            room -= answer.size
            chosen.append((key, _Entry(answer, now - age_s, index)))
        for key, entry in reversed(chosen):  # the newest ends most recently used
            self._entries[key] = entry
            self._bytes += entry.answer.size

    # --- generations ---------------------------------------------------------------------------

    def generation(self, index: str | None) -> tuple[int, int]:
        """(global generation, ``index``'s): part of every key, so a bump makes older keys unreachable."""
        return self._global_generation, self._generations.get(index, 0) if index else 0

    def bump(self, index: str) -> None:
        """A prompt write to ``index``: its entries are dropped and can never be made again."""
        if index not in self._generations and len(self._generations) >= MAX_TRACKED_INDEXES:
            self.bump_all()
            self._generations.clear()
        self._generations[index] = self._generations.get(index, 0) + 1
        for key in [k for k, e in self._entries.items() if e.index == index]:
            self._drop(key)

    def bump_all(self) -> None:
        """clear_cache (or a write whose index is unknown): every entry goes."""
        self._global_generation += 1
        self.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        if self._copy is not None:
            self._copy.delete_all()

    # --- entries ---------------------------------------------------------------------------------

    def get(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.stored_at >= self.config.ttl_s:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.answer

    def put(self, key: str, answer: CachedAnswer, *, index: str | None, generation: tuple[int, int]) -> bool:
        """Store ``answer``, made with ``generation`` (what ``generation(index)`` said when it began):
        False, and nothing stored, when the cache is off, the answer is over ``max_bytes``, or a
        prompt write happened meanwhile (the answer may be of the old prompt)."""
        if not self.config.enabled or answer.size > self.config.max_bytes or generation != self.generation(index):
            return False
        if key in self._entries:
            self._drop(key)
        self._evict(answer.size)
        self._entries[key] = _Entry(answer, self._clock(), index)
        self._bytes += answer.size
        if self._copy is not None:
            self._copy.save(key, answer, index=index, generation=generation)
        return True

    def _evict(self, room: int) -> None:
        """Drop expired entries, then least recently used ones, until ``room`` more bytes fit."""
        now = self._clock()
        for key in [k for k, e in self._entries.items() if now - e.stored_at >= self.config.ttl_s]:
            self._drop(key)
        while self._entries and self._bytes + room > self.config.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.answer.size
        if self._copy is not None:
            self._copy.delete(key)

    # --- single flight ---------------------------------------------------------------------------

    def flight(self, key: str, run: Callable[[], Awaitable[T]]) -> tuple[Flight[T], bool]:
        """The flight of ``key``, and True when this call started it (``run()`` in a task of its own)."""
        running = self._flights.get(key)
        if running is not None:
            return running, False  # type: ignore[return-value]  # one key, one kind of result
        flight: Flight[T] = Flight(asyncio.ensure_future(run()))
        self._flights[key] = flight  # type: ignore[assignment]
        flight.task.add_done_callback(lambda _: self._landed(key, flight))
        return flight, True

    def _landed(self, key: str, flight: Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved: a failure nobody waited for is no "never retrieved" warning

    async def close(self) -> None:
        """At exit: cancel syntheses still in flight (each gives back its slot on the way out)."""
        tasks = [flight.task for flight in self._flights.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class Flight(Generic[T]):
    """One synthesis that identical requests share; ``result`` waits for it without cancelling it."""

    def __init__(self, task: asyncio.Future[T]) -> None:
        self.task = task

    async def result(self, within: float | None = None) -> T:
        """Its result, or its failure raised; a waiter cancelled leaves the synthesis running.
        ``within``: seconds this waiter waits at most (its own deadline), else ``StoppedWaiting``
        while the synthesis goes on for the others."""
        if within is None:
            return await asyncio.shield(self.task)
        try:
            return await wait_for(asyncio.shield(self.task), max(0.0, within))
        except asyncio.TimeoutError:
            if self.task.done():  # the synthesis' own failure, raised as it is
                raise
            raise StoppedWaiting(within) from None


class StoppedWaiting(Exception):
    """A waiter's own time ran out before the synthesis it shares ended."""
