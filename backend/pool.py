"""The pool of backends the proxy dispatches to: their live state, and the tasks that keep them up.

The pool owns every backend process and every supervision task; `stop()` ends them all. State
changes happen only on the event loop, and each one (and each change of `backends` membership)
calls `on_change()` so the dispatcher can look again.

Who calls what:
- the proxy: `report_failure` (it could not talk to a backend), `report_outcome` (after every
  request: passive outlier detection), `kill_backend` (the request watchdog); it maintains
  `Backend.in_flight`, `served` and `model_key`;
- the sidecar's admin and reload: `restart_backend` (graceful), `apply` (a new layout, live).
`restart_backend` and `apply` run one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable

from backend.outlier import OutlierDetector
from backend.process import describe_exit
from backend.record import Backend
from backend.settings import BackendsConfig, BackendSpec
from backend.state import BackendState
from backend.supervisor import Supervisor
from backend.topology import Start, Step, launch_identity, plan_changes
from backend.transport import AiohttpTransport, Transport
from backend.warmup import WarmupRun

__all__ = ["Backend", "BackendPool"]

log = logging.getLogger("glmtts_sidecar.pool")

_DRAIN_POLL_S = 0.05  # in_flight is the proxy's plain counter: draining polls it
_SETTLED = (BackendState.READY, BackendState.FAILED, BackendState.STOPPING, BackendState.STOPPED)


class BackendPool:
    """Starts, supervises and stops the backends of one `BackendsConfig`, in layout order."""

    def __init__(
        self,
        config: BackendsConfig,
        *,
        python: str = sys.executable,
        on_change: Callable[[], None] | None = None,
        log_output: bool = True,
        transport: Transport | None = None,
    ) -> None:
        """``transport``: what health probes and warm-ups go through (the caller's, which it
        starts and closes); None: the pool's own, over the network."""
        self.config = config
        self.backends = [Backend(spec) for spec in config.layout()]
        self._by_id = {backend.id: backend for backend in self.backends}
        self._outliers = {backend: OutlierDetector(config.outlier) for backend in self.backends}
        self._python = python
        self._on_change = on_change
        self._log_output = log_output
        self._supervisors: dict[Backend, Supervisor] = {}
        self._tasks: dict[Backend, asyncio.Task[None]] = {}
        self._transport: Transport = transport if transport is not None else AiohttpTransport()
        self._owns_transport = transport is None
        self._waiters: set[asyncio.Future[None]] = set()
        self._started = False
        self._spawned = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self._topology = asyncio.Lock()  # restart_backend and apply, one at a time

    async def start(self) -> None:
        """Spawn every managed backend and start supervising all; does not wait for health."""
        if self._started or self._stopping is not None:
            raise RuntimeError("a BackendPool can be started once, and not after stop()")
        self._started = True
        try:
            if self._owns_transport:
                await self._transport.start()
            for backend in self.backends:
                self._supervisors[backend] = self._new_supervisor(backend)
            for supervisor in self._supervisors.values():
                if supervisor.backend.spec.managed and self._stopping is None:
                    await supervisor.spawn()
            for backend in self.backends:
                self._run(backend)
        finally:
            self._spawned.set()

    async def wait_ready(self, timeout: float, *, count: int = 1) -> bool:
        """True once at least `count` backends are READY; False when `timeout` seconds pass first."""
        return await self._wait_until(lambda: len(self.ready()) >= count, timeout)

    def ready(self) -> list[Backend]:
        return [backend for backend in self.backends if backend.state is BackendState.READY]

    def get(self, backend_id: str) -> Backend | None:
        return self._by_id.get(backend_id)

    # -- reports from the proxy -------------------------------------------------------------

    def report_failure(self, backend: Backend, reason: str) -> None:
        """The proxy could not talk to `backend`: take it out of rotation until health answers again."""
        if self._stopping is not None:
            return
        backend.last_error = reason
        if backend.state is BackendState.READY:
            self._set_state(backend, BackendState.UNHEALTHY, f"proxy reported: {reason}")
        supervisor = self._supervisors.get(backend)
        if supervisor is not None:
            supervisor.report_failure()

    def report_outcome(self, backend: Backend, *, ok: bool, latency_ratio: float | None) -> None:
        """One request on `backend` finished: `ok` False for a connection error or a 5xx answer;
        `latency_ratio` = actual / predicted service seconds (None when unknown). Called once per
        request by the proxy. An outlier is ejected (UNHEALTHY for a while), unless it is the last
        READY backend: then it stays in rotation, flagged in `Backend.outlier`."""
        detector = self._outliers.get(backend)
        if detector is None or self._stopping is not None or detector.ejected:
            return
        reason = detector.record(ok=ok, latency_ratio=latency_ratio)
        if reason is None:
            if backend.outlier is not None:
                log.info("backend %s: no longer an outlier", backend.id)
                backend.outlier = None
                self._changed()
            return
        if backend.state is not BackendState.READY:
            return
        if not any(b.state is BackendState.READY for b in self.backends if b is not backend):
            if backend.outlier is None:
                log.warning("backend %s: outlier (%s) but it is the last ready backend; keeping it in rotation",
                            backend.id, reason)
                backend.outlier = reason
                self._changed()
            return
        seconds = detector.eject()
        backend.outlier = reason
        self._set_state(backend, BackendState.UNHEALTHY, f"ejected as an outlier: {reason}; for {seconds:g} s")
        supervisor = self._supervisors.get(backend)
        if supervisor is not None:
            supervisor.wake()  # it ends the ejection on time

    def kill_backend(self, backend: Backend, reason: str) -> None:
        """The request watchdog: SIGKILL `backend`'s process group now; its supervisor sees the exit
        and restarts it (backoff, crash-loop rules apply). An external backend cannot be killed: it
        is marked UNHEALTHY until health answers `rise` times again."""
        if self._stopping is not None:
            return
        supervisor = self._supervisors.get(backend)
        if backend.spec.managed and (supervisor is None or not supervisor.kill(reason)):
            return  # no process right now: nothing is stuck
        log.warning("backend %s: %s (%s)", backend.id, "killed" if backend.spec.managed else "cannot kill an "
                    "external backend; out of rotation until health answers", reason)
        backend.last_error = reason
        if backend.state is BackendState.READY:
            self._set_state(backend, BackendState.UNHEALTHY, f"killed: {reason}" if backend.spec.managed
                            else f"watchdog: {reason}")
        if supervisor is not None and not backend.spec.managed:
            supervisor.report_failure()

    # -- changes asked by the sidecar -------------------------------------------------------

    async def restart_backend(self, backend_id: str, *, drain_timeout_s: float) -> None:
        """Restart one backend gracefully: DRAINING (no new requests) until `in_flight` is 0 or
        `drain_timeout_s` passed, stop the process (TERM, KILL after stop_grace_s), then a new life:
        spawn, health, warm-up. Returns once it is READY or FAILED (or see `_settle`). An external
        backend is drained and warmed up again. KeyError for an unknown id; RuntimeError unless the
        pool runs (started, not stopping)."""
        backend = self._by_id[backend_id]
        async with self._topology:
            if self._by_id.get(backend_id) is not backend:  # removed by an apply while we waited
                raise KeyError(backend_id)
            if not self._started or self._stopping is not None:
                raise RuntimeError("restart_backend needs a running pool")
            supervisor = self._supervisors[backend]
            await self._unsupervise(backend)
            await self._drain(backend, drain_timeout_s, "restart requested")
            await self._end_process(backend)
            backend.restarts += 1
            supervisor.restart_fresh()
            await self._supervise(backend)
            await self._settle(backend)

    async def apply(self, new_config: BackendsConfig, *, drain_timeout_s: float) -> None:
        """Change the layout live (see backend.topology for the order). Backends whose launch is
        unchanged run on with the new health, warm-up, restart, outlier and watchdog settings; new
        ones start one at a time, each waited for until READY or FAILED; going ones are drained (up
        to `drain_timeout_s`), stopped and removed, one at a time, after the new ones are up. A
        backend whose id stays but whose launch (command, env, cwd, port) changes is drained and
        stopped before its successor starts: that briefly reduces capacity, as does a new port
        that a going backend still holds. `backends` ends in the new layout's order. Before
        `start()` it only changes the layout; RuntimeError after `stop()`. Returns early (no error)
        when the pool begins stopping meanwhile."""
        async with self._topology:
            if self._stopping is not None:
                raise RuntimeError("apply after stop()")
            old_config, python = self.config, self._python
            plan = plan_changes(
                [(b.spec, launch_identity(old_config, b.spec, python=python)) for b in self.backends],
                [(s, launch_identity(new_config, s, python=python)) for s in new_config.layout()],
            )
            self.config = new_config
            old = dict(self._by_id)
            for spec in plan.keep:
                backend = old[spec.id]
                backend.spec = spec  # same launch; its index may differ
                self._outliers[backend].config = new_config.outlier
                if (supervisor := self._supervisors.get(backend)) is not None:
                    supervisor.reconfigure(new_config)
            log.info("new backend layout: %d kept, %s", len(plan.keep),
                     ", ".join(_describe(step) for step in plan.steps) or "nothing to start or stop")
            if plan.reduces_capacity_early:
                log.warning("new backend layout: some backends stop before their successors are ready "
                            "(same id with a new launch, or a port still in use); capacity drops meanwhile")
            self._reorder()
            for step in plan.steps:
                if self._stop_began():
                    return
                if isinstance(step, Start):
                    await self._add(step.spec)
                else:
                    await self._remove(old[step.backend_id], drain_timeout_s)

    # -- stopping ---------------------------------------------------------------------------

    async def stop(self) -> None:
        """End supervision, SIGTERM then SIGKILL every process group, reap; idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    def _stop_began(self) -> bool:
        # A method, not the attribute, where an await may have passed since the last look.
        return self._stopping is not None

    async def _stop(self) -> None:
        if self._started:
            await self._spawned.wait()
        for backend in self.backends:
            self._set_state(backend, BackendState.STOPPING, "pool stopping")
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_backend(backend) for backend in list(self.backends)))
        if self._owns_transport and self._started:
            await self._transport.close()

    async def _stop_backend(self, backend: Backend) -> None:
        self._set_state(backend, BackendState.STOPPED, await self._end_process(backend))

    async def _end_process(self, backend: Backend) -> str:
        """Stop the backend's process if it has one (TERM, KILL after the grace); what became of it."""
        supervisor = self._supervisors.get(backend)
        process = supervisor.process if supervisor is not None else None
        reason = "not running"
        if supervisor is not None and process is not None:
            try:
                code = await process.stop(self.config.stop_grace_s)
                reason = f"pid {process.pid} {describe_exit(code)}"
            except Exception as exc:  # keep stopping the others; this one is reported
                log.exception("backend %s: error while stopping pid %d", backend.id, process.pid)
                reason = f"error while stopping: {exc!r}"
            supervisor.process = None
        backend.pid = None
        return reason

    # -- supervision and membership ---------------------------------------------------------

    def _new_supervisor(self, backend: Backend) -> Supervisor:
        return Supervisor(backend, self.config, self._transport, python=self._python, log_output=self._log_output,
                          set_state=self._set_state, notify=self._changed, outlier=self._outliers[backend])

    def _run(self, backend: Backend) -> None:
        task = asyncio.create_task(self._supervisors[backend].run(), name=f"supervise-{backend.id}")
        task.add_done_callback(_log_unexpected_end)
        self._tasks[backend] = task

    async def _supervise(self, backend: Backend) -> None:
        """Spawn (managed) and supervise `backend` again, unless the pool began stopping meanwhile."""
        supervisor = self._supervisors[backend]
        if backend.spec.managed and supervisor.process is None and self._stopping is None:
            await supervisor.spawn()
        if self._stop_began():  # stop() did not see this process: it was being spawned
            await self._stop_backend(backend)
            return
        self._run(backend)

    async def _unsupervise(self, backend: Backend) -> None:
        task = self._tasks.pop(backend, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _settle(self, backend: Backend) -> None:
        """Wait until `backend` is READY or FAILED. Failures too slow to make a crash loop (each start
        timing out) end the wait after more than crash_loop.max_failures of them; an external one is
        waited for at most a start timeout plus a warm-up timeout."""
        config, restarts = self.config, backend.restarts
        bound = config.restart.crash_loop.max_failures
        limit = None if backend.spec.managed else config.health.start_timeout_s + config.warmup.timeout_s
        await self._wait_until(lambda: backend.state in _SETTLED or backend.restarts - restarts > bound, limit)
        if backend.state is not BackendState.READY:
            log.warning("backend %s: not ready (%s: %s); going on", backend.id, backend.state.value,
                        backend.last_error)

    async def _drain(self, backend: Backend, timeout_s: float, reason: str) -> None:
        """DRAINING until the proxy has no request on `backend`, or `timeout_s` passed."""
        self._set_state(backend, BackendState.DRAINING, f"{reason}; {backend.in_flight} request(s) in flight")
        deadline = time.monotonic() + timeout_s
        while backend.in_flight > 0 and self._stopping is None:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("backend %s: %d request(s) still in flight after %g s of draining; stopping it anyway",
                            backend.id, backend.in_flight, timeout_s)
                return
            await asyncio.sleep(min(_DRAIN_POLL_S, left))

    async def _add(self, spec: BackendSpec) -> None:
        backend = Backend(spec)
        self._outliers[backend] = OutlierDetector(self.config.outlier)
        self.backends.append(backend)
        self._reorder()
        log.info("backend %s: added (%s)", backend.id, backend.url)
        self._changed()
        if not self._started:
            return
        self._supervisors[backend] = self._new_supervisor(backend)
        await self._supervise(backend)
        await self._settle(backend)

    async def _remove(self, backend: Backend, drain_timeout_s: float) -> None:
        if backend in self._supervisors:
            await self._unsupervise(backend)
            await self._drain(backend, drain_timeout_s, "leaving the pool")
            self._set_state(backend, BackendState.STOPPING, "leaving the pool")
            await self._stop_backend(backend)
        if self._stop_began():
            return  # stop() owns every backend from here
        self.backends.remove(backend)
        self._supervisors.pop(backend, None)
        self._outliers.pop(backend, None)
        self._reorder()
        log.info("backend %s: removed (%s)", backend.id, backend.url)
        self._changed()

    def _reorder(self) -> None:
        """`backends` in the current layout's order; old ones on their way out after the rest."""
        order = {spec.id: i for i, spec in enumerate(self.config.layout())}
        position = {backend: i for i, backend in enumerate(self.backends)}
        self.backends.sort(key=lambda b: (order.get(b.id, len(order)), position[b]))
        self._by_id = {backend.id: backend for backend in self.backends}

    # -- state ------------------------------------------------------------------------------

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """True once `predicate()` holds (checked at each change); False if `timeout` passes first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            changed = loop.create_future()
            self._waiters.add(changed)
            try:
                await asyncio.wait((changed,), timeout=remaining)
            finally:
                self._waiters.discard(changed)
        return True

    def _set_state(self, backend: Backend, state: BackendState, reason: str) -> None:
        old = backend.state
        if old is state:
            return
        if self._stopping is not None and state not in (BackendState.STOPPING, BackendState.STOPPED):
            return  # a supervisor's last word while it is being cancelled
        now = time.monotonic()
        if old is BackendState.WARMING and state is BackendState.READY:
            # The supervisor enters WARMING right before the warm-up synthesis and READY right
            # after it succeeded: the time in between is the warm-up's (the cost model learns from it).
            warmup = self.config.warmup
            backend.warmup = WarmupRun(seconds=now - backend.since, text=warmup.text, model_key=warmup.model_key)
        backend.state = state
        backend.since = now
        log.info("backend %s: %s -> %s (%s)", backend.id, old.value, state.value, reason)
        self._changed()

    def _changed(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("on_change callback failed")


def _describe(step: Step) -> str:
    return f"start {step.spec.id}" if isinstance(step, Start) else f"stop {step.backend_id}"


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s ended unexpectedly", task.get_name(), exc_info=exc)
