"""The `backends` section: which backend processes to start (or which URLs to use), how they are
health-checked, warmed up, restarted, ejected and watched.

Only what the section itself can check is checked here; what needs another section (a backend at
the sidecar's own listen address) is SidecarConfig's cross-section check in scheduler.config.
"""

from __future__ import annotations

import os
import re
import shlex
import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from backend.settings.base import ENV_NAME, ConfigSection, Key, Problems, int_to_str, raise_if

__all__ = [
    "PLACEHOLDERS",
    "AdaptiveConfig",
    "BackendSpec",
    "BackendsConfig",
    "CrashLoopConfig",
    "HealthConfig",
    "OutlierConfig",
    "RestartConfig",
    "WarmupConfig",
    "WatchdogConfig",
    "parse_backend_url",
    "url_host",
]

# Placeholders that `backends.command` and `backends.env` values may use.
PLACEHOLDERS = ("port", "gpu", "index", "python", "host")
_SAMPLE_VALUES: dict[str, object] = {
    "port": 18050, "gpu": "0", "index": 0, "python": "python3", "host": "127.0.0.1",
}
_GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


class HealthConfig(ConfigSection):
    path: StrictStr = Field(default="/api/v1/health", pattern=r"^/")
    interval_s: StrictFloat = Field(default=2.0, gt=0)
    timeout_s: StrictFloat = Field(default=2.0, gt=0)
    start_timeout_s: StrictFloat = Field(default=120.0, gt=0)
    rise: StrictInt = Field(default=2, ge=1)  # consecutive good checks that bring an unhealthy backend back
    fall: StrictInt = Field(default=3, ge=1)  # consecutive failed checks that take a ready backend out


class WarmupConfig(ConfigSection):
    """One synthesis a new backend runs before READY: it loads the model and pays the cold start."""

    enabled: StrictBool = True
    text: StrictStr = Field(default="你好，欢迎使用语音合成服务。", min_length=1)
    index: StrictStr = Field(default="exampleA", min_length=1)  # a prompt every backend's cache holds
    sample_rate: Literal[24000, 32000] = 24000
    use_phoneme: StrictBool = False
    timeout_s: StrictFloat = Field(default=600.0, gt=0)

    @property
    def model_key(self) -> tuple[int, bool]:
        """The (sample_rate, use_phoneme) a backend has loaded once its warm-up succeeded."""
        return (self.sample_rate, self.use_phoneme)


class CrashLoopConfig(ConfigSection):
    """More than `max_failures` failures within `window_s`: FAILED, wait `cooldown_s`, try again."""

    max_failures: StrictInt = Field(default=5, ge=1)
    window_s: StrictFloat = Field(default=60.0, gt=0)
    cooldown_s: StrictFloat = Field(default=300.0, gt=0)


class RestartConfig(ConfigSection):
    backoff_initial_s: StrictFloat = Field(default=0.5, gt=0)
    backoff_max_s: StrictFloat = Field(default=30.0, gt=0)
    crash_loop: CrashLoopConfig = Field(default_factory=CrashLoopConfig)

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RestartConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            problem = f"must be >= backoff_initial_s ({self.backoff_initial_s})"
            raise Problems([(("backoff_max_s",), problem)])
        return self


class OutlierConfig(ConfigSection):
    """Passive outlier detection from the outcomes of real requests (ejection doubles, capped)."""

    consecutive_failures: StrictInt = Field(default=5, ge=1)
    latency_ratio: StrictFloat = Field(default=4.0, gt=1)  # median actual/predicted service over...
    min_requests: StrictInt = Field(default=5, ge=1)  # ...this many of its latest requests
    base_ejection_s: StrictFloat = Field(default=10.0, gt=0)
    max_ejection_s: StrictFloat = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _max_not_below_base(self) -> OutlierConfig:
        if self.max_ejection_s < self.base_ejection_s:
            raise Problems([(("max_ejection_s",), f"must be >= base_ejection_s ({self.base_ejection_s})")])
        return self


class WatchdogConfig(ConfigSection):
    """When a backend is stuck: a request far past its prediction, or no health while busy."""

    factor: StrictFloat = Field(default=5.0, ge=1)
    min_s: StrictFloat = Field(default=30.0, gt=0)
    unresponsive_s: StrictFloat = Field(default=10.0, gt=0)

    def limit_s(self, p95_s: float) -> float:
        """How long a request predicted at `p95_s` may run before its backend is killed."""
        return max(self.min_s, self.factor * p95_s)


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """One backend of the pool: a process we start (`managed`) or an external URL."""

    id: str
    index: int
    gpu: str | None
    host: str
    port: int
    url: str
    managed: bool


class AdaptiveConfig(ConfigSection):
    """How `backends.slots: auto` learns each backend's limit (scheduler/core/concurrency.py, whose
    AdaptiveSettings has the same defaults for what is built without a configuration)."""

    min_gain: StrictFloat = Field(default=0.1, ge=0, le=10)
    samples: StrictInt = Field(default=8, ge=2, le=1000)
    reprobe_s: StrictFloat = Field(default=300.0, ge=0)
    latency_headroom: StrictFloat = Field(default=1.0, gt=0, le=1)


class BackendsConfig(ConfigSection):
    command: tuple[StrictStr, ...] = (
        "{python}", "-m", "glmtts.emulator", "--port", "{port}", "--time-scale", "0.05", "--seed", "{index}",
        "--gpu", "{gpu}",
    )
    cwd: Path | None = None  # absolute after load; relative paths are taken from the config file's directory
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    host: StrictStr = Field(default="127.0.0.1", min_length=1)
    gpus: tuple[StrictStr, ...] = ("0", "1")
    processes_per_gpu: StrictInt = Field(default=1, ge=1)
    base_port: StrictInt = Field(default=18050, ge=1, le=65535)
    slots: int | Literal["auto"] = "auto"  # checked by _check_slots
    # The bound of auto; the dispatcher's own default (DEFAULT_MAX_SLOTS) is the same.
    max_slots: StrictInt = Field(default=4, ge=1, le=64)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    restart: RestartConfig = Field(default_factory=RestartConfig)
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    stop_grace_s: StrictFloat = Field(default=10.0, ge=0)
    request_timeout_s: StrictFloat = Field(default=900.0, gt=0)
    external: tuple[StrictStr, ...] = ()  # normalised to scheme://host:port at load

    @field_validator("slots", mode="before")
    @classmethod
    def _check_slots(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError('must be a whole number >= 1 (requests per backend) or "auto" (learned per backend)')

    @field_validator("command", mode="before")
    @classmethod
    def _split_command(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split the command string: {exc}") from None
        return value

    @field_validator("command")
    @classmethod
    def _check_command(cls, command: tuple[str, ...]) -> tuple[str, ...]:
        if not command:
            raise ValueError("must name a program to run")
        raise_if([((i,), p) for i, arg in enumerate(command) if (p := _template_problem(arg))])
        return command

    @field_validator("cwd", mode="before")
    @classmethod
    def _resolve_cwd(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            return None
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise ValueError("must be a directory path or null")
        path = Path(value).expanduser()
        base_dir = (info.context or {}).get("base_dir") or Path.cwd()
        return Path(os.path.normpath(Path(base_dir) / path))

    @field_validator("env", mode="before")
    @classmethod
    def _stringify_env(cls, value: object) -> object:
        # `OMP_NUM_THREADS: 4` is what people write; bools stay errors (is it "true" or "1"?).
        if isinstance(value, Mapping):
            return {k: int_to_str(v) for k, v in value.items()}
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        problems: list[tuple[Key, str]] = []
        for name, template in env.items():
            if not ENV_NAME.fullmatch(name):
                problems.append(((name,), "not a valid environment variable name"))
            elif problem := _template_problem(template):
                problems.append(((name,), problem))
        raise_if(problems)
        return env

    @field_validator("gpus", mode="before")
    @classmethod
    def _stringify_gpus(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return [int_to_str(v) for v in value]
        return value

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, gpus: tuple[str, ...]) -> tuple[str, ...]:
        problems: list[tuple[Key, str]] = []
        first_at: dict[str, int] = {}
        for i, gpu in enumerate(gpus):
            if not _GPU_ID.fullmatch(gpu):
                problems.append(((i,), f"GPU id {gpu!r} must be letters, digits and _ . : - only"))
            elif gpu in first_at:
                problems.append(((i,), f"duplicate GPU id {gpu!r} (also gpus[{first_at[gpu]}])"))
            else:
                first_at[gpu] = i
        raise_if(problems)
        return gpus

    @field_validator("external")
    @classmethod
    def _check_external(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        problems: list[tuple[Key, str]] = []
        normalised: list[str] = []
        for i, url in enumerate(urls):
            try:
                scheme, host, port = parse_backend_url(url)
            except ValueError as exc:
                problems.append(((i,), str(exc)))
                continue
            canonical = f"{scheme}://{url_host(host)}:{port}"
            if canonical in normalised:
                problems.append(((i,), f"duplicate external backend {canonical}"))
            normalised.append(canonical)
        raise_if(problems)
        return tuple(normalised)

    @model_validator(mode="after")
    def _check_pool(self) -> BackendsConfig:
        problems: list[tuple[Key, str]] = []
        # A number may pass the default bound of auto; only one written next to it must hold.
        if isinstance(self.slots, int) and "max_slots" in self.model_fields_set and self.slots > self.max_slots:
            problems.append((("max_slots",), f"must be >= slots ({self.slots})"))
        count = self.managed_count
        if not self.gpus and not self.external:
            problems.append((("gpus",), "must list at least one GPU when there are no external backends"))
        last_port = self.base_port + count - 1
        if count and last_port > 65535:
            problems.append((
                ("base_port",),
                f"{count} backends need ports {self.base_port}..{last_port}, past 65535",
            ))
        templates = [*self.command, *self.env.values()]
        if count and not any("port" in _placeholder_names(t) for t in templates):
            problems.append((
                ("command",),
                "must use {port} (in the command or env) so each backend listens on its own port",
            ))
        for spec in self.layout():
            if not spec.managed and spec.host == self.host and self.in_managed_range(spec.port):
                problems.append((
                    ("external", spec.index - count),
                    f"port {spec.port} is inside the managed range starting at base_port {self.base_port}",
                ))
        raise_if(problems)
        return self

    @property
    def managed_count(self) -> int:
        return len(self.gpus) * self.processes_per_gpu

    def in_managed_range(self, port: int) -> bool:
        """Whether `port` is one the managed backends listen on."""
        return self.base_port <= port < self.base_port + self.managed_count

    def command_argv(self, *, port: int, gpu: str, index: int, python: str, host: str) -> list[str]:
        """The argv of managed backend `index`, placeholders substituted (`{{`/`}}` are literal)."""
        values = {"port": port, "gpu": gpu, "index": index, "python": python, "host": host}
        return [arg.format(**values) for arg in self.command]

    def environment(self, *, port: int, gpu: str, index: int, python: str, host: str) -> dict[str, str]:
        """The extra environment of managed backend `index` (to be laid over the sidecar's own)."""
        values = {"port": port, "gpu": gpu, "index": index, "python": python, "host": host}
        return {name: template.format(**values) for name, template in self.env.items()}

    def layout(self) -> list[BackendSpec]:
        """Managed processes GPU by GPU on consecutive ports from `base_port`, then externals."""
        specs = [
            BackendSpec(
                id=f"gpu{gpu}-{k}",
                index=index,
                gpu=gpu,
                host=self.host,
                port=self.base_port + index,
                url=f"http://{url_host(self.host)}:{self.base_port + index}",
                managed=True,
            )
            for index, (gpu, k) in enumerate(
                (gpu, k) for gpu in self.gpus for k in range(self.processes_per_gpu)
            )
        ]
        for j, url in enumerate(self.external):
            _, host, port = parse_backend_url(url)
            specs.append(BackendSpec(
                id=f"ext-{j}", index=len(specs), gpu=None, host=host, port=port, url=url, managed=False,
            ))
        return specs


def _template_problem(template: str) -> str | None:
    """Why `template` cannot be substituted, or None when it can."""
    known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
    try:
        names = _placeholder_names(template)
    except ValueError as exc:
        return f"bad placeholder syntax ({exc}); write {{{{ or }}}} for a literal brace"
    for name in names:
        if name not in PLACEHOLDERS:
            return f"unknown placeholder {{{name}}}; known: {known}"
    try:
        template.format(**_SAMPLE_VALUES)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        return f"placeholder cannot be substituted ({exc!r}); known: {known}"
    return None


def _placeholder_names(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def parse_backend_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an `http(s)://host[:port]` URL; ValueError says what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r} must be just scheme://host:port (no user, path, query or fragment)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    if port == 0:
        raise ValueError(f"{url!r} has an invalid port")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def url_host(host: str) -> str:
    """`host` as it goes into a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host
