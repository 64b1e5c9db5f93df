"""The sidecar process: config, the pure scheduling core, the aiohttp proxy, metrics, CLI."""

from glmtts import __version__

__all__ = ["__version__"]
