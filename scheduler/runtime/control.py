"""Operating the running sidecar: drain, live reload, backend restarts, and the signals for them.

- **Drain** (SIGTERM, SIGINT, ``POST /admin/drain``): stop admitting (new TTS requests get 503
  ``draining`` with Retry-After, readiness turns false), close the listening socket
  ``shutdown.unready_s`` later (new connections are refused, so a load balancer in front goes to
  another sidecar; open connections stay, their answers still stream), let queued and running
  work finish up to ``shutdown.drain_timeout_s``, then stop: the app's cleanup stops the backends.
- **Reload** (SIGHUP, ``POST /admin/reload``): re-read and validate the file; a bad one keeps the
  running configuration and says why. `RELOAD` says, for every section, whether a new value
  applies at once or needs a restart: a value the running sidecar read once, at start, is not
  applied halfway but kept, and the reload names it (``needs_restart``). Policies apply at once,
  to queued work too, without losing any of it; a new backend topology is applied by the pool,
  one backend at a time, in the background.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from aiohttp import web

from backend.pool import BackendPool
from scheduler.config import ConfigError, SidecarConfig, load_config
from scheduler.runtime.build import build_scheduler, build_tenants
from scheduler.runtime.context import Runtime
from scheduler.runtime.sdnotify import ServiceStatus
from scheduler.runtime.tasks import TaskService

log = logging.getLogger("glmtts_sidecar.control")

# How each running sidecar stops accepting connections. The CLI opens the listening socket and
# scheduler.http.app builds the Control: the Runtime is what both hold, so the CLI registers the
# closing here (`register_listener`) and the drain finds it. Keys are weak: a runtime that is gone
# takes its entry along.
_LISTENERS: WeakKeyDictionary[Runtime, Callable[[], Awaitable[None]]] = WeakKeyDictionary()


def register_listener(runtime: Runtime, close: Callable[[], Awaitable[None]]) -> None:
    """Say how the sidecar of ``runtime`` stops listening: ``close`` closes its listening sockets
    and its idle keep-alive connections; requests in progress go on and their connections close
    once answered. A drain calls it once, ``shutdown.unready_s`` after it starts, or sooner when
    nothing is left to do."""
    _LISTENERS[runtime] = close


@dataclass
class ReloadResult:
    ok: bool
    changed: list[str] = field(default_factory=list)  # top-level sections that changed
    # What changed but needs a restart: a section ("listen"), or one key of it ("tasks.state_dir").
    ignored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why the file was refused


class Control:
    """``tasks``: the task service whose settings a reload changes (None: tasks are disabled)."""

    def __init__(self, runtime: Runtime, pool: BackendPool, *, config_path: str | None,
                 stop: Callable[[], None] | None = None, systemd: ServiceStatus | None = None,
                 tasks: TaskService | None = None) -> None:
        self.runtime = runtime
        self.pool = pool
        self.tasks = tasks
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
        self.runtime.draining = True
        log.warning("draining (%s): no new requests; finishing %d queued and %d running", why,
                    len(self.runtime.scheduler.queue), len(self.runtime.scheduler.running))
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        shutdown = self.runtime.config.shutdown
        # A job leaves `running` once its backend finished with it (its answer began, or the backend
        # stopped working on it). Answers still streaming to clients after that are aiohttp's to
        # wait for: at stop it lets running handlers finish before the backends are stopped.
        idle = asyncio.ensure_future(self.runtime.dispatcher.wait_idle(shutdown.drain_timeout_s))
        # Until unready_s has passed a load balancer may not yet have seen /readyz fail: new
        # connections are still accepted (and answered 503 draining). Work done sooner ends the
        # wait: the stop closes the listener anyway.
        unready = asyncio.ensure_future(asyncio.sleep(shutdown.unready_s))
        try:
            await asyncio.wait((idle, unready), return_when=asyncio.FIRST_COMPLETED)
            await self._close_listener()
            drained = await idle
        finally:
            idle.cancel()
            unready.cancel()
        if not drained:
            left = len(self.runtime.scheduler.queue) + len(self.runtime.scheduler.running)
            log.error("drain timeout (%g s) with %d request(s) unfinished; stopping anyway",
                      shutdown.drain_timeout_s, left)
        else:
            log.info("drained; stopping")
        self._stop()

    async def _close_listener(self) -> None:
        """Stop accepting connections, once; without a registered listener (a sidecar not run by
        the CLI, as in-process tests run it) there is nothing to close."""
        close = _LISTENERS.pop(self.runtime, None)
        if close is None:
            return
        try:
            await close()
        except Exception:  # the drain goes on: the stop closes the listener too
            log.exception("closing the listener failed")
            return
        log.warning("listener closed: new connections are refused; finishing %d queued and %d running",
                    len(self.runtime.scheduler.queue), len(self.runtime.scheduler.running))

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
        old = self.runtime.config
        changed = [name for name in type(new).model_fields if getattr(new, name) != getattr(old, name)]
        effective, ignored = reloadable(old, new)
        if problems := effective.exposure_problems():  # e.g. the token removed, the public listener kept
            return ReloadResult(ok=False, problems=problems)
        self._apply(old, effective, [name for name in changed if getattr(effective, name) != getattr(old, name)])
        return ReloadResult(ok=True, changed=changed, ignored=ignored)

    def _apply(self, old: SidecarConfig, new: SidecarConfig, changed: list[str]) -> None:
        """Run on ``new``, the configuration `reloadable` made; ``changed``: the sections it changes."""
        runtime = self.runtime
        keep_cost = runtime.scheduler.cost if "cost" not in changed else None
        scheduler = build_scheduler(new, cost=keep_cost)
        scheduler.adopt(runtime.scheduler)
        runtime.reconfigure(new, scheduler, build_tenants(new))
        # Once each, in section order (classes and tenants share one).
        for then in dict.fromkeys(then for name in changed if (then := RELOAD[name].then) is not None):
            then(self, new)

    def _apply_topology(self, new: SidecarConfig) -> None:
        if self._topology is not None and not self._topology.done():
            self._topology.cancel()
        self._topology = asyncio.ensure_future(
            self.pool.apply(new.backends, drain_timeout_s=new.shutdown.drain_timeout_s))
        self._topology.add_done_callback(_log_failure("applying the backend topology"))

    def _apply_tasks(self, new: SidecarConfig) -> None:
        if self.tasks is not None:
            self.tasks.reconfigure(new.tasks)

    def _prepare_series(self, new: SidecarConfig) -> None:
        """The metric series of classes and tenants a reload added exist before their traffic, as at start."""
        self.runtime.metrics.prepare([c.name for c in new.classes], self.runtime.tenants.names)

    # --- backends -----------------------------------------------------------------------------

    def restart_backend(self, backend_id: str) -> None:
        """Graceful restart in the background (drain, stop, start, warm up); KeyError if unknown."""
        if self.pool.get(backend_id) is None:
            raise KeyError(backend_id)
        task: asyncio.Task[object] = asyncio.ensure_future(self.pool.restart_backend(
            backend_id, drain_timeout_s=self.runtime.config.shutdown.drain_timeout_s))
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


# --- what a reload applies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reloading:
    """How a new value of one top-level section reaches the running sidecar.

    Every section's new value is in ``Runtime.config`` after a reload, and the scheduler and the
    tenant directory are rebuilt from it, so whatever is read through them at use applies at
    once. ``then`` applies what a part of the sidecar holds on to (Control method). What was read
    once, at start, needs a restart: the whole section (``restart``) or some of its keys
    (``restart_keys``); the running value is kept for those, never half of a new one."""

    restart: bool = False
    restart_keys: tuple[str, ...] = ()
    then: Callable[[Control, SidecarConfig], None] | None = None


LIVE = Reloading()
RESTART = Reloading(restart=True)

RELOAD: Mapping[str, Reloading] = {
    "listen": RESTART,  # the listening socket, bound once (scheduler.cli)
    # The pool applies a new layout and the health, warm-up, restart, outlier and watchdog settings
    # (BackendPool.apply); slots go to the dispatcher; request_timeout_s and watchdog are read at use.
    "backends": Reloading(then=Control._apply_topology),
    # max_body_bytes is also the app's client_max_size (every request body aiohttp reads itself),
    # idle_timeout_s web.run_app's keep-alive: both fixed at start.
    "limits": Reloading(restart_keys=("max_body_bytes", "idle_timeout_s")),
    "classes": Reloading(then=Control._prepare_series),  # the rebuilt scheduler
    "cost": LIVE,  # new priors: a new cost model (an unchanged section keeps the learned one)
    "deadlines": LIVE,  # the rebuilt scheduler; client_header is read at use
    "queue": LIVE,  # the rebuilt scheduler adopts every queued job
    "priorities": LIVE,  # the rebuilt scheduler and tenant directory
    "tenants": Reloading(then=Control._prepare_series),  # the rebuilt tenant directory
    "retries": LIVE,  # the retry budget is re-set by Runtime.reconfigure; max_attempts is read at use
    # The task routes are added and the store opened at start; the rest is TaskService.reconfigure's.
    "tasks": Reloading(restart_keys=("enabled", "state_dir", "store", "redis"), then=Control._apply_tasks),
    "admin": LIVE,  # read at use
    "prompts": LIVE,  # read at use
    # drain_timeout_s is also the AppRunner's shutdown_timeout (its wait for handlers at stop), fixed at start.
    "shutdown": RESTART,
    "logging": RESTART,  # set up once by the CLI; backend_output is given to the pool at start
    "metrics": RESTART,  # its listener, or the /metrics route on the main one, is set up at start
    # The routes are added at start (enabled); voices and models are read at use.
    "openai": Reloading(restart_keys=("enabled",)),
    # Runtime.reconfigure re-bounds the cache (evicting down to a smaller max_bytes, emptying it when
    # disabled); enabled, shared and ttl_s are read at use. The disk copy is opened and read at start.
    "cache": Reloading(restart_keys=("disk",)),
    "fanout": LIVE,  # read at use, when a request is split
}


def reloadable(old: SidecarConfig, new: SidecarConfig) -> tuple[SidecarConfig, list[str]]:
    """What a reload runs on: ``new``, except what `RELOAD` says needs a restart, which keeps its
    ``old`` value; and what was kept that way ("section" or "section.key"), in file order."""
    kept: dict[str, Any] = {}
    ignored: list[str] = []
    for name in type(new).model_fields:
        running, wanted = getattr(old, name), getattr(new, name)
        if running == wanted:
            continue
        how = RELOAD[name]
        if how.restart:
            kept[name] = running
            ignored.append(name)
            continue
        stale = [key for key in how.restart_keys if getattr(wanted, key) != getattr(running, key)]
        if stale:
            kept[name] = wanted.model_copy(update={key: getattr(running, key) for key in stale})
            ignored += [f"{name}.{key}" for key in stale]
    return new.model_copy(update=kept), ignored
