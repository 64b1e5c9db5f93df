"""The sidecar's configuration: YAML in, validated and frozen pydantic models out.

Everything is checked once, at load (and again on reload): unknown keys, wrong types, impossible
values and cross-field conflicts become one `ConfigError` listing every problem as
`key.path: problem`. Nothing is re-read or re-validated at use.

The modules split it by concern: the base every section shares and the `backends` section live
in backend.settings (the backend layer reads them); here are the scheduling sections
(`scheduling`), `tenants`, `tasks` (with the pure callback URL rules, `callback_urls`), the
service's own (`service`), the whole file and its cross-section checks (`root`), and reading a
file (`loader`). A new section is one more `ConfigSection` subclass and one more field on
`SidecarConfig`.
"""

from backend.settings import (
    PLACEHOLDERS,
    AdaptiveConfig,
    BackendSpec,
    ConfigError,
    ConfigSection,
    CrashLoopConfig,
    HealthConfig,
    OutlierConfig,
    RestartConfig,
    WarmupConfig,
    WatchdogConfig,
)
from scheduler.config.backends import BackendsConfig
from scheduler.config.base import MIN_KEY_CHARS
from scheduler.config.cache import CacheConfig
from scheduler.config.fanout import FanoutConfig
from scheduler.config.loader import load_config, parse_config
from scheduler.config.openai import ModelConfig, OpenAIConfig, VoiceConfig
from scheduler.config.root import SidecarConfig
from scheduler.config.scheduling import (
    HIGHEST_BAND,
    ClassConfig,
    CostConfig,
    DeadlinesConfig,
    LearnedDeadlineConfig,
    LimitsConfig,
    PrioritiesConfig,
    QueueConfig,
    RetriesConfig,
    TierConfig,
)
from scheduler.config.service import (
    AdminConfig,
    ListenConfig,
    LoggingConfig,
    MetricsConfig,
    MetricsListenConfig,
    PromptsConfig,
    ShutdownConfig,
)
from scheduler.config.tasks import CallbacksConfig, TasksConfig
from scheduler.config.tenants import TenantConfig, TenantPolicy, TenantsConfig
from scheduler.default_config import default_config_path, default_config_text

__all__ = [
    "HIGHEST_BAND",
    "MIN_KEY_CHARS",
    "PLACEHOLDERS",
    "AdaptiveConfig",
    "AdminConfig",
    "BackendSpec",
    "BackendsConfig",
    "CacheConfig",
    "CallbacksConfig",
    "ClassConfig",
    "ConfigError",
    "ConfigSection",
    "CostConfig",
    "CrashLoopConfig",
    "DeadlinesConfig",
    "FanoutConfig",
    "HealthConfig",
    "LearnedDeadlineConfig",
    "LimitsConfig",
    "ListenConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MetricsListenConfig",
    "ModelConfig",
    "OpenAIConfig",
    "OutlierConfig",
    "PrioritiesConfig",
    "PromptsConfig",
    "QueueConfig",
    "RestartConfig",
    "RetriesConfig",
    "ShutdownConfig",
    "SidecarConfig",
    "TasksConfig",
    "TenantConfig",
    "TenantPolicy",
    "TenantsConfig",
    "TierConfig",
    "VoiceConfig",
    "WarmupConfig",
    "WatchdogConfig",
    "default_config_path",
    "default_config_text",
    "load_config",
    "parse_config",
]
