"""Which prompt indexes the backends know, so an unknown index is rejected at the edge; and what a
prompt write asks the backends to read.

Each backend has its own prompt cache (upstream's design); writes go to every backend, so they
agree as long as everyone writes through the sidecar. The catalogue is the index list of one
ready backend, refreshed after every write and, at most once a second, when a request names an
index it does not list (someone may have added it behind our back).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from backend.record import Backend
from backend.state import BackendState
from backend.transport import BackendTimeout, BackendUnavailable, Transport
from glmtts.contract import parse_prompt_add, parse_prompt_update

log = logging.getLogger("glmtts_sidecar.admin")

REFRESH_INTERVAL_S = 1.0


class PromptCatalogue:
    def __init__(self, fetch: Callable[[], Awaitable[set[str] | None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch  # the index list of a ready backend, None when none could answer
        self._clock = clock
        self._indexes: set[str] | None = None
        self._fetched_at = float("-inf")

    @property
    def indexes(self) -> set[str] | None:
        return None if self._indexes is None else set(self._indexes)

    async def refresh(self) -> None:
        self._fetched_at = self._clock()
        fetched = await self._fetch()
        if fetched is not None:
            self._indexes = fetched

    def invalidate(self) -> None:
        self._fetched_at = float("-inf")

    async def has(self, index: str) -> bool:
        """True unless the backends are known not to have ``index`` (unknown counts as yes)."""
        if self._indexes is not None and index in self._indexes:
            return True
        if self._clock() - self._fetched_at >= REFRESH_INTERVAL_S:
            await self.refresh()
        return self._indexes is None or index in self._indexes


async def fetch_prompt_indexes(backends: Iterable[Backend], transport: Transport) -> set[str] | None:
    """The prompt indexes of the first ready backend among ``backends`` that answers, else None."""
    for backend in backends:
        if backend.state is not BackendState.READY:
            continue
        try:
            answer = await transport.exchange("GET", backend.url + "/api/v1/prompts", timeout=5.0)
        except (BackendUnavailable, BackendTimeout):
            continue
        if answer.status == 200:
            try:
                return {item["index"] for item in json.loads(answer.body)["prompts"]}
            except (ValueError, KeyError, TypeError):
                log.warning("backend %s: unreadable prompt list", backend.id)
    return None


def written_audio_path(method: str, content_type: str | None, body: bytes) -> str:
    """The ``prompt_audio_path`` a prompt write (POST /api/v1/prompts, PUT /api/v1/prompts/{index})
    sets, read from its form as upstream reads it; HTTPDetailError (upstream's own answer) when the
    form is invalid. CPU-bound on a large body: call it off the event loop."""
    form = parse_prompt_add(content_type, body) if method == "POST" else parse_prompt_update(content_type, body)
    return form.prompt_audio_path
