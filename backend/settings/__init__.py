"""The backend layer's configuration: the `backends` section and the base every section builds on.

scheduler.config assembles the whole file from these and its own sections; backend code imports
its settings from here, never from the scheduler above it.
"""

from backend.settings.backends import (
    PLACEHOLDERS,
    AdaptiveConfig,
    BackendsConfig,
    BackendSpec,
    CrashLoopConfig,
    HealthConfig,
    OutlierConfig,
    RestartConfig,
    WarmupConfig,
    WatchdogConfig,
    parse_backend_url,
    url_host,
)
from backend.settings.base import ENV_NAME, ConfigError, ConfigSection, Key, Problems, int_to_str, key_path, raise_if

__all__ = [
    "ENV_NAME",
    "PLACEHOLDERS",
    "AdaptiveConfig",
    "BackendSpec",
    "BackendsConfig",
    "ConfigError",
    "ConfigSection",
    "CrashLoopConfig",
    "HealthConfig",
    "Key",
    "OutlierConfig",
    "Problems",
    "RestartConfig",
    "WarmupConfig",
    "WatchdogConfig",
    "int_to_str",
    "key_path",
    "parse_backend_url",
    "raise_if",
    "url_host",
]
