"""The sections about the sidecar as a service: where it listens, who may use its admin endpoints,
which prompt files it may name, how it shuts down, logs and exposes metrics."""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import Literal

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

__all__ = [
    "AdminConfig",
    "ListenConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MetricsListenConfig",
    "PromptsConfig",
    "ShutdownConfig",
]


class ListenConfig(ConfigSection):
    host: StrictStr = Field(default="127.0.0.1", min_length=1)
    port: StrictInt = Field(default=8049, ge=0, le=65535)  # 0: ephemeral, for tests

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect: 127.0.0.0/8, ::1 or localhost (a name that
        could resolve elsewhere, a wildcard or any other address is not)."""
        if self.host.lower() == "localhost":
            return True
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        return address.is_loopback


class PromptsConfig(ConfigSection):
    """Which prompt audio files a prompt write (POST/PUT /api/v1/prompts) may name."""

    allowed_dirs: tuple[Path, ...] = ()  # absolute after load (relative: from the config file's directory); (): any

    @field_validator("allowed_dirs", mode="before")
    @classmethod
    def _relative_to_file(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, list | tuple):
            return value
        base = Path((info.context or {}).get("base_dir") or Path.cwd())
        problems: list[tuple[Key, str]] = []
        dirs: list[Path] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item or "\0" in item:
                problems.append(((i,), "must be a directory path"))
                continue
            dirs.append(Path(os.path.normpath(base / Path(item).expanduser())))
        raise_if(problems)
        return tuple(dirs)

    def permits(self, audio_path: str, cwd: Path) -> bool:
        """Whether ``audio_path``, resolved as a backend working in ``cwd`` would resolve it (symlinks
        followed, here and in the allowed directories), lies inside one of ``allowed_dirs``; always
        True when none is configured. Touches the file system: call it off the event loop."""
        if not self.allowed_dirs:
            return True
        if not audio_path:
            return False
        try:
            resolved = Path(os.path.realpath(cwd / audio_path))
        except ValueError:  # a NUL byte, a lone surrogate: names no file
            return False
        return any(resolved.is_relative_to(os.path.realpath(d)) for d in self.allowed_dirs)


class AdminConfig(ConfigSection):
    """Who may use the admin endpoints (prompt writes, clear_cache, /admin/*) and see the details
    of /api/v1/health and /api/v1/queue."""

    token: SecretStr | None = None  # Authorization: Bearer <token>; "env:NAME" reads it at load; None: open
    allow_anonymous: StrictBool = False  # no token on a listener that is not loopback: only when this says so

    @field_validator("token", mode="before")
    @classmethod
    def _resolve_token(cls, value: object) -> object:
        return resolve_secret(value)

    @model_validator(mode="after")
    def _anonymous_needs_no_token(self) -> AdminConfig:
        if self.allow_anonymous and self.token is not None:
            raise Problems([(("allow_anonymous",), "has no effect when token is set; set one of them")])
        return self

    def allows(self, authorization: str | None) -> bool:
        """Whether the request may use admin endpoints: no token is configured, or it presents it."""
        return self.token is None or self.authenticates(authorization)

    def authenticates(self, authorization: str | None) -> bool:
        """Whether ``authorization`` is ``Bearer <the configured token>`` (constant-time; False when
        no token is configured, and for a header that is not ASCII)."""
        if self.token is None:
            return False
        scheme, _, given = (authorization or "").strip().partition(" ")
        expected = self.token.get_secret_value().encode()
        # surrogatepass: aiohttp hands over undecodable header bytes as lone surrogates; they must
        # compare unequal, never raise.
        presented = given.strip().encode("utf-8", "surrogatepass")
        return scheme.lower() == "bearer" and hmac.compare_digest(expected, presented)


class ShutdownConfig(ConfigSection):
    """A drain (SIGTERM, POST /admin/drain): /readyz fails at once; ``unready_s`` later the listener
    closes, so a load balancer that has not yet seen /readyz fail finds the connection refused and
    tries another sidecar; the work already admitted finishes up to ``drain_timeout_s``."""

    drain_timeout_s: StrictFloat = Field(default=30.0, ge=0)
    unready_s: StrictFloat = Field(default=5.0, ge=0, le=3600.0)  # 0: the listener closes at once


class LoggingConfig(ConfigSection):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    backend_output: StrictBool = True

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class MetricsListenConfig(ConfigSection):
    """A separate address for /metrics."""

    host: StrictStr = Field(default="127.0.0.1", min_length=1)
    port: StrictInt = Field(ge=0, le=65535)  # 0: ephemeral, for tests


class MetricsConfig(ConfigSection):
    listen: MetricsListenConfig | None = None  # None: /metrics on the main listener; else there only
