"""The lifecycle of one backend, as the pool and the proxy see it. Only READY receives new traffic."""

from __future__ import annotations

import enum

__all__ = ["BackendState"]


class BackendState(enum.Enum):
    STARTING = "starting"  # process spawned (or external URL configured), health not answered yet
    WARMING = "warming"  # health answers; the warm-up synthesis is running, so users never pay the cold start
    READY = "ready"  # warmed up and healthy; may receive traffic
    UNHEALTHY = "unhealthy"  # health failing (fall count reached), proxy-reported failures, or ejected as an outlier
    DRAINING = "draining"  # no new traffic; in-flight work finishes before a restart or removal
    RESTARTING = "restarting"  # process exited, failed to start or was killed; waiting out the backoff
    FAILED = "failed"  # crash loop: too many failures in a short window; cooling down before trying again
    STOPPING = "stopping"  # the pool is shutting down: supervision ends, the process gets SIGTERM
    STOPPED = "stopped"  # the process is gone and reaped; nothing more will happen
