"""The pool of backends the proxy dispatches to: their live state, and the tasks that keep them up.

The pool owns every backend process and every supervision task; `stop()` ends them all. State
changes happen only on the event loop, and each one calls `on_change()` so the dispatcher can
look again.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from backend.process import describe_exit
from backend.state import BackendState
from backend.supervisor import Supervisor
from scheduler.config import BackendsConfig, BackendSpec

__all__ = ["Backend", "BackendPool"]

log = logging.getLogger("glmtts_sidecar.pool")


@dataclass(eq=False)
class Backend:
    """Live state of one backend, mutated only by the pool (and in_flight/served by the proxy)."""

    spec: BackendSpec
    state: BackendState = BackendState.STARTING
    pid: int | None = None
    in_flight: int = 0  # maintained by the proxy
    served: int = 0  # maintained by the proxy
    restarts: int = 0
    model_key: tuple[int, bool] | None = None  # (model_sample_rate, model_use_phoneme); None: not loaded
    last_error: str | None = None
    since: float = field(default_factory=time.monotonic)  # monotonic time of the last state change

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def id(self) -> str:
        return self.spec.id

    def as_json(self) -> dict[str, Any]:
        model = None
        if self.model_key is not None:
            model = {"sample_rate": self.model_key[0], "use_phoneme": self.model_key[1]}
        return {
            "id": self.id,
            "url": self.url,
            "state": self.state.value,
            "pid": self.pid,
            "in_flight": self.in_flight,
            "served": self.served,
            "restarts": self.restarts,
            "model": model,
            "last_error": self.last_error,
            "managed": self.spec.managed,
        }


class BackendPool:
    """Starts, supervises and stops the backends of one `BackendsConfig`, in layout order."""

    def __init__(
        self,
        config: BackendsConfig,
        *,
        python: str = sys.executable,
        on_change: Callable[[], None] | None = None,
        log_output: bool = True,
    ) -> None:
        self.config = config
        self.backends = [Backend(spec) for spec in config.layout()]
        self._by_id = {backend.id: backend for backend in self.backends}
        self._python = python
        self._on_change = on_change
        self._log_output = log_output
        self._supervisors: dict[str, Supervisor] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._started = False
        self._spawned = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Spawn every managed backend and start supervising all; does not wait for health."""
        if self._started or self._stopping is not None:
            raise RuntimeError("a BackendPool can be started once, and not after stop()")
        self._started = True
        try:
            # One connection per probe: a pooled one may lead to a process that has since died.
            connector = aiohttp.TCPConnector(force_close=True, limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
            for backend in self.backends:
                self._supervisors[backend.id] = Supervisor(
                    backend, self.config, self._session, python=self._python,
                    log_output=self._log_output, set_state=self._set_state, notify=self._changed,
                )
            for supervisor in self._supervisors.values():
                if supervisor.backend.spec.managed and self._stopping is None:
                    await supervisor.spawn()
            for backend_id, supervisor in self._supervisors.items():
                task = asyncio.create_task(supervisor.run(), name=f"supervise-{backend_id}")
                task.add_done_callback(_log_unexpected_end)
                self._tasks.append(task)
        finally:
            self._spawned.set()

    async def wait_ready(self, timeout: float, *, count: int = 1) -> bool:
        """True once at least `count` backends are READY; False when `timeout` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.ready()) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            changed = loop.create_future()
            self._waiters.add(changed)
            try:
                await asyncio.wait((changed,), timeout=remaining)
            finally:
                self._waiters.discard(changed)
        return True

    def ready(self) -> list[Backend]:
        return [backend for backend in self.backends if backend.state is BackendState.READY]

    def get(self, backend_id: str) -> Backend | None:
        return self._by_id.get(backend_id)

    def report_failure(self, backend: Backend, reason: str) -> None:
        """The proxy could not talk to `backend`: take it out of rotation until health answers again."""
        if self._stopping is not None:
            return
        backend.last_error = reason
        if backend.state is BackendState.READY:
            self._set_state(backend, BackendState.UNHEALTHY, f"proxy reported: {reason}")
        supervisor = self._supervisors.get(backend.id)
        if supervisor is not None:
            supervisor.wake()

    async def stop(self) -> None:
        """End supervision, SIGTERM then SIGKILL every process group, reap; idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        if self._started:
            await self._spawned.wait()
        for backend in self.backends:
            self._set_state(backend, BackendState.STOPPING, "pool stopping")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_backend(backend) for backend in self.backends))
        if self._session is not None:
            await self._session.close()

    async def _stop_backend(self, backend: Backend) -> None:
        supervisor = self._supervisors.get(backend.id)
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
        self._set_state(backend, BackendState.STOPPED, reason)

    def _set_state(self, backend: Backend, state: BackendState, reason: str) -> None:
        old = backend.state
        if old is state:
            return
        if self._stopping is not None and state not in (BackendState.STOPPING, BackendState.STOPPED):
            return  # a supervisor's last word while it is being cancelled
        backend.state = state
        backend.since = time.monotonic()
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


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s ended unexpectedly", task.get_name(), exc_info=exc)
