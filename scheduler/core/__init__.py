"""The pure scheduling core: queueing, cost, deadlines, admission and the scheduler itself.

Nothing here does I/O or imports asyncio or aiohttp; time is always passed in."""
