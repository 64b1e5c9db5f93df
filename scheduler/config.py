"""The sidecar's configuration: YAML in, validated and frozen pydantic models out.

Everything is checked once, at load (and again on reload): unknown keys, wrong types, impossible
values and cross-field conflicts become one `ConfigError` listing every problem as
`key.path: problem`. Nothing is re-read or re-validated at use.

A new section is one more `ConfigSection` subclass and one more field on `SidecarConfig`.
"""

from __future__ import annotations

import difflib
import hmac
import importlib.resources
import ipaddress
import os
import re
import shlex
import string
import typing
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from scheduler.core.concurrency import DEFAULT_MAX_SLOTS, AdaptiveSettings, SlotPolicy
from scheduler.runtime import callbacks

__all__ = [
    "HIGHEST_BAND",
    "MIN_KEY_CHARS",
    "PLACEHOLDERS",
    "AdaptiveConfig",
    "BackendSpec",
    "BackendsConfig",
    "ClassConfig",
    "ConfigError",
    "ConfigSection",
    "CostConfig",
    "CrashLoopConfig",
    "DeadlinesConfig",
    "HealthConfig",
    "LearnedDeadlineConfig",
    "LimitsConfig",
    "ListenConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MetricsListenConfig",
    "OutlierConfig",
    "PrioritiesConfig",
    "PromptsConfig",
    "QueueConfig",
    "RestartConfig",
    "RetriesConfig",
    "ShutdownConfig",
    "SidecarConfig",
    "TenantConfig",
    "TenantPolicy",
    "TenantsConfig",
    "TierConfig",
    "WarmupConfig",
    "WatchdogConfig",
    "default_config_path",
    "default_config_text",
    "load_config",
    "parse_config",
]

# Placeholders that `backends.command` and `backends.env` values may use.
PLACEHOLDERS = ("port", "gpu", "index", "python", "host")
_SAMPLE_VALUES: dict[str, object] = {
    "port": 18050, "gpu": "0", "index": 0, "python": "python3", "host": "127.0.0.1",
}
_GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_LABEL = r"^[a-z][a-z0-9_]*$"  # class and band names: metric label values
_TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it travels in a header
_ENV_PREFIX = "env:"
MIN_KEY_CHARS = 16
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

Key = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one `key.path: problem` line each."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(self.problems) == 1:  # one line: what journald and a terminal show whole
            super().__init__(f"invalid configuration in {source}: {self.problems[0]}")
            return
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


class _Problems(ValueError):
    """Raised by validators: problems keyed *relative to the value being validated*."""

    def __init__(self, problems: list[tuple[Key, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def _raise_if(problems: list[tuple[Key, str]]) -> None:
    if problems:
        raise _Problems(problems)


class ConfigSection(BaseModel):
    """Base of every config model: unknown keys are errors and values never change after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
            raise _Problems([(("backoff_max_s",), problem)])
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
            raise _Problems([(("max_ejection_s",), f"must be >= base_ejection_s ({self.base_ejection_s})")])
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
    """How `backends.slots: auto` learns each backend's limit (scheduler/core/concurrency.py)."""

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
    max_slots: StrictInt = Field(default=DEFAULT_MAX_SLOTS, ge=1, le=64)  # the bound of auto
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
        _raise_if([((i,), p) for i, arg in enumerate(command) if (p := _template_problem(arg))])
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
            return {k: _int_to_str(v) for k, v in value.items()}
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        problems: list[tuple[Key, str]] = []
        for name, template in env.items():
            if not _ENV_NAME.fullmatch(name):
                problems.append(((name,), "not a valid environment variable name"))
            elif problem := _template_problem(template):
                problems.append(((name,), problem))
        _raise_if(problems)
        return env

    @field_validator("gpus", mode="before")
    @classmethod
    def _stringify_gpus(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return [_int_to_str(v) for v in value]
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
        _raise_if(problems)
        return gpus

    @field_validator("external")
    @classmethod
    def _check_external(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        problems: list[tuple[Key, str]] = []
        normalised: list[str] = []
        for i, url in enumerate(urls):
            try:
                scheme, host, port = _parse_backend_url(url)
            except ValueError as exc:
                problems.append(((i,), str(exc)))
                continue
            canonical = f"{scheme}://{_url_host(host)}:{port}"
            if canonical in normalised:
                problems.append(((i,), f"duplicate external backend {canonical}"))
            normalised.append(canonical)
        _raise_if(problems)
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
            if not spec.managed and spec.host == self.host and self._in_managed_range(spec.port):
                problems.append((
                    ("external", spec.index - count),
                    f"port {spec.port} is inside the managed range starting at base_port {self.base_port}",
                ))
        _raise_if(problems)
        return self

    def slot_policy(self) -> SlotPolicy:
        """`slots` and its knobs, as the dispatcher uses them."""
        if self.slots != "auto":
            return SlotPolicy(fixed=self.slots)
        adaptive = self.adaptive
        return SlotPolicy(fixed=None, adaptive=AdaptiveSettings(
            max_slots=self.max_slots, min_gain=adaptive.min_gain, samples=adaptive.samples,
            reprobe_s=adaptive.reprobe_s, latency_headroom=adaptive.latency_headroom))

    @property
    def managed_count(self) -> int:
        return len(self.gpus) * self.processes_per_gpu

    def _in_managed_range(self, port: int) -> bool:
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
                url=f"http://{_url_host(self.host)}:{self.base_port + index}",
                managed=True,
            )
            for index, (gpu, k) in enumerate(
                (gpu, k) for gpu in self.gpus for k in range(self.processes_per_gpu)
            )
        ]
        for j, url in enumerate(self.external):
            _, host, port = _parse_backend_url(url)
            specs.append(BackendSpec(
                id=f"ext-{j}", index=len(specs), gpu=None, host=host, port=port, url=url, managed=False,
            ))
        return specs


class LimitsConfig(ConfigSection):
    max_body_bytes: StrictInt = Field(default=20 * 1024 * 1024, ge=1024)
    max_text_chars: StrictInt = Field(default=10_000, ge=1)
    body_timeout_s: StrictFloat = Field(default=30.0, gt=0)  # a request body must arrive whole within this
    idle_timeout_s: StrictFloat = Field(default=75.0, gt=0)  # a connection without a whole request head


HIGHEST_BAND = "highest"  # classes[].band: the first of priorities.bands, whatever its name


class ClassConfig(ConfigSection):
    """A length class: texts of up to `max_chars` characters not in an earlier class (None: no bound)."""

    name: StrictStr = Field(pattern=_LABEL)
    max_chars: StrictInt | None = Field(ge=1)
    max_in_service: StrictInt | None = Field(default=None, ge=1)  # pool-wide; None: no cap
    band: StrictStr | None = None  # a priorities.bands name or "highest": its requests queue at least this high
    extra_slots: StrictInt = Field(default=0, ge=0, le=64)  # its requests may exceed a backend's slots by this many
    min_share: StrictFloat = Field(default=0.2, ge=0, le=1)  # of backend time, kept while its requests wait


_DEFAULT_CLASSES = (
    ClassConfig(name="short", max_chars=50, band=HIGHEST_BAND, extra_slots=1),
    ClassConfig(name="medium", max_chars=200),
    ClassConfig(name="long", max_chars=None),
)


class CostConfig(ConfigSection):
    """Priors of the service-time model, `base_s + per_unit_s * units` (the seed's 3.5 s / 80 s)."""

    base_s: StrictFloat = Field(default=0.3125, ge=0)
    per_unit_s: StrictFloat = Field(default=0.159375, gt=0)
    p95_ratio: StrictFloat = Field(default=1.3, ge=1)
    prior_weight: StrictFloat = Field(default=10.0, ge=0)
    window: StrictInt = Field(default=256, ge=16, le=100_000)
    reload_s: StrictFloat = Field(default=20.0, ge=0)
    slow_ratio: StrictFloat = Field(default=1.5, gt=1)
    slow_min_samples: StrictInt = Field(default=10, ge=1)


class TierConfig(ConfigSection):
    max_chars: StrictInt | None = Field(ge=1)
    timeout_s: StrictFloat = Field(gt=0)
    per_char_s: StrictFloat = Field(default=0.0, ge=0)  # plus this per character: a deadline that grows with the text


class LearnedDeadlineConfig(ConfigSection):
    factor: StrictFloat = Field(default=2.0, ge=1)
    buffer_s: StrictFloat = Field(default=10.0, ge=0)
    min_s: StrictFloat = Field(default=15.0, gt=0)
    max_s: StrictFloat = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _max_not_below_min(self) -> LearnedDeadlineConfig:
        if self.max_s < self.min_s:
            raise _Problems([(("max_s",), f"must be >= min_s ({self.min_s})")])
        return self

    def deadline_s(self, p95_s: float) -> float:
        """clamp(p95_s * factor + buffer_s, min_s, max_s)."""
        return min(max(p95_s * self.factor + self.buffer_s, self.min_s), self.max_s)


class DeadlinesConfig(ConfigSection):
    policy: Literal["tiers", "learned"] = "tiers"
    tiers: tuple[TierConfig, ...] = (
        TierConfig(max_chars=50, timeout_s=60.0),
        TierConfig(max_chars=200, timeout_s=300.0),
        TierConfig(max_chars=None, timeout_s=600.0),
    )
    learned: LearnedDeadlineConfig = Field(default_factory=LearnedDeadlineConfig)
    client_header: StrictBool = True
    reject_unmeetable: StrictBool = True

    @field_validator("tiers")
    @classmethod
    def _check_tiers(cls, tiers: tuple[TierConfig, ...]) -> tuple[TierConfig, ...]:
        _raise_if(_ladder_problems([tier.max_chars for tier in tiers], "tier"))
        return tiers

    def tier_for(self, chars: int) -> float:
        """The `tiers` deadline, in seconds, of a text of `chars` characters."""
        tier = next(t for t in self.tiers if t.max_chars is None or chars <= t.max_chars)
        return tier.timeout_s + tier.per_char_s * chars


class PrioritiesConfig(ConfigSection):
    bands: tuple[StrictStr, ...] = ("interactive", "standard", "batch")  # highest first
    default: StrictStr = "standard"

    @field_validator("bands")
    @classmethod
    def _check_bands(cls, bands: tuple[str, ...]) -> tuple[str, ...]:
        if not bands:
            raise _Problems([((), "must list at least one band")])
        problems: list[tuple[Key, str]] = []
        for i, band in enumerate(bands):
            if not re.fullmatch(_LABEL, band):
                problems.append(((i,), f"band name {band!r} must match {_LABEL}"))
            elif band == HIGHEST_BAND:
                problems.append(((i,), f"band name {band!r} is reserved (classes[].band: {HIGHEST_BAND} "
                                       "names the first band, whatever it is called)"))
            elif band in bands[:i]:
                problems.append(((i,), f"duplicate band {band!r} (also bands[{bands.index(band)}])"))
        _raise_if(problems)
        return bands

    @model_validator(mode="after")
    def _default_is_a_band(self) -> PrioritiesConfig:
        if self.default not in self.bands:
            raise _Problems([(("default",), f"{self.default!r} is not one of bands ({', '.join(self.bands)})")])
        return self


class TenantPolicy(ConfigSection):
    """What a tenant may do: its fair-queueing weight, the bands it may use, its queue bound."""

    weight: StrictFloat = Field(default=1.0, gt=0)
    # None: every band for a named tenant; priorities.default and the bands below it for the default tenant
    bands: tuple[StrictStr, ...] | None = Field(default=None, min_length=1)
    max_queued: StrictInt | None = Field(default=None, ge=1)  # None: queue.max_per_tenant


class TenantConfig(TenantPolicy):
    """A named tenant; a request carrying one of its `keys` (Authorization: Bearer) belongs to it."""

    name: StrictStr = Field(pattern=_TENANT_NAME)
    keys: tuple[SecretStr, ...] = ()  # resolved ("env:NAME" read at load) and masked in reprs

    @field_validator("name")
    @classmethod
    def _not_default(cls, name: str) -> str:
        if name == "default":
            raise ValueError("'default' is the tenant of requests without a key; choose another name")
        return name

    @field_validator("keys", mode="before")
    @classmethod
    def _resolve_keys(cls, value: object) -> object:
        # Raise _Problems only: pydantic's own errors would echo the key.
        if not isinstance(value, list | tuple):
            raise _Problems([((), "must be a list of API keys")])
        problems: list[tuple[Key, str]] = []
        keys: list[str] = []
        for i, item in enumerate(value):
            key, problem = _resolve_key(item)
            if problem is None and key in keys:
                problem = f"same key as keys[{keys.index(key)}]"
            if problem is not None:
                problems.append(((i,), problem))
            keys.append(key)
        _raise_if(problems)
        return tuple(SecretStr(key) for key in keys)


class TenantsConfig(ConfigSection):
    require_key: StrictBool = False
    trust_header: StrictBool = False
    default: TenantPolicy = Field(default_factory=TenantPolicy)
    list: tuple[TenantConfig, ...] = ()

    @model_validator(mode="after")
    def _check_tenants(self) -> TenantsConfig:
        problems: list[tuple[Key, str]] = []
        if self.require_key and self.trust_header:
            problems.append((("trust_header",), "has no effect when require_key is true; set one of them"))
        if self.require_key and not self.list:
            problems.append((("require_key",), "no tenant is listed, so every request would get 401"))
        names: dict[str, int] = {}
        key_at: dict[str, tuple[int, int]] = {}
        for i, tenant in enumerate(self.list):
            if tenant.name in names:
                problem = f"duplicate tenant name {tenant.name!r} (also list[{names[tenant.name]}])"
                problems.append((("list", i, "name"), problem))
            names.setdefault(tenant.name, i)
            if not tenant.keys and not self.trust_header:
                problems.append((
                    ("list", i, "keys"),
                    "must list at least one key: with trust_header false no request could reach this tenant",
                ))
            for k, secret in enumerate(tenant.keys):
                key = secret.get_secret_value()
                if key in key_at and key_at[key][0] != i:
                    j, m = key_at[key]
                    problems.append((("list", i, "keys", k), f"same key as list[{j}].keys[{m}]"))
                key_at.setdefault(key, (i, k))
        _raise_if(problems)
        return self

    def by_key(self) -> dict[str, TenantConfig]:
        """API key (resolved, unmasked) → its tenant; build it once per loaded config."""
        return {secret.get_secret_value(): tenant for tenant in self.list for secret in tenant.keys}


class QueueConfig(ConfigSection):
    max_size: StrictInt = Field(default=100, ge=1)
    max_per_tenant: StrictInt | None = Field(default=None, ge=1)  # None: max_size
    order: Literal["fair", "fifo"] = "fair"
    within_tenant: Literal["fifo", "shortest_first"] = "fifo"
    aging_s: StrictFloat = Field(default=30.0, gt=0)
    band_aging_s: StrictFloat = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> QueueConfig:
        problems: list[tuple[Key, str]] = []
        if self.max_per_tenant is not None and self.max_per_tenant > self.max_size:
            problems.append((("max_per_tenant",), f"must be <= max_size ({self.max_size})"))
        if self.order == "fifo" and self.within_tenant != "fifo":
            problems.append((
                ("within_tenant",), f"{self.within_tenant} needs order: fair (order: fifo is one FIFO for all)",
            ))
        _raise_if(problems)
        return self

    def tenant_bound(self, policy: TenantPolicy) -> int:
        """Most waiting jobs of one tenant: its max_queued, else max_per_tenant, else max_size."""
        if policy.max_queued is not None:
            return policy.max_queued
        return self.max_size if self.max_per_tenant is None else self.max_per_tenant


class RetriesConfig(ConfigSection):
    max_attempts: StrictInt = Field(default=2, ge=1, le=10)  # 1: never retry
    budget_ratio: StrictFloat = Field(default=0.2, ge=0, le=1)
    budget_min: StrictInt = Field(default=3, ge=0)


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
        _raise_if(problems)
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
        if value is None:
            return None
        token, problem = _resolve_key(value)  # never echoes the token
        if problem is not None:
            raise _Problems([((), problem)])
        return SecretStr(token)

    @model_validator(mode="after")
    def _anonymous_needs_no_token(self) -> AdminConfig:
        if self.allow_anonymous and self.token is not None:
            raise _Problems([(("allow_anonymous",), "has no effect when token is set; set one of them")])
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
            problem = callbacks.entry_problem(entry)
            if problem is not None:
                problems.append(((i,), f"{entry!r} {problem}"))
        _raise_if(problems)
        return allow

    @field_validator("secret", mode="before")
    @classmethod
    def _resolve_secret(cls, value: object) -> object:
        if value is None:
            return None
        secret, problem = _resolve_key(value)  # never echoes the secret
        if problem is not None:
            raise _Problems([((), problem)])
        return SecretStr(secret)

    @model_validator(mode="after")
    def _signed_when_allowed(self) -> CallbacksConfig:
        if self.allow and self.secret is None:
            raise _Problems([(("secret",), "must be set when allow lists receivers: without it they cannot "
                                           "verify that a callback comes from this sidecar")])
        return self

    def refusal(self, url: str) -> str | None:
        """Why `url` cannot be a callback URL (a clause following its name), or None when it can."""
        try:
            callbacks.allowed_target(self.allow, url)
        except callbacks.CallbackURLError as exc:
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


class ShutdownConfig(ConfigSection):
    drain_timeout_s: StrictFloat = Field(default=30.0, ge=0)


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


class SidecarConfig(ConfigSection):
    """The whole file. Every section is optional, so `{}` is a valid configuration."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    backends: BackendsConfig = Field(default_factory=BackendsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    classes: tuple[ClassConfig, ...] = _DEFAULT_CLASSES
    cost: CostConfig = Field(default_factory=CostConfig)
    deadlines: DeadlinesConfig = Field(default_factory=DeadlinesConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    priorities: PrioritiesConfig = Field(default_factory=PrioritiesConfig)
    tenants: TenantsConfig = Field(default_factory=TenantsConfig)
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, classes: tuple[ClassConfig, ...]) -> tuple[ClassConfig, ...]:
        problems = _ladder_problems([c.max_chars for c in classes], "class")
        names = [c.name for c in classes]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append(((i, "name"), f"duplicate class name {name!r} (also classes[{names.index(name)}])"))
        shares = sum(c.min_share for c in classes)
        if shares > 1 + 1e-9:
            problems.append(((len(classes) - 1, "min_share"),
                             f"the classes' min_share add up to {shares:g}; they must add up to at most 1"))
        _raise_if(problems)
        return classes

    @model_validator(mode="after")
    def _check_across_sections(self) -> SidecarConfig:
        _raise_if(self._address_problems() + self._tenant_problems() + self._class_problems()
                  + self._exposure_problems())
        return self

    def exposure_problems(self) -> list[str]:
        """Why this configuration would open the admin endpoints to other machines (`key.path:
        problem` lines), or []. Checked at load; a reload checks it again on the configuration it
        will run, whose `listen` is still the running one (a new `listen` needs a restart)."""
        return [f"{_key_path(key)}: {message}" for key, message in self._exposure_problems()]

    def _exposure_problems(self) -> list[tuple[Key, str]]:
        admin = self.admin
        if self.listen.loopback or admin.token is not None or admin.allow_anonymous:
            return []
        return [(("admin", "token"), (
            f"must be set when listen.host ({self.listen.host}) is not a loopback address, or anyone who "
            "reaches the port may drain the sidecar, restart backends and write prompts; set admin.token, "
            "bind listen.host to 127.0.0.1, or set admin.allow_anonymous: true to accept that"))]

    def _address_problems(self) -> list[tuple[Key, str]]:
        problems: list[tuple[Key, str]] = []
        listen, backends = self.listen, self.backends
        if listen.port and backends.managed_count and backends._in_managed_range(listen.port):
            problems.append((
                ("backends", "base_port"),
                f"backend ports {backends.base_port}..{backends.base_port + backends.managed_count - 1} "
                f"include listen.port {listen.port}",
            ))
        for spec in backends.layout():
            if not spec.managed and _is_own_address(spec.host, spec.port, listen):
                problems.append((
                    ("backends", "external", spec.index - backends.managed_count),
                    f"{spec.url} is the sidecar's own listen address",
                ))
        metrics = self.metrics.listen
        if metrics is not None and metrics.port:
            if metrics.port == listen.port:
                problems.append((("metrics", "listen", "port"), f"must differ from listen.port ({listen.port})"))
            elif backends.managed_count and backends._in_managed_range(metrics.port):
                problems.append((
                    ("metrics", "listen", "port"),
                    f"is in the backend ports {backends.base_port}..{backends.base_port + backends.managed_count - 1}",
                ))
        return problems

    def _tenant_problems(self) -> list[tuple[Key, str]]:
        problems: list[tuple[Key, str]] = []
        bands, max_size = self.priorities.bands, self.queue.max_size
        policies: list[tuple[Key, TenantPolicy]] = [(("tenants", "default"), self.tenants.default)]
        policies += [(("tenants", "list", i), tenant) for i, tenant in enumerate(self.tenants.list)]
        for key, policy in policies:
            for k, band in enumerate(policy.bands or ()):
                if band not in bands:
                    problems.append(((*key, "bands", k), f"{band!r} is not in priorities.bands ({', '.join(bands)})"))
            if policy.max_queued is not None and policy.max_queued > max_size:
                problems.append(((*key, "max_queued"), f"must be <= queue.max_size ({max_size})"))
        return problems

    def _class_problems(self) -> list[tuple[Key, str]]:
        bands = self.priorities.bands
        return [(("classes", i, "band"), f"{c.band!r} is not in priorities.bands ({', '.join(bands)})")
                for i, c in enumerate(self.classes) if c.band not in (None, HIGHEST_BAND, *bands)]

    def class_of(self, chars: int) -> ClassConfig:
        """The length class of a text of `chars` characters."""
        return next(c for c in self.classes if c.max_chars is None or chars <= c.max_chars)

    def check_paths(self, source: str = "<config>") -> None:
        """Check what lies outside the file (directories exist); raise ConfigError if not.

        `load_config`/`parse_config` call this unless told not to, so a validated config has
        been checked against this machine; pass `check_paths=False` to validate a file meant for
        another machine (e.g. the production example on a laptop).
        """
        problems: list[str] = []
        cwd = self.backends.cwd
        if cwd is not None and not cwd.is_dir():
            problems.append(f"backends.cwd: not an existing directory: {cwd}")
        problems += [f"prompts.allowed_dirs[{i}]: not an existing directory: {d}"
                     for i, d in enumerate(self.prompts.allowed_dirs) if not d.is_dir()]
        if problems:
            raise ConfigError(source, problems)


# -- loading ------------------------------------------------------------------------------------

_SOURCE_TREE_DEFAULT = Path(__file__).resolve().parent.parent / "config" / "sidecar.yaml"


def default_config_path() -> Path:
    """`config/sidecar.yaml` in a source checkout, else the packaged `scheduler/default_config.yaml`."""
    if _SOURCE_TREE_DEFAULT.is_file():
        return _SOURCE_TREE_DEFAULT
    return Path(str(importlib.resources.files("scheduler") / "default_config.yaml"))


def default_config_text() -> str:
    """The default config file, comments included (for `--print-default-config`)."""
    return default_config_path().read_text(encoding="utf-8")


def load_config(path: str | os.PathLike[str] | None = None, *, check_paths: bool = True) -> SidecarConfig:
    """Read, validate and freeze a config file (None: the default). Raises ConfigError.

    Relative paths inside the file (`backends.cwd`) are taken from the file's directory.
    """
    file = default_config_path() if path is None else Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(file), [f"cannot read the file: {exc}"]) from None
    return parse_config(text, str(file), base_dir=file.resolve().parent, check_paths=check_paths)


def parse_config(
    text: str,
    source: str = "<string>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
    check_paths: bool = True,
) -> SidecarConfig:
    """Validate YAML text; `source` names it in errors; relative paths start at `base_dir` (default: cwd)."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(source, [_yaml_problem(source, exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"YAML error: {exc}"]) from None
    if data is None:  # an empty file: all defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"top level must be a mapping of sections, got {_type_name(data)}"])
    context = {"base_dir": Path(base_dir) if base_dir is not None else Path.cwd()}
    try:
        config = SidecarConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, _problem_lines(exc)) from None
    if check_paths:
        config.check_paths(source)
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(source: str, exc: yaml.MarkedYAMLError) -> str:
    mark, context_mark = exc.problem_mark, exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}: " if mark else f"{source}: "
    message = f"{where}YAML syntax error: {exc.problem or exc.context}"
    if exc.context and exc.problem:
        started = ""
        if context_mark:
            started = f" started at line {context_mark.line + 1}, column {context_mark.column + 1}"
        message += f" ({exc.context}{started})"
    return message


def _problem_lines(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _Problems):
            lines.extend(f"{_key_path(loc + key)}: {message}" for key, message in cause.problems)
        elif error["type"] == "extra_forbidden":
            lines.append(f"{_key_path(loc)}: {_unknown_key_message(loc)}")
        else:
            message = str(cause) if isinstance(cause, ValueError) else _lower_first(error["msg"])
            # Values under `tenants` may be API keys: never echo them.
            if not isinstance(error["input"], dict) and loc[:1] != ("tenants",):
                message += f" (got {_short_repr(error['input'])})"
            lines.append(f"{_key_path(loc)}: {message}")
    return lines


def _key_path(loc: Key) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            path += f".{part}" if path else part
        else:
            path += f"[{part!r}]"
    return path or "(top level)"


def _unknown_key_message(loc: Key) -> str:
    known = _known_keys(loc[:-1])
    if not known:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}known: {', '.join(known)})"


def _known_keys(section: Key) -> list[str]:
    node: object = SidecarConfig
    for part in section:
        if isinstance(part, int):  # an item of a `tuple[Model, ...]` field
            args = typing.get_args(node) if typing.get_origin(node) is tuple else ()
            node = args[0] if args else None
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        else:
            return []
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


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


def _ladder_problems(bounds: Sequence[int | None], item: str) -> list[tuple[Key, str]]:
    """Problems of `max_chars` bounds that must ascend and end with the one null (no upper bound)."""
    if not bounds:
        return [((), f"must list at least one {item}")]
    problems: list[tuple[Key, str]] = []
    last = len(bounds) - 1
    for i, bound in enumerate(bounds):
        if bound is None and i != last:
            problems.append(((i, "max_chars"), f"only the last {item} may have max_chars: null (no upper bound)"))
        elif bound is not None and i == last:
            problems.append(((i, "max_chars"), f"the last {item} must have max_chars: null, so every length has one"))
        if i and bound is not None and (previous := bounds[i - 1]) is not None and bound <= previous:
            problems.append(((i, "max_chars"), f"must be greater than the previous {item}'s max_chars ({previous})"))
    return problems


def _resolve_key(item: object) -> tuple[str, str | None]:
    """(the API key, None) or (whatever, why it is unusable); the message never contains the key."""
    if not isinstance(item, str):
        return "", "must be a string"
    key, source = item, "must"
    if item.startswith(_ENV_PREFIX):
        name = item[len(_ENV_PREFIX):]
        if not _ENV_NAME.fullmatch(name):
            return "", f"{name!r} after {_ENV_PREFIX} is not a valid environment variable name"
        if name not in os.environ:
            return "", f"environment variable {name} is not set"
        key, source = os.environ[name], f"environment variable {name} must"
    if len(key) < MIN_KEY_CHARS:
        return key, f"{source} hold at least {MIN_KEY_CHARS} characters"
    if not _KEY_CHARS.fullmatch(key):
        return key, f"{source} hold printable ASCII only, without spaces"
    return key, None


def _placeholder_names(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _parse_backend_url(url: str) -> tuple[str, str, int]:
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


def _is_own_address(host: str, port: int, listen: ListenConfig) -> bool:
    if port != listen.port:
        return False
    return host == listen.host or (listen.host in _WILDCARD_HOSTS and host in _LOOPBACK_HOSTS)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _int_to_str(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _lower_first(message: str) -> str:
    return message[:1].lower() + message[1:] if message[1:2].islower() else message


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else type(value).__name__
