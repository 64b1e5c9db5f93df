"""The supervision loop of one backend: spawn, wait for health, watch, restart with backoff.

One `Supervisor` per backend, run as one task owned by the pool. A managed backend goes through
lives: spawn → STARTING → READY ⇄ UNHEALTHY → (exit, start timeout or hang) → RESTARTING → spawn.
An external backend has a single life without a process: it is only health-checked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from backend.backoff import Backoff
from backend.health import HealthResult, ModelKey, probe_health
from backend.process import BackendProcess, describe_exit
from backend.state import BackendState
from scheduler.config import BackendsConfig

if TYPE_CHECKING:
    from backend.pool import Backend

__all__ = ["FALL", "RISE", "Supervisor"]

log = logging.getLogger("glmtts_sidecar.pool")

RISE = 1  # consecutive healthy answers that bring an UNHEALTHY backend back to READY
FALL = 3  # consecutive failed health checks that make a READY backend UNHEALTHY
_FIRST_POLL_S = 0.1  # while starting, health is polled this soon, then ever less often up to interval_s

SetState = Callable[["Backend", BackendState, str], None]


class Supervisor:
    """Keeps one backend alive; `run()` returns only by cancellation (the pool's stop)."""

    def __init__(
        self,
        backend: Backend,
        config: BackendsConfig,
        session: aiohttp.ClientSession,
        *,
        python: str,
        log_output: bool,
        set_state: SetState,
        notify: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.process: BackendProcess | None = None
        self._config = config
        self._session = session
        self._python = python
        self._log_output = log_output
        self._set_state = set_state
        self._notify = notify
        self._backoff = Backoff(config.restart.backoff_initial_s, config.restart.backoff_max_s)
        self._wake = asyncio.Event()
        self._spawn_error: str | None = None
        self._ready_at: float | None = None  # when this life first became READY

    def wake(self) -> None:
        """Check health now rather than at the next interval (the proxy saw a failure)."""
        self._wake.set()

    async def spawn(self) -> None:
        """Start the process; a failure is kept and handled by `run()` as a failed start."""
        try:
            self.process = await BackendProcess.spawn(
                self._config, self.backend.spec, python=self._python, log_output=self._log_output
            )
        except OSError as exc:
            self._spawn_error = f"cannot start the command: {exc}"
            log.error("backend %s: %s", self.backend.id, self._spawn_error)
            return
        self.backend.pid = self.process.pid
        if self.backend.state is BackendState.STARTING:  # the first spawn: no transition to log
            log.info("backend %s: spawned pid %d", self.backend.id, self.process.pid)
        self._set(BackendState.STARTING, f"spawned pid {self.process.pid}")

    async def run(self) -> None:
        if not self.backend.spec.managed:
            await self._run_external()
            return
        while True:
            try:
                if self.process is None and self._spawn_error is None:
                    await self.spawn()
                reason = self._spawn_error or await self._life()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("backend %s: supervisor error", self.backend.id)
                reason = f"supervisor error: {exc!r}"
            self._spawn_error = None
            try:
                await self._restart_after(reason)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("backend %s: supervisor error while restarting", self.backend.id)
                await asyncio.sleep(self._backoff.max_s)

    # -- one life ---------------------------------------------------------------------------

    async def _life(self) -> str:
        """Supervise the running process until it must be restarted; returns why."""
        assert self.process is not None
        self._ready_at = None
        exited = asyncio.ensure_future(self.process.wait())
        try:
            return await self._until_ready(exited) or await self._while_up(exited)
        finally:
            exited.cancel()

    async def _restart_after(self, reason: str) -> None:
        if self.process is not None:
            await self.process.stop(self._config.stop_grace_s)
            self.process = None
        ready_for = time.monotonic() - self._ready_at if self._ready_at is not None else 0.0
        delay = self._backoff.next_delay(ready_for_s=ready_for)
        backend = self.backend
        backend.pid = None
        backend.restarts += 1
        backend.last_error = reason
        self._set(BackendState.RESTARTING, f"{reason}; restart #{backend.restarts} in {delay:.2f} s")
        await asyncio.sleep(delay)

    async def _run_external(self) -> None:
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            while True:
                try:
                    if self.backend.state not in (BackendState.READY, BackendState.UNHEALTHY):
                        await self._until_ready(never)
                    await self._while_up(never)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("backend %s: supervisor error", self.backend.id)
                    await asyncio.sleep(self._config.health.interval_s)
        finally:
            never.cancel()

    async def _until_ready(self, exited: asyncio.Future[int]) -> str | None:
        """Poll health until READY (None), or return why the process must be restarted."""
        health = self._config.health
        started = time.monotonic()
        deadline = started + health.start_timeout_s if self.backend.spec.managed else math.inf
        delay = _FIRST_POLL_S
        while True:
            result = await self._probe(exited)
            if result is None:
                return _exit_reason(exited)
            if result.healthy:
                self._ready_at = time.monotonic()
                self._set_model(result.model_key)
                self._set(BackendState.READY, f"health ok after {self._ready_at - started:.1f} s")
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"no healthy answer within {health.start_timeout_s:g} s ({result.error})"
            if await self._pause(min(delay, remaining), exited):
                return _exit_reason(exited)
            delay = min(delay * 2, health.interval_s)

    async def _while_up(self, exited: asyncio.Future[int]) -> str:
        """Watch a READY backend; returns why it must be restarted (managed backends only)."""
        health = self._config.health
        failures = 0
        while True:
            if await self._pause(health.interval_s, exited):
                return _exit_reason(exited)
            result = await self._probe(exited)
            if result is None:
                return _exit_reason(exited)
            backend = self.backend
            if result.healthy:
                failures = 0
                self._set_model(result.model_key)
                if backend.state is BackendState.UNHEALTHY:  # RISE == 1
                    self._set(BackendState.READY, "health ok again")
                continue
            failures += 1
            backend.last_error = result.error
            if backend.state is BackendState.READY and failures >= FALL:
                self._set(BackendState.UNHEALTHY, f"{failures} health checks failed: {result.error}")
            unhealthy_for = time.monotonic() - backend.since
            # A process that stays unhealthy as long as a start may take is hung: start it afresh.
            if (backend.spec.managed and backend.state is BackendState.UNHEALTHY
                    and unhealthy_for >= health.start_timeout_s):
                return f"unhealthy for {unhealthy_for:.0f} s ({result.error})"

    # -- steps ------------------------------------------------------------------------------

    async def _probe(self, exited: asyncio.Future[int]) -> HealthResult | None:
        """One health probe, abandoned when the process exits first (None)."""
        probe = asyncio.ensure_future(probe_health(self._session, self.backend.url, self._config.health))
        try:
            await asyncio.wait((probe, exited), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not probe.done():
                probe.cancel()
        if exited.done():
            if probe.done() and not probe.cancelled():
                probe.exception()  # retrieved: nothing to report about a dead process
            return None
        return probe.result()

    async def _pause(self, seconds: float, exited: asyncio.Future[int]) -> bool:
        """Sleep, cut short by a wake-up or the process's exit; True if it has exited."""
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((woken, exited), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
        self._wake.clear()
        return exited.done()

    def _set(self, state: BackendState, reason: str) -> None:
        self._set_state(self.backend, state, reason)

    def _set_model(self, key: ModelKey | None) -> None:
        if key != self.backend.model_key:
            self.backend.model_key = key
            self._notify()  # affinity changed: the dispatcher may now prefer another backend


def _exit_reason(exited: asyncio.Future[int]) -> str:
    return describe_exit(exited.result())
