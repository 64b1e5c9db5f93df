"""The lifecycle of one backend, as the pool and the proxy see it."""

from __future__ import annotations

import enum

__all__ = ["BackendState"]


class BackendState(enum.Enum):
    STARTING = "starting"  # process spawned, health not answered yet
    READY = "ready"  # health answers; may receive traffic
    UNHEALTHY = "unhealthy"  # was ready, health checks failing (fall count reached) or proxy reported failures
    RESTARTING = "restarting"  # process exited or was killed; waiting out the backoff
    STOPPING = "stopping"  # the pool is shutting down: supervision ends, the process gets SIGTERM
    STOPPED = "stopped"  # the process is gone and reaped; nothing more will happen
