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

from aiohttp import web, web_response

from backend.client import BackendClient
from backend.pool import BackendPool
from scheduler.config import SidecarConfig
from scheduler.http.admin import Admin, fetch_prompt_indexes
from scheduler.http.proxy import Proxy
from scheduler.runtime.build import build_scheduler, build_tenants
from scheduler.runtime.control import Control
from scheduler.runtime.dispatcher import Dispatcher
from scheduler.runtime.looplag import LoopLagCollector, LoopLagProbe
from scheduler.runtime.metrics import PREFIX, Metrics, Sources
from scheduler.runtime.prompts import PromptCatalogue
from scheduler.runtime.sdnotify import ServiceStatus, watchdog_loop
from scheduler.runtime.tasks import TaskService

log = logging.getLogger("glmtts_sidecar")

PROXY = web.AppKey("proxy", Proxy)
SYSTEMD = web.AppKey("systemd", ServiceStatus)
METRICS = web.AppKey("metrics", Metrics)
ORPHAN_WAIT_S = 5.0  # at exit, how long to wait for backend work whose client already left
SERVER = "uvicorn"  # the Server header upstream sends: ours must not name Python, aiohttp or versions


def announce_as_upstream() -> None:
    """Every answer of this process's HTTP servers says ``Server: uvicorn``.

    aiohttp fills in a missing Server header from this module global, on every answer it writes:
    the handlers' and the ones it makes itself (400 for bad framing, 500), which no middleware or
    ``on_response_prepare`` signal sees. Setting it is the one place that covers them all."""
    web_response.SERVER_SOFTWARE = SERVER  # type: ignore[attr-defined]  # imported there from aiohttp.http


def build_app(config: SidecarConfig, *, python: str = sys.executable, config_path: str | None = None,
              install_signals: bool = False, systemd: ServiceStatus | None = None) -> web.Application:
    """``config_path``: the file reloads re-read (None: the default). ``install_signals``: take
    SIGTERM/SIGINT (drain, then stop) and SIGHUP (reload) -- what the CLI does."""
    announce_as_upstream()
    client = BackendClient()
    systemd = systemd or ServiceStatus()  # no-op unless the CLI found $NOTIFY_SOCKET
    refreshes: set[asyncio.Task[None]] = set()

    def on_backend_change() -> None:
        dispatcher.pump()
        systemd.backends(len(proxy.ready_backends()), len(pool.backends))
        if proxy.prompts.indexes is None and proxy.ready_backends() and not refreshes:
            task = asyncio.ensure_future(proxy.prompts.refresh())
            refreshes.add(task)
            task.add_done_callback(refreshes.discard)

    pool = BackendPool(config.backends, python=python, on_change=on_backend_change,
                       log_output=config.logging.backend_output)
    catalogue = PromptCatalogue(lambda: fetch_prompt_indexes(proxy))
    dispatcher = Dispatcher(build_scheduler(config), lambda: pool.backends, slots=config.backends.slot_policy())
    metrics = Metrics()
    tenants = build_tenants(config)
    proxy = Proxy(config, pool, client, catalogue, dispatcher, tenants, metrics=metrics)
    control = Control(proxy, pool, config_path=config_path, systemd=systemd)
    metrics.watch(Sources(scheduler=lambda: dispatcher.scheduler, bands=lambda: proxy.tenants.band_names,
                          backends=lambda: pool.backends, draining=lambda: proxy.draining,
                          reloads=lambda: (control.reloads, control.reload_failures), clock=dispatcher.clock,
                          slots=dispatcher.slot_states))
    metrics.prepare([c.name for c in config.classes], tenants.names)
    lag = LoopLagProbe()
    metrics.registry.register(LoopLagCollector(lag, PREFIX))
    tasks = TaskService(proxy, config.tasks) if config.tasks.enabled else None
    proxy.tasks = tasks
    admin = Admin(proxy, control)

    app = web.Application(client_max_size=config.limits.max_body_bytes, middlewares=[proxy.middleware])
    app[PROXY] = proxy
    app[SYSTEMD] = systemd
    app[METRICS] = metrics
    routes = app.router
    routes.add_post("/api/v1/tts", proxy.tts)
    routes.add_get("/api/v1/prompts", admin.forward_read, allow_head=False)
    routes.add_get("/api/v1/prompts/{index}", admin.forward_read, allow_head=False)
    routes.add_post("/api/v1/prompts", admin.write_prompt)
    routes.add_put("/api/v1/prompts/{index}", admin.write_prompt)
    routes.add_delete("/api/v1/prompts/{index}", admin.fan_out)
    routes.add_post("/api/v1/clear_cache", admin.fan_out)
    routes.add_get("/api/v1/health", admin.health, allow_head=False)
    routes.add_get("/api/v1/stats/concurrency", admin.concurrency, allow_head=False)
    routes.add_get("/api/v1/queue", admin.queue_status, allow_head=False)
    routes.add_get("/openapi.json", admin.forward_read, allow_head=False)
    routes.add_get("/docs", admin.forward_read, allow_head=False)
    routes.add_get("/healthz", admin.healthz)
    routes.add_get("/readyz", admin.readyz)
    if tasks is not None:
        routes.add_post("/api/v1/tasks", tasks.submit)
        routes.add_get("/api/v1/tasks/{task_id}", tasks.status, allow_head=False)
        routes.add_get("/api/v1/tasks/{task_id}/audio", tasks.audio)
        routes.add_delete("/api/v1/tasks/{task_id}", tasks.cancel)
    if config.metrics.listen is None:
        routes.add_get("/metrics", metrics.handler())
    else:  # on its own address only, with the details; started before the backends, so a taken port fails early
        app.cleanup_ctx.append(metrics.separate_site(
            config.metrics.listen.host, config.metrics.listen.port,
            {"/api/v1/health": admin.health_details, "/api/v1/queue": admin.queue_details}))
    routes.add_post("/admin/reload", admin.reload)
    routes.add_post("/admin/drain", admin.drain)
    routes.add_post("/admin/backends/{backend_id}/restart", admin.restart_backend)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        lag.start()
        await client.start()
        await pool.start()
        if tasks is not None:
            await tasks.start()  # re-queues what a previous run left unfinished
        if install_signals:
            control.install_signals()
        log.info("sidecar up: %d backend(s), slots %s, queue %s bounded at %d, deadlines %s",
                 len(pool.backends), _describe_slots(config), config.queue.order, config.queue.max_size,
                 config.deadlines.policy)
        systemd.backends(len(proxy.ready_backends()), len(pool.backends))
        notifier = systemd.notifier
        # Ping while the event loop runs, from now until the backends are stopped (sdnotify.watchdog_loop).
        watchdog = (asyncio.ensure_future(watchdog_loop(notifier, notifier.watchdog_s / 2, lambda: True))
                    if notifier.watchdog_s else None)
        try:
            yield
        finally:
            await control.close()
            if tasks is not None:
                await tasks.close()  # unfinished tasks stay in the store for the next start
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proxy.close(), ORPHAN_WAIT_S)
            for task in list(refreshes):
                task.cancel()
            await pool.stop()
            await client.close()
            if watchdog is not None:
                watchdog.cancel()
            await lag.stop()
            log.info("sidecar stopped")

    app.cleanup_ctx.append(lifetime)
    return app


def _describe_slots(config: SidecarConfig) -> str:
    policy = config.backends.slot_policy()
    if policy.fixed is not None:
        return str(policy.fixed)
    return f"auto (1..{policy.adaptive.max_slots}, learned per backend)"
