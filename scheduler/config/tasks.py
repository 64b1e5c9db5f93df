"""The `tasks` section: the async task mode and where finished tasks may be announced."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from backend.settings.base import ConfigSection, Key, Problems, raise_if
from scheduler.config.base import resolve_secret
from scheduler.config.callback_urls import CallbackURLError, allowed_target, entry_problem

__all__ = ["CallbacksConfig", "RedisTasksConfig", "TasksConfig"]

SQLITE = "sqlite"
_ENV = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
_CLUSTER = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


class CallbacksConfig(ConfigSection):
    """Where finished async tasks may be announced: an allow-list checked by scheduler.runtime.callbacks, so
    the sidecar never becomes a way to make requests to addresses a client could not reach."""

    # Allowed receivers: scheme://host[:port][/path]; a callback URL needs the same scheme, host and
    # port and a path under this one. Host names must resolve to global addresses only.
    allow: tuple[StrictStr, ...] = ()
    secret: SecretStr | None = None  # HMAC-SHA256 key signing callback bodies; "env:NAME" reads it at load
    timeout_s: StrictFloat = Field(default=10.0, gt=0)
    attempts: StrictInt = Field(default=5, ge=1, le=50)
    backoff_s: StrictFloat = Field(default=1.0, gt=0)  # doubles after each failed attempt

    @field_validator("allow")
    @classmethod
    def _check_allow(cls, allow: tuple[str, ...]) -> tuple[str, ...]:
        problems: list[tuple[Key, str]] = []
        for i, entry in enumerate(allow):
            problem = entry_problem(entry)
            if problem is not None:
                problems.append(((i,), f"{entry!r} {problem}"))
        raise_if(problems)
        return allow

    @field_validator("secret", mode="before")
    @classmethod
    def _resolve_secret(cls, value: object) -> object:
        return resolve_secret(value)

    @model_validator(mode="after")
    def _signed_when_allowed(self) -> CallbacksConfig:
        if self.allow and self.secret is None:
            raise Problems([(("secret",), "must be set when allow lists receivers: without it they cannot "
                                          "verify that a callback comes from this sidecar")])
        return self

    def refusal(self, url: str) -> str | None:
        """Why `url` cannot be a callback URL (a clause following its name), or None when it can."""
        try:
            allowed_target(self.allow, url)
        except CallbackURLError as exc:
            return str(exc)
        return None


class RedisTasksConfig(ConfigSection):
    """How sidecars share tasks through Redis (``tasks.store`` a redis:// URL; docs/scale-out.md).
    ``cluster``: the key prefix and consumer group: sidecars with the same cluster share one task
    queue. ``replica``: this sidecar's name in it (None: host name and listen port). ``lease_s``: a
    claimed task's lease, renewed every third of it while the task waits and runs; a task whose
    lease lapsed (its sidecar died) is claimed by another. ``claim_ahead``: tasks a sidecar claims
    beyond its free slots (a short local queue). ``connect_timeout_s``; ``reconnect_max_s``: the
    longest wait between reconnection attempts (backoff doubles up to it)."""

    cluster: StrictStr = Field(default="glmtts", pattern=_CLUSTER)
    replica: StrictStr | None = Field(default=None, pattern=_CLUSTER)
    lease_s: StrictFloat = Field(default=30.0, ge=3.0, le=3600.0)
    claim_ahead: StrictInt = Field(default=2, ge=0, le=1000)
    connect_timeout_s: StrictFloat = Field(default=2.0, gt=0, le=60.0)
    reconnect_max_s: StrictFloat = Field(default=30.0, gt=0, le=600.0)


class TasksConfig(ConfigSection):
    """The async task mode: POST /api/v1/tasks, persisted in SQLite under `state_dir`, or shared by
    several sidecars in Redis (``store``: a redis:// or rediss:// URL; "env:NAME" reads it at load)."""

    enabled: StrictBool = True
    state_dir: Path | None = None  # None: $STATE_DIRECTORY (systemd's StateDirectory=), else ./glmtts-sidecar-state
    ttl_s: StrictFloat = Field(default=86400.0, gt=0)  # finished tasks and their audio are kept this long
    deadline_s: StrictFloat = Field(default=3600.0, gt=0)  # a task's own deadline (queueing + service)
    sweep_interval_s: StrictFloat = Field(default=60.0, gt=0)
    max_per_tenant: StrictInt = Field(default=1000, ge=1)  # stored tasks of one tenant, any state, until swept
    max_bytes_per_tenant: StrictInt = Field(default=1 << 30, ge=1 << 20)  # its request bodies plus audio on disk
    min_free_bytes: StrictInt = Field(default=1 << 30, ge=0)  # new tasks refused (503) below this much free disk
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig)
    store: SecretStr = SecretStr(SQLITE)  # masked in reprs: a Redis URL may hold a password
    redis: RedisTasksConfig = Field(default_factory=RedisTasksConfig)

    @field_validator("store", mode="before")
    @classmethod
    def _check_store(cls, value: object) -> object:
        """"sqlite", or a redis:// / rediss:// URL with a host; the message never shows the URL."""
        if not isinstance(value, str):
            raise Problems([((), "must be a string: sqlite, or a redis:// or rediss:// URL")])
        if (named := _ENV.fullmatch(value)) is not None:
            if named[1] not in os.environ:
                raise Problems([((), f"environment variable {named[1]} is not set")])
            value = os.environ[named[1]]
        if value == SQLITE:
            return SecretStr(value)
        try:
            parts = urlsplit(value)
            host = parts.hostname
            _ = parts.port  # ValueError for a port out of range
        except ValueError:
            raise Problems([((), "is not a valid URL (sqlite, or redis://host:port/db)")]) from None
        if parts.scheme not in ("redis", "rediss"):
            raise Problems([((), "must be sqlite, or a URL whose scheme is redis or rediss")])
        if not host:
            raise Problems([((), "a redis URL needs a host (redis://host:port/db)")])
        if parts.path not in ("", "/") and not re.fullmatch(r"/\d{1,2}", parts.path):
            raise Problems([((), "a redis URL's path is a database number (redis://host:port/0)")])
        return SecretStr(value)

    def redis_url(self) -> str | None:
        """The Redis URL tasks are kept under, or None for SQLite."""
        url = self.store.get_secret_value()
        return None if url == SQLITE else url

    @field_validator("state_dir", mode="before")
    @classmethod
    def _relative_to_file(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            base = (info.context or {}).get("base_dir", Path.cwd())
            return path if path.is_absolute() else Path(base) / path
        return value

    def directory(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(from_systemd) if from_systemd else Path.cwd() / "glmtts-sidecar-state"
