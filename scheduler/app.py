"""Assemble the sidecar: the aiohttp application, its routes, and the lifetime of what it owns.

Shutdown order (aiohttp's, on SIGTERM/SIGINT): stop listening; let in-flight requests -- queued
ones included -- finish, up to ``shutdown.drain_timeout_s``; cancel what is left; then this
module's cleanup context: wait for orphaned backend work, stop the backends (TERM, then KILL
after ``backends.stop_grace_s``), close the backend client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from backend.client import BackendClient
from backend.pool import BackendPool
from scheduler.admin import Admin, fetch_prompt_indexes
from scheduler.build import build_scheduler, build_tenants
from scheduler.config import SidecarConfig
from scheduler.control import Control
from scheduler.dispatcher import Dispatcher
from scheduler.prompts import PromptCatalogue
from scheduler.proxy import Proxy

log = logging.getLogger("glmtts_sidecar")

PROXY = web.AppKey("proxy", Proxy)
ORPHAN_WAIT_S = 5.0  # at exit, how long to wait for backend work whose client already left


def build_app(config: SidecarConfig, *, python: str = sys.executable, config_path: str | None = None,
              install_signals: bool = False) -> web.Application:
    """``config_path``: the file reloads re-read (None: the default). ``install_signals``: take
    SIGTERM/SIGINT (drain, then stop) and SIGHUP (reload) -- what the CLI does."""
    client = BackendClient()
    refreshes: set[asyncio.Task[None]] = set()

    def on_backend_change() -> None:
        dispatcher.pump()
        if proxy.prompts.indexes is None and proxy.ready_backends() and not refreshes:
            task = asyncio.ensure_future(proxy.prompts.refresh())
            refreshes.add(task)
            task.add_done_callback(refreshes.discard)

    pool = BackendPool(config.backends, python=python, on_change=on_backend_change,
                       log_output=config.logging.backend_output)
    catalogue = PromptCatalogue(lambda: fetch_prompt_indexes(proxy))
    dispatcher = Dispatcher(build_scheduler(config), lambda: pool.backends, slots=config.backends.slots)
    proxy = Proxy(config, pool, client, catalogue, dispatcher, build_tenants(config))
    control = Control(proxy, pool, config_path=config_path)
    admin = Admin(proxy, control)

    app = web.Application(client_max_size=config.limits.max_body_bytes, middlewares=[proxy.middleware])
    app[PROXY] = proxy
    routes = app.router
    routes.add_post("/api/v1/tts", proxy.tts)
    routes.add_get("/api/v1/prompts", admin.forward_read, allow_head=False)
    routes.add_get("/api/v1/prompts/{index}", admin.forward_read, allow_head=False)
    routes.add_post("/api/v1/prompts", admin.fan_out)
    routes.add_put("/api/v1/prompts/{index}", admin.fan_out)
    routes.add_delete("/api/v1/prompts/{index}", admin.fan_out)
    routes.add_post("/api/v1/clear_cache", admin.fan_out)
    routes.add_get("/api/v1/health", admin.health, allow_head=False)
    routes.add_get("/api/v1/stats/concurrency", admin.concurrency, allow_head=False)
    routes.add_get("/api/v1/queue", admin.queue_status, allow_head=False)
    routes.add_get("/openapi.json", admin.forward_read, allow_head=False)
    routes.add_get("/docs", admin.forward_read, allow_head=False)
    routes.add_get("/healthz", admin.healthz)
    routes.add_get("/readyz", admin.readyz)
    routes.add_post("/admin/reload", admin.reload)
    routes.add_post("/admin/drain", admin.drain)
    routes.add_post("/admin/backends/{backend_id}/restart", admin.restart_backend)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await client.start()
        await pool.start()
        if install_signals:
            control.install_signals()
        log.info("sidecar up: %d backend(s), slots %d, queue %s bounded at %d, deadlines %s",
                 len(pool.backends), config.backends.slots, config.queue.order, config.queue.max_size,
                 config.deadlines.policy)
        try:
            yield
        finally:
            await control.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proxy.close(), ORPHAN_WAIT_S)
            for task in list(refreshes):
                task.cancel()
            await pool.stop()
            await client.close()
            log.info("sidecar stopped")

    app.cleanup_ctx.append(lifetime)
    return app
