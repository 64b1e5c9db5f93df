"""The supervision of one backend: spawn, health, warm-up, watch, restart with backoff, crash loops.

One `Supervisor` per backend, run as one task owned by the pool. A managed backend goes through
lives: spawn → STARTING → (health answers) WARMING → (warm-up synthesis) READY ⇄ UNHEALTHY → (exit,
failed start or warm-up, hang, unresponsive while busy, watchdog kill) → RESTARTING (backoff) or,
after too many failures in a short window, FAILED (cooldown) → spawn. An external backend has a
single life without a process: it is health-checked and warmed up; a failed warm-up leaves it
UNHEALTHY and is tried again at the next health interval.

The pool may cancel `run()` at any await (stop, a requested restart, a removal); the process is
then left in `process` for the pool to stop. DRAINING is the pool's alone: the pool cancels
supervision before it drains.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from backend.backoff import Backoff
from backend.crashloop import CrashLoop
from backend.health import HealthResult, HealthTracker, ModelKey, probe_health
from backend.outlier import OutlierDetector
from backend.process import BackendProcess, describe_exit
from backend.record import Backend
from backend.settings import BackendsConfig
from backend.state import BackendState
from backend.transport import Transport
from backend.warmup import warm_up

__all__ = ["Supervisor"]

log = logging.getLogger("glmtts_sidecar.pool")

_FIRST_POLL_S = 0.1  # while starting, health is polled this soon, then ever less often up to interval_s
_T = TypeVar("_T")

SetState = Callable[[Backend, BackendState, str], None]


class Supervisor:
    """Keeps one backend alive; `run()` returns only by cancellation."""

    def __init__(
        self,
        backend: Backend,
        config: BackendsConfig,
        transport: Transport,
        *,
        python: str,
        log_output: bool,
        set_state: SetState,
        notify: Callable[[], None],
        outlier: OutlierDetector,
    ) -> None:
        self.backend = backend
        self.process: BackendProcess | None = None
        self.outlier = outlier  # shared with the pool, which records outcomes and ejects
        self._config = config
        self._transport = transport  # health probes and warm-ups
        self._python = python
        self._log_output = log_output
        self._set_state = set_state
        self._notify = notify
        self._backoff = Backoff(config.restart.backoff_initial_s, config.restart.backoff_max_s)
        self._crash_loop = CrashLoop(config.restart.crash_loop)
        self._wake = asyncio.Event()
        self._spawn_error: str | None = None
        self._kill_reason: str | None = None  # why we SIGKILLed the current process, for its exit reason
        self._ready_at: float | None = None  # when this life first became READY
        self._healthy_after = 0.0  # seconds this life took to answer health
        self._tracker: HealthTracker | None = None  # rise/fall while up
        self._warmups = 0

    # -- called by the pool -----------------------------------------------------------------

    def reconfigure(self, config: BackendsConfig) -> None:
        """Adopt new health, warm-up, restart, outlier and watchdog settings (same launch)."""
        restart = config.restart
        if (restart.backoff_initial_s, restart.backoff_max_s) != (self._backoff.initial_s, self._backoff.max_s):
            self._backoff = Backoff(restart.backoff_initial_s, restart.backoff_max_s)
        self._crash_loop.config = restart.crash_loop
        self.outlier.config = config.outlier
        if self._tracker is not None:
            self._tracker.rise, self._tracker.fall = config.health.rise, config.health.fall
        self._config = config
        self.wake()

    def wake(self) -> None:
        """Check health now rather than at the next interval (the proxy saw a failure, ...)."""
        self._wake.set()

    def report_failure(self) -> None:
        """The proxy could not talk to the backend: health must prove it up `rise` times again."""
        if self._tracker is not None:
            self._tracker.mark_down(time.monotonic())
        self.wake()

    def kill(self, reason: str) -> bool:
        """SIGKILL the process group now; `run()` sees the exit and restarts. False if none runs."""
        process = self.process
        if process is None or process.returncode is not None:
            return False
        self._kill_reason = reason
        process.kill()
        return True

    def restart_fresh(self) -> None:
        """The next life is a requested one: a fresh backoff and crash-loop count (an operator's
        restart ends a FAILED cooldown early)."""
        self._backoff.reset()
        self._crash_loop.reset()
        self._kill_reason = None

    async def spawn(self) -> None:
        """Start the process; a failure is kept and handled by `run()` as a failed start."""
        self._kill_reason = None
        task = asyncio.ensure_future(BackendProcess.spawn(
            self._config, self.backend.spec, python=self._python, log_output=self._log_output))
        try:
            self.process = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The process may exist by now: keep it, so that whoever cancelled us stops it.
            self.process = await _result_or_none(task)
            self.backend.pid = self.process.pid if self.process is not None else None
            raise
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
                await self._after_failure(reason)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("backend %s: supervisor error while restarting", self.backend.id)
                await asyncio.sleep(self._backoff.max_s)

    # -- lives ------------------------------------------------------------------------------

    async def _life(self) -> str:
        """Supervise the running process until it must be restarted; returns why."""
        assert self.process is not None
        self._ready_at = None
        exited = asyncio.ensure_future(self.process.wait())
        try:
            return (await self._until_healthy(exited) or await self._warm_up(exited)
                    or await self._while_up(exited))
        finally:
            exited.cancel()

    async def _after_failure(self, reason: str) -> None:
        """Stop what is left of the process; wait out the backoff, or a cooldown after a crash loop."""
        if self.process is not None:
            await self.process.stop(self._config.stop_grace_s)
            self.process = None
        now = time.monotonic()
        ready_for = now - self._ready_at if self._ready_at is not None else 0.0
        backend = self.backend
        backend.pid = None
        backend.model_key = None
        backend.restarts += 1
        backend.last_error = reason
        crash_loop = self._config.restart.crash_loop
        if self._crash_loop.record(now):
            count = self._crash_loop.count(now)
            self._set(BackendState.FAILED, f"{reason}; crash loop: {count} failures within {crash_loop.window_s:g} s, "
                                            f"restart #{backend.restarts} in {crash_loop.cooldown_s:g} s")
            await asyncio.sleep(crash_loop.cooldown_s)
            self._crash_loop.reset()
            self._backoff.reset()
            return
        delay = self._backoff.next_delay(ready_for_s=ready_for)
        self._set(BackendState.RESTARTING, f"{reason}; restart #{backend.restarts} in {delay:.2f} s")
        await asyncio.sleep(delay)

    async def _run_external(self) -> None:
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            while True:
                try:
                    await self._until_healthy(never)
                    error = await self._warm_up(never)
                    if error is None:
                        await self._while_up(never)  # returns only by an exception: no restarts here
                        continue
                    interval = self._config.health.interval_s
                    self.backend.last_error = error
                    self._set(BackendState.UNHEALTHY, f"{error}; trying again in {interval:g} s")
                    await self._pause(interval, never)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("backend %s: supervisor error", self.backend.id)
                    await asyncio.sleep(self._config.health.interval_s)
        finally:
            never.cancel()

    # -- phases -----------------------------------------------------------------------------

    async def _until_healthy(self, exited: asyncio.Future[int]) -> str | None:
        """Poll health until it answers (None), or return why the process must be restarted."""
        health = self._config.health
        started = time.monotonic()
        deadline = started + health.start_timeout_s if self.backend.spec.managed else math.inf
        delay = _FIRST_POLL_S
        while True:
            result = await self._probe(exited)
            if result is None:
                return self._exit_reason(exited)
            if result.healthy:
                self._healthy_after = time.monotonic() - started
                self._set_model(result.model_key)
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"no healthy answer within {health.start_timeout_s:g} s ({result.error})"
            if await self._pause(min(delay, remaining), exited):
                return self._exit_reason(exited)
            delay = min(delay * 2, health.interval_s)

    async def _warm_up(self, exited: asyncio.Future[int]) -> str | None:
        """WARMING until the warm-up synthesis succeeded, then READY (None); else why it failed."""
        warmup = self._config.warmup
        healthy = f"health ok after {self._healthy_after:.1f} s"
        if not warmup.enabled:
            self._become_ready(healthy)
            return None
        self._set(BackendState.WARMING, f"{healthy}; warming up")
        began = time.monotonic()
        self._warmups += 1
        request_id = f"warmup-{self.backend.id}-{self._warmups}"
        outcome = await self._unless_exited(
            warm_up(self._transport, self.backend.url, warmup, request_id=request_id), exited)
        if exited.done():
            return self._exit_reason(exited)
        if outcome is not None:
            return outcome
        self._set_model(warmup.model_key)
        self._become_ready(f"warmed up in {time.monotonic() - began:.1f} s, {healthy}")
        return None

    async def _while_up(self, exited: asyncio.Future[int]) -> str:
        """Watch a READY backend; returns why it must be restarted (managed backends only)."""
        health = self._config.health
        tracker = self._tracker = HealthTracker(rise=health.rise, fall=health.fall)
        stuck_since: float | None = None  # since when health fails while requests are in flight
        try:
            while True:
                if await self._pause(self._next_check_in(), exited):
                    return self._exit_reason(exited)
                self._end_ejection_if_due()
                result = await self._probe(exited)
                if result is None:
                    return self._exit_reason(exited)
                now, backend = time.monotonic(), self.backend
                tracker.record(result.healthy, now)
                if result.healthy:
                    self._set_model(result.model_key)
                else:
                    backend.last_error = result.error
                    backend.health_failures += 1
                self._update_state(down=f"{tracker.bad_streak} health checks failed: {result.error}",
                                   up=f"health ok {tracker.good_streak} times in a row")
                if not backend.spec.managed or tracker.healthy or tracker.unhealthy_since is None:
                    stuck_since = None
                    continue
                watchdog = self._config.watchdog
                if result.healthy or backend.in_flight == 0:
                    stuck_since = None
                elif stuck_since is None:
                    stuck_since = now
                elif now - stuck_since >= watchdog.unresponsive_s:
                    # Requests are stuck in it and it does not answer health: waiting on costs them.
                    reason = (f"unresponsive: health failing for {now - stuck_since:.1f} s with "
                              f"{backend.in_flight} request(s) in flight")
                    self.kill(reason)
                    return f"{reason} (killed by SIGKILL)"
                down_for = now - tracker.unhealthy_since
                # A process that stays unhealthy as long as a start may take is hung: start it afresh.
                if down_for >= self._config.health.start_timeout_s:
                    return f"unhealthy for {down_for:.0f} s ({result.error or 'health not back in a row'})"
        finally:
            self._tracker = None

    # -- steps ------------------------------------------------------------------------------

    def _become_ready(self, reason: str) -> None:
        self._ready_at = time.monotonic()
        self.outlier.release()  # a new life: outcomes of the old process say nothing about this one
        if self.backend.outlier is not None:
            self.backend.outlier = None
        self._set(BackendState.READY, reason)

    def _update_state(self, *, down: str, up: str) -> None:
        """READY iff health is good (rise/fall) and no ejection runs; otherwise UNHEALTHY."""
        backend, tracker = self.backend, self._tracker
        if tracker is None or backend.state not in (BackendState.READY, BackendState.UNHEALTHY):
            return
        if not tracker.healthy:
            if backend.state is BackendState.READY:
                self._set(BackendState.UNHEALTHY, down)
        elif backend.state is BackendState.UNHEALTHY and self.outlier.ejected_until is None:
            self._set(BackendState.READY, up)

    def _next_check_in(self) -> float:
        interval = self._config.health.interval_s
        until = self.outlier.ejected_until
        if until is None:
            return interval
        return max(0.0, min(interval, until - time.monotonic()))

    def _end_ejection_if_due(self) -> None:
        until = self.outlier.ejected_until
        if until is None or time.monotonic() < until:
            return
        self.outlier.release()
        self.backend.outlier = None
        self._update_state(down="ejection over, but health is failing", up="ejection over")
        self._notify()

    async def _probe(self, exited: asyncio.Future[int]) -> HealthResult | None:
        """One health probe, abandoned when the process exits first (None)."""
        return await self._unless_exited(probe_health(self._transport, self.backend.url, self._config.health), exited)

    async def _unless_exited(self, work: Awaitable[_T], exited: asyncio.Future[int]) -> _T | None:
        """The result of `work`, or None when the process exits first (the work is then cancelled)."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait((task, exited), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if exited.done():
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: nothing to report about a dead process
            return None
        return task.result()

    async def _pause(self, seconds: float, exited: asyncio.Future[int]) -> bool:
        """Sleep, cut short by a wake-up or the process's exit; True if it has exited."""
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((woken, exited), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
        self._wake.clear()
        return exited.done()

    def _exit_reason(self, exited: asyncio.Future[int]) -> str:
        exit_text = describe_exit(exited.result())
        return f"{self._kill_reason} ({exit_text})" if self._kill_reason else exit_text

    def _set(self, state: BackendState, reason: str) -> None:
        self._set_state(self.backend, state, reason)

    def _set_model(self, key: ModelKey | None) -> None:
        if key != self.backend.model_key:
            self.backend.model_key = key
            self._notify()  # affinity changed: the dispatcher may now prefer another backend


async def _result_or_none(task: asyncio.Future[BackendProcess]) -> BackendProcess | None:
    try:
        return await task
    except Exception:
        return None
