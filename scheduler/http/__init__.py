"""The HTTP surface: the aiohttp application, its middleware and its handlers."""
