"""Operating the running sidecar: drain, live reload, backend restarts, and the signals for them.

- **Drain** (SIGTERM, SIGINT, ``POST /admin/drain``): stop admitting (new TTS requests get 503
  ``draining`` with Retry-After, readiness turns false), let queued and running work finish up to
  ``shutdown.drain_timeout_s``, then stop: the app's cleanup stops the backends.
- **Reload** (SIGHUP, ``POST /admin/reload``): re-read and validate the file; a bad one keeps the
  running configuration and says why. Policies (classes, cost, deadlines, queue, priorities,
  tenants, retries, limits, admin) apply at once, to queued work too, without losing any of it;
  a new backend topology is applied by the pool, one backend at a time, in the background.
  ``listen``, ``logging`` and ``metrics`` need a restart.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from backend.pool import BackendPool
from scheduler.config import ConfigError, SidecarConfig, load_config
from scheduler.http.proxy import Proxy
from scheduler.runtime.build import build_scheduler, build_tenants
from scheduler.runtime.sdnotify import ServiceStatus

log = logging.getLogger("glmtts_sidecar.control")


@dataclass
class ReloadResult:
    ok: bool
    changed: list[str] = field(default_factory=list)  # top-level sections that changed
    ignored: list[str] = field(default_factory=list)  # changed sections that need a restart
    problems: list[str] = field(default_factory=list)  # why the file was refused


class Control:
    def __init__(self, proxy: Proxy, pool: BackendPool, *, config_path: str | None,
                 stop: Callable[[], None] | None = None, systemd: ServiceStatus | None = None) -> None:
        self.proxy = proxy
        self.pool = pool
        self.config_path = config_path
        self.draining = False
        self.reloads = 0
        self.reload_failures = 0
        self._stop = stop or _graceful_exit
        self.systemd = systemd or ServiceStatus()
        self._drain_task: asyncio.Task[None] | None = None
        self._topology: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[object]] = set()

    # --- drain --------------------------------------------------------------------------------

    def drain(self, why: str) -> None:
        """Stop admitting; stop the process once queued and running work is done (or the timeout)."""
        if self._drain_task is not None:
            return
        self.systemd.stopping()
        self.draining = True
        self.proxy.draining = True
        log.warning("draining (%s): no new requests; finishing %d queued and %d running", why,
                    len(self.proxy.scheduler.queue), len(self.proxy.scheduler.running))
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        timeout = self.proxy.config.shutdown.drain_timeout_s
        # A job leaves `running` once its backend finished with it (its answer began, or the backend
        # stopped working on it). Answers still streaming to clients after that are aiohttp's to
        # wait for: at stop it lets running handlers finish before the backends are stopped.
        if not await self.proxy.dispatcher.wait_idle(timeout):
            left = len(self.proxy.scheduler.queue) + len(self.proxy.scheduler.running)
            log.error("drain timeout (%g s) with %d request(s) unfinished; stopping anyway", timeout, left)
        else:
            log.info("drained; stopping")
        self._stop()

    # --- reload -------------------------------------------------------------------------------

    async def reload(self, why: str) -> ReloadResult:
        self.systemd.reloading()
        ok = False
        try:
            async with self._reload_lock:
                result = self._reload()
            ok = result.ok
        finally:
            self.systemd.reloaded(ok)  # systemd waits for READY=1 after RELOADING=1, whatever happened
        if result.ok:
            self.reloads += 1
            log.info("configuration reloaded (%s): changed %s%s", why, ", ".join(result.changed) or "nothing",
                     f"; needs a restart: {', '.join(result.ignored)}" if result.ignored else "")
        else:
            self.reload_failures += 1
            log.error("configuration reload (%s) refused; keeping the running one:\n  %s", why,
                      "\n  ".join(result.problems))
        return result

    def _reload(self) -> ReloadResult:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            return ReloadResult(ok=False, problems=list(exc.problems) or [str(exc)])
        old = self.proxy.config
        changed = [name for name in type(new).model_fields if getattr(new, name) != getattr(old, name)]
        ignored: list[str] = [name for name in ("listen", "logging", "metrics") if name in changed]
        effective = new.model_copy(update={name: getattr(old, name) for name in ignored})
        if problems := effective.exposure_problems():  # e.g. the token removed, the public listener kept
            return ReloadResult(ok=False, problems=problems)
        self._apply(old, effective, changed)
        return ReloadResult(ok=True, changed=changed, ignored=ignored)

    def _apply(self, old: SidecarConfig, new: SidecarConfig, changed: list[str]) -> None:
        proxy = self.proxy
        keep_cost = proxy.scheduler.cost if "cost" not in changed else None
        scheduler = build_scheduler(new, cost=keep_cost)
        scheduler.adopt(proxy.scheduler)
        proxy.reconfigure(new, scheduler, build_tenants(new))
        if "backends" in changed:
            if self._topology is not None and not self._topology.done():
                self._topology.cancel()
            self._topology = asyncio.ensure_future(
                self.pool.apply(new.backends, drain_timeout_s=new.shutdown.drain_timeout_s))
            self._topology.add_done_callback(_log_failure("applying the backend topology"))

    # --- backends -----------------------------------------------------------------------------

    def restart_backend(self, backend_id: str) -> None:
        """Graceful restart in the background (drain, stop, start, warm up); KeyError if unknown."""
        if self.pool.get(backend_id) is None:
            raise KeyError(backend_id)
        task: asyncio.Task[object] = asyncio.ensure_future(self.pool.restart_backend(
            backend_id, drain_timeout_s=self.proxy.config.shutdown.drain_timeout_s))
        task.add_done_callback(_log_failure(f"restarting backend {backend_id}"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- signals ------------------------------------------------------------------------------

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.drain, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.drain, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(self.reload("SIGHUP"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in [self._topology, self._drain_task, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()


def _graceful_exit() -> None:
    """Leave web.run_app's loop the way its own signal handling does; it then runs the cleanup."""
    def raise_exit() -> None:
        raise web.GracefulExit()

    asyncio.get_running_loop().call_soon(raise_exit)


def _log_failure(what: str) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", what, exc_info=task.exception())

    return done
