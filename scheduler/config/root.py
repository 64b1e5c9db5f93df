"""SidecarConfig: the whole file, its sections, and the checks that need more than one of them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from backend.settings.base import ConfigError, ConfigSection, Key, key_path, raise_if
from scheduler.config.backends import BackendsConfig
from scheduler.config.base import ladder_problems
from scheduler.config.cache import CACHE_SUBDIR, CacheConfig
from scheduler.config.fanout import FanoutConfig
from scheduler.config.openai import OpenAIConfig
from scheduler.config.scheduling import (
    DEFAULT_CLASSES,
    HIGHEST_BAND,
    ClassConfig,
    CostConfig,
    DeadlinesConfig,
    LimitsConfig,
    PrioritiesConfig,
    QueueConfig,
    RetriesConfig,
)
from scheduler.config.service import (
    AdminConfig,
    ListenConfig,
    LoggingConfig,
    MetricsConfig,
    PromptsConfig,
    ShutdownConfig,
)
from scheduler.config.tasks import TasksConfig
from scheduler.config.tenants import TenantPolicy, TenantsConfig

__all__ = ["SidecarConfig"]

_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class SidecarConfig(ConfigSection):
    """The whole file. Every section is optional, so `{}` is a valid configuration."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    backends: BackendsConfig = Field(default_factory=BackendsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    classes: tuple[ClassConfig, ...] = DEFAULT_CLASSES
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
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    fanout: FanoutConfig = Field(default_factory=FanoutConfig)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, classes: tuple[ClassConfig, ...]) -> tuple[ClassConfig, ...]:
        problems = ladder_problems([c.max_chars for c in classes], "class")
        names = [c.name for c in classes]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append(((i, "name"), f"duplicate class name {name!r} (also classes[{names.index(name)}])"))
        shares = sum(c.min_share for c in classes)
        if shares > 1 + 1e-9:
            problems.append(((len(classes) - 1, "min_share"),
                             f"the classes' min_share add up to {shares:g}; they must add up to at most 1"))
        raise_if(problems)
        return classes

    @model_validator(mode="after")
    def _check_across_sections(self) -> SidecarConfig:
        raise_if(self._address_problems() + self._tenant_problems() + self._class_problems()
                 + self._exposure_problems() + self._cache_problems())
        return self

    def _cache_problems(self) -> list[tuple[Key, str]]:
        """The cache's disk copy lives in the task store's directory (``tasks.directory()``: its
        ``state_dir``, else $STATE_DIRECTORY, else ./glmtts-sidecar-state), which only a sidecar
        with tasks enabled owns."""
        if self.cache.disk and not self.tasks.enabled:
            return [(("cache", "disk"), "needs tasks.enabled: true (the disk copy is kept under tasks.state_dir, "
                                        "in its cache/ directory); set cache.disk: false or enable tasks")]
        return []

    def cache_directory(self) -> Path:
        """Where ``cache.disk`` keeps its files."""
        return self.tasks.directory() / CACHE_SUBDIR

    def exposure_problems(self) -> list[str]:
        """Why this configuration would open the admin endpoints to other machines (`key.path:
        problem` lines), or []. Checked at load; a reload checks it again on the configuration it
        will run, whose `listen` is still the running one (a new `listen` needs a restart)."""
        return [f"{key_path(key)}: {message}" for key, message in self._exposure_problems()]

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
        if listen.port and backends.managed_count and backends.in_managed_range(listen.port):
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
            elif backends.managed_count and backends.in_managed_range(metrics.port):
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


def _is_own_address(host: str, port: int, listen: ListenConfig) -> bool:
    if port != listen.port:
        return False
    return host == listen.host or (listen.host in _WILDCARD_HOSTS and host in _LOOPBACK_HOSTS)
