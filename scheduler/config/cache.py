"""The `cache` section: a bounded in-memory cache of backends' successful TTS answers.

Requests whose every synthesis input is equal are answered from it, and identical requests in
flight share one synthesis (scheduler.runtime.cache). Off by default: a cached answer carries the
original ``generation_time``, which a drop-in replacement of upstream should not change. With
``disk``, entries also survive a restart (scheduler.runtime.cache_disk).
"""

from __future__ import annotations

from pydantic import Field, StrictBool, StrictFloat, StrictInt

from backend.settings.base import ConfigSection

__all__ = ["CACHE_SUBDIR", "CacheConfig"]

CACHE_SUBDIR = "cache"  # the disk copy's directory under the tasks' state directory

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class CacheConfig(ConfigSection):
    """``enabled``: answer repeated /api/v1/tts and /v1/audio/speech requests from the cache.
    ``max_bytes``: the answers' bytes held at most (least recently used ones go first; an answer
    larger than this is never stored). ``ttl_s``: seconds an answer may be served after it was made.
    ``shared``: one cache for every tenant (else per tenant: a shared cache lets one tenant tell by
    the timing of its answers what another asked for). ``disk``: also keep every entry in a file
    under the tasks' state directory (``<state_dir>/cache``), read back at start (needs a restart;
    needs ``tasks.enabled``, checked across sections by SidecarConfig)."""

    enabled: StrictBool = False
    max_bytes: StrictInt = Field(default=DEFAULT_MAX_BYTES, ge=0)
    ttl_s: StrictFloat = Field(default=3600.0, gt=0)
    shared: StrictBool = False
    disk: StrictBool = False
