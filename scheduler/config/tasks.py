"""The `tasks` section: the async task mode and where finished tasks may be announced."""

from __future__ import annotations

import os
from pathlib import Path

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

__all__ = ["CallbacksConfig", "TasksConfig"]


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


class TasksConfig(ConfigSection):
    """The async task mode: POST /api/v1/tasks, persisted in SQLite under `state_dir`."""

    enabled: StrictBool = True
    state_dir: Path | None = None  # None: $STATE_DIRECTORY (systemd's StateDirectory=), else ./glmtts-sidecar-state
    ttl_s: StrictFloat = Field(default=86400.0, gt=0)  # finished tasks and their audio are kept this long
    deadline_s: StrictFloat = Field(default=3600.0, gt=0)  # a task's own deadline (queueing + service)
    sweep_interval_s: StrictFloat = Field(default=60.0, gt=0)
    max_per_tenant: StrictInt = Field(default=1000, ge=1)  # stored tasks of one tenant, any state, until swept
    max_bytes_per_tenant: StrictInt = Field(default=1 << 30, ge=1 << 20)  # its request bodies plus audio on disk
    min_free_bytes: StrictInt = Field(default=1 << 30, ge=0)  # new tasks refused (503) below this much free disk
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig)

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
