"""Where the default configuration file is: `config/sidecar.yaml` in a source checkout, else the copy
packaged beside this module (`scheduler/default_config.yaml`)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["default_config_path", "default_config_text"]

_SOURCE_TREE_DEFAULT = Path(__file__).resolve().parent.parent / "config" / "sidecar.yaml"


def default_config_path() -> Path:
    """`config/sidecar.yaml` in a source checkout, else the packaged `scheduler/default_config.yaml`."""
    if _SOURCE_TREE_DEFAULT.is_file():
        return _SOURCE_TREE_DEFAULT
    return Path(str(importlib.resources.files("scheduler") / "default_config.yaml"))


def default_config_text() -> str:
    """The default config file, comments included (for `--print-default-config`)."""
    return default_config_path().read_text(encoding="utf-8")
