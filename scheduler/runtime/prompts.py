"""Which prompt indexes the backends know, so an unknown index is rejected at the edge; and what a
prompt write asks the backends to read.

Each backend has its own prompt cache (upstream's design); writes go to every backend, so they
agree as long as everyone writes through the sidecar. The catalogue is the index list of one
ready backend, refreshed after every write and, at most once a second, when a request names an
index it does not list (someone may have added it behind our back). With each index it keeps a
digest of that prompt's configuration as the backend reports it (``digest``): part of the result
cache's key, so a prompt changed behind the sidecar's back misses once the catalogue refreshed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping

from backend.record import Backend
from backend.state import BackendState
from backend.transport import BackendTimeout, BackendUnavailable, Transport
from glmtts.contract import parse_prompt_add, parse_prompt_update

log = logging.getLogger("glmtts_sidecar.admin")

REFRESH_INTERVAL_S = 1.0


Prompts = Mapping[str, str | None]  # index -> digest of its configuration (None: not reported)


class PromptCatalogue:
    def __init__(self, fetch: Callable[[], Awaitable[Prompts | Collection[str] | None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        # ``fetch``: the prompts of a ready backend (their digests, or bare indexes where unknown),
        # None when none could answer.
        self._fetch = fetch
        self._clock = clock
        self._prompts: dict[str, str | None] | None = None
        self._fetched_at = float("-inf")

    @property
    def indexes(self) -> set[str] | None:
        return None if self._prompts is None else set(self._prompts)

    def digest(self, index: str) -> str | None:
        """The digest of ``index``'s configuration at the last refresh; None when not known."""
        return None if self._prompts is None else self._prompts.get(index)

    async def refresh(self) -> None:
        self._fetched_at = self._clock()
        fetched = await self._fetch()
        if fetched is None:
            return
        if isinstance(fetched, Mapping):
            self._prompts = dict(fetched)
        else:
            self._prompts = dict.fromkeys(fetched)

    def invalidate(self) -> None:
        self._fetched_at = float("-inf")

    async def has(self, index: str) -> bool:
        """True unless the backends are known not to have ``index`` (unknown counts as yes)."""
        if self._prompts is not None and index in self._prompts:
            return True
        if self._clock() - self._fetched_at >= REFRESH_INTERVAL_S:
            await self.refresh()
        return self._prompts is None or index in self._prompts


def config_digest(config: object) -> str:
    """A digest of one prompt's configuration as a backend reports it (any JSON value)."""
    canonical = json.dumps(config, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_prompt_list(body: bytes) -> dict[str, str | None]:
    """``GET /api/v1/prompts``'s answer as index -> configuration digest; ValueError when it is not
    upstream's shape (a list of objects, each with a string ``index``)."""
    items = json.loads(body)["prompts"] if body else None
    if not isinstance(items, list):
        raise ValueError("'prompts' is not a list")
    prompts: dict[str, str | None] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("index"), str):
            raise ValueError("a prompt without a string 'index'")
        prompts[item["index"]] = config_digest(item["config"]) if "config" in item else None
    return prompts


async def fetch_prompts(backends: Iterable[Backend], transport: Transport) -> dict[str, str | None] | None:
    """The prompts (index -> configuration digest) of the first ready backend among ``backends``
    that answers readably, else None."""
    for backend in backends:
        if backend.state is not BackendState.READY:
            continue
        try:
            answer = await transport.exchange("GET", backend.url + "/api/v1/prompts", timeout=5.0)
        except (BackendUnavailable, BackendTimeout):
            continue
        if answer.status == 200:
            try:
                return parse_prompt_list(answer.body)
            except (ValueError, KeyError, TypeError, RecursionError):
                log.warning("backend %s: unreadable prompt list", backend.id)
    return None


def written_audio_path(method: str, content_type: str | None, body: bytes) -> str:
    """The ``prompt_audio_path`` a prompt write (POST /api/v1/prompts, PUT /api/v1/prompts/{index})
    sets, read from its form as upstream reads it; HTTPDetailError (upstream's own answer) when the
    form is invalid. CPU-bound on a large body: call it off the event loop."""
    form = parse_prompt_add(content_type, body) if method == "POST" else parse_prompt_update(content_type, body)
    return form.prompt_audio_path
