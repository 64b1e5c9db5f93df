"""Assemble the sidecar: the aiohttp application, its routes, and the lifetime of what it owns.

Shutdown order (aiohttp's, on SIGTERM/SIGINT): stop listening; let in-flight requests -- queued
ones included -- finish, up to ``shutdown.drain_timeout_s``; cancel what is left; then this
module's cleanup contexts, the reverse of their start: cancel the controls' background work (a
reload, a topology change), close the task service (unfinished tasks stay stored), close the
connection to Redis, cancel the result cache's syntheses in flight, wait for orphaned backend
work, stop the backends (TERM, then KILL after ``backends.stop_grace_s``), close the backend
client, stop the watchdog pings and the loop-lag probe. A start that fails cleans up only what
had started before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable

from aiohttp import web, web_response

from backend.pool import BackendPool
from backend.transport import AiohttpTransport, Transport
from glmtts.loop import wait_for
from scheduler.config import SidecarConfig
from scheduler.http.admin import Admin
from scheduler.http.middleware import make_middleware
from scheduler.http.openai import OpenAIHandler
from scheduler.http.tasks import TaskHandlers
from scheduler.http.tts import TTSHandler
from scheduler.runtime.build import build_scheduler, build_tenants
from scheduler.runtime.cache_disk import DiskCopy
from scheduler.runtime.context import Runtime
from scheduler.runtime.control import Control
from scheduler.runtime.dispatcher import Dispatcher
from scheduler.runtime.exchange import Exchange
from scheduler.runtime.looplag import LoopLagCollector, LoopLagProbe
from scheduler.runtime.metrics import PREFIX, Metrics, Sources
from scheduler.runtime.prompts import PromptCatalogue, fetch_prompts
from scheduler.runtime.redislink import RedisLink
from scheduler.runtime.sdnotify import ServiceStatus, watchdog_loop
from scheduler.runtime.tasks import TaskService

log = logging.getLogger("glmtts_sidecar")

RUNTIME = web.AppKey("runtime", Runtime)
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
              install_signals: bool = False, systemd: ServiceStatus | None = None,
              stop: Callable[[], None] | None = None, transport: Transport | None = None) -> web.Application:
    """``config_path``: the file reloads re-read (None: the default). ``install_signals``: take
    SIGTERM/SIGINT (drain, then stop) and SIGHUP (reload) -- what the CLI does. ``stop``: what a
    finished drain calls (default: leave web.run_app's loop, which then runs the cleanup).
    ``transport``: how every request reaches a backend, the app's to start and close (default:
    aiohttp over the network; backend.fake's FakeTransport keeps a test in memory)."""
    announce_as_upstream()
    client: Transport = transport if transport is not None else AiohttpTransport()
    systemd = systemd or ServiceStatus()  # no-op unless the CLI found $NOTIFY_SOCKET
    refreshes: set[asyncio.Task[None]] = set()

    def on_backend_change() -> None:
        dispatcher.pump()
        systemd.backends(len(runtime.ready_backends()), len(pool.backends))
        if runtime.prompts.indexes is None and runtime.ready_backends() and not refreshes:
            task = asyncio.ensure_future(runtime.prompts.refresh())
            refreshes.add(task)
            task.add_done_callback(refreshes.discard)

    pool = BackendPool(config.backends, python=python, on_change=on_backend_change,
                       log_output=config.logging.backend_output, transport=client)
    catalogue = PromptCatalogue(lambda: fetch_prompts(pool.backends, client))
    dispatcher = Dispatcher(build_scheduler(config), lambda: pool.backends, slots=config.backends.slot_policy())
    metrics = Metrics()
    tenants = build_tenants(config)
    runtime = Runtime(config, pool, client, catalogue, dispatcher, tenants, metrics=metrics)
    exchange = Exchange(runtime)
    # With tasks.store a Redis URL: one connection for the cluster's tasks (and its tenant rates).
    runtime.redis = RedisLink.from_config(config.tasks) if config.tasks.enabled else None
    tasks = TaskService(runtime, exchange, config.tasks, redis=runtime.redis) if config.tasks.enabled else None
    control = Control(runtime, pool, config_path=config_path, stop=stop, systemd=systemd, tasks=tasks)
    metrics.watch(Sources(scheduler=lambda: dispatcher.scheduler, bands=lambda: runtime.tenants.band_names,
                          backends=lambda: pool.backends, draining=lambda: runtime.draining,
                          reloads=lambda: (control.reloads, control.reload_failures), clock=dispatcher.clock,
                          slots=dispatcher.slot_states))
    metrics.prepare([c.name for c in config.classes], tenants.names)
    metrics.watch_cache(lambda: (runtime.cache.bytes, runtime.cache.entries))
    lag = LoopLagProbe()
    metrics.registry.register(LoopLagCollector(lag, PREFIX))
    task_routes = TaskHandlers(runtime, tasks) if tasks is not None else None
    tts = TTSHandler(runtime, exchange, submit_task=task_routes.submit if task_routes is not None else None)
    admin = Admin(runtime, control)

    middleware = make_middleware(lambda: runtime.config.limits.max_body_bytes)
    app = web.Application(client_max_size=config.limits.max_body_bytes, middlewares=[middleware])
    app[RUNTIME] = runtime
    app[SYSTEMD] = systemd
    app[METRICS] = metrics
    routes = app.router
    routes.add_post("/api/v1/tts", tts.tts)
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
    if task_routes is not None:
        routes.add_post("/api/v1/tasks", task_routes.submit)
        routes.add_get("/api/v1/tasks/{task_id}", task_routes.status, allow_head=False)
        routes.add_get("/api/v1/tasks/{task_id}/audio", task_routes.audio)
        routes.add_delete("/api/v1/tasks/{task_id}", task_routes.cancel)
    if config.metrics.listen is None:
        routes.add_get("/metrics", metrics.handler())
    else:  # on its own address only, with the details; started before the backends, so a taken port fails early
        app.cleanup_ctx.append(metrics.separate_site(
            config.metrics.listen.host, config.metrics.listen.port,
            {"/api/v1/health": admin.health_details, "/api/v1/queue": admin.queue_details}))
    if config.openai.enabled:  # OpenAI's speech API; its voices and models are read at use
        speech = OpenAIHandler(runtime, exchange)
        routes.add_post("/v1/audio/speech", speech.speech)
        routes.add_get("/v1/audio/voices", speech.voices, allow_head=False)
        routes.add_get("/v1/models", speech.models, allow_head=False)
    routes.add_post("/admin/reload", admin.reload)
    routes.add_post("/admin/drain", admin.drain)
    routes.add_post("/admin/backends/{backend_id}/restart", admin.restart_backend)

    # One cleanup context per resource, in start order; aiohttp cleans up in reverse, and only what
    # started. Watchdog pings go on until the backends are stopped; orphaned work is awaited once
    # the tasks' runners are gone and before the backends are stopped.
    async def loop_lag(app: web.Application) -> AsyncIterator[None]:
        lag.start()
        yield
        await lag.stop()
        log.info("sidecar stopped")

    async def watchdog(app: web.Application) -> AsyncIterator[None]:
        notifier = systemd.notifier
        # Ping while the event loop runs, from now until the backends are stopped (sdnotify.watchdog_loop).
        pinging = (asyncio.ensure_future(watchdog_loop(notifier, notifier.watchdog_s / 2, lambda: True))
                   if notifier.watchdog_s else None)
        yield
        if pinging is not None:
            pinging.cancel()

    async def backend_client(app: web.Application) -> AsyncIterator[None]:
        await client.start()
        yield
        await client.close()

    async def backend_pool(app: web.Application) -> AsyncIterator[None]:
        try:
            await pool.start()
        except BaseException:
            await pool.stop()  # what a start that failed half way spawned
            raise
        yield
        for task in list(refreshes):
            task.cancel()
        await pool.stop()

    async def orphan_wait(app: web.Application) -> AsyncIterator[None]:
        yield
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(exchange.close(), ORPHAN_WAIT_S)

    async def result_cache(app: web.Application) -> AsyncIterator[None]:
        yield
        await runtime.cache.close()  # syntheses still in flight: cancelled, their slots given back

    async def cache_disk(app: web.Application) -> AsyncIterator[None]:
        if not config.cache.disk:
            yield
            return
        disk = DiskCopy(config.cache_directory())
        bounds = runtime.config.cache
        loaded = await disk.load(max_bytes=bounds.max_bytes if bounds.enabled else 0, ttl_s=bounds.ttl_s)
        runtime.cache.keep_copy(disk, [(e.key, e.answer, e.index, e.age_s) for e in loaded])
        yield
        runtime.cache.keep_copy(None)
        await disk.close()  # what was asked is written or deleted before the sidecar stops

    async def redis_link(app: web.Application) -> AsyncIterator[None]:
        link = runtime.redis
        if link is None:
            yield
            return
        await link.open()  # a Redis that is down now is reconnected to in the background
        yield
        await link.close()

    async def task_service(app: web.Application) -> AsyncIterator[None]:
        if tasks is None:
            yield
            return
        await tasks.start()  # re-queues what a previous run left unfinished
        yield
        await tasks.close()  # unfinished tasks stay in the store for the next start

    async def controls(app: web.Application) -> AsyncIterator[None]:
        if install_signals:
            control.install_signals()
        log.info("sidecar up: %d backend(s), slots %s, queue %s bounded at %d, deadlines %s",
                 len(pool.backends), _describe_slots(config), config.queue.order, config.queue.max_size,
                 config.deadlines.policy)
        systemd.backends(len(runtime.ready_backends()), len(pool.backends))
        yield
        await control.close()

    app.cleanup_ctx.extend([loop_lag, watchdog, backend_client, backend_pool, orphan_wait, cache_disk, result_cache,
                             redis_link, task_service, controls])
    return app


def _describe_slots(config: SidecarConfig) -> str:
    policy = config.backends.slot_policy()
    if policy.fixed is not None:
        return str(policy.fixed)
    return f"auto (1..{policy.adaptive.max_slots}, learned per backend)"
