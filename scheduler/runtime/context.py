"""What the running sidecar's parts share: one ``Runtime`` record, built once by scheduler.http.app.

Every handler (TTS, tasks, admin) and the operator's controls (reload, drain) reach the pool,
the dispatcher and the policies through it, never through one another.

API:

- ``config: SidecarConfig`` -- the running configuration; replaced by ``reconfigure``.
- ``pool: BackendPool`` -- the backends; ``ready_backends()``, and ``pick_ready()`` (the ready
  backend with the fewest requests in flight, or NoBackend, 503).
- ``transport: Transport`` -- every request to a backend (backend.transport):
  ``open(...)`` for a streamed answer, ``exchange(...)`` for a small one read whole.
- ``prompts: PromptCatalogue`` -- the prompt indexes the backends know.
- ``dispatcher: Dispatcher`` -- admission, queueing and slots; ``scheduler`` is its Scheduler.
- ``tenants: TenantDirectory`` -- attribution of requests to tenants and priority bands.
- ``metrics: Metrics`` -- the Prometheus counters.
- ``draining: bool`` -- True once draining: new TTS requests and tasks get 503 ``draining``.
- ``retries: RetryBudget`` -- the retry budget shared by every request.
- ``cache: ResultCache`` -- backends' successful TTS answers and the syntheses in flight
  (scheduler.runtime.cache); used only while ``config.cache.enabled``.
- ``redis: RedisLink | None`` -- the connection to the cluster's Redis when ``tasks.store`` names
  one (scheduler.runtime.redislink: ``client``, ``up``); None with SQLite.
- ``rates`` -- the tenants' request-rate buckets (scheduler.runtime.ratelimit), shared through
  ``redis`` when there is one.
- ``served: dict[str, int]`` -- answers by upstream's 200-character split (short_text, long_text),
  for /api/v1/stats/concurrency.
- ``reconfigure(config, scheduler, tenants)`` -- a reload: new policies from now on; the new
  scheduler has adopted every queued job; the cache takes its new bounds. Task settings are TaskService.reconfigure's.
"""

from __future__ import annotations

from backend.pool import Backend, BackendPool
from backend.state import BackendState
from backend.transport import Transport
from scheduler.config import SidecarConfig
from scheduler.core.retry import RetryBudget
from scheduler.core.scheduler import Scheduler
from scheduler.core.tenants import TenantDirectory
from scheduler.errors import NoBackend
from scheduler.runtime.cache import ResultCache
from scheduler.runtime.dispatcher import Dispatcher
from scheduler.runtime.metrics import Metrics
from scheduler.runtime.prompts import PromptCatalogue
from scheduler.runtime.ratelimit import RateLimiter
from scheduler.runtime.redislink import RedisLink

__all__ = ["Runtime"]


class Runtime:
    def __init__(self, config: SidecarConfig, pool: BackendPool, transport: Transport, prompts: PromptCatalogue,
                 dispatcher: Dispatcher, tenants: TenantDirectory, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.pool = pool
        self.transport = transport
        self.prompts = prompts
        self.dispatcher = dispatcher
        self.tenants = tenants
        self.metrics = metrics if metrics is not None else Metrics()
        self.draining = False
        self.retries = RetryBudget(ratio=config.retries.budget_ratio, min_concurrent=config.retries.budget_min)
        self.served = {"short_text": 0, "long_text": 0}
        self.cache = ResultCache(config.cache, clock=dispatcher.clock)
        self.redis: RedisLink | None = None  # set by scheduler.http.app when tasks.store is a Redis URL
        self.rates = RateLimiter(clock=dispatcher.clock)  # tenants' request rates (tenants.*.rate)

    @property
    def scheduler(self) -> Scheduler:
        return self.dispatcher.scheduler

    def reconfigure(self, config: SidecarConfig, scheduler: Scheduler, tenants: TenantDirectory) -> None:
        """A reload: new policies from now on; the new scheduler has adopted every queued job."""
        self.config = config
        self.tenants = tenants
        self.dispatcher.scheduler = scheduler
        self.dispatcher.slots = config.backends.slot_policy()
        self.retries.ratio = config.retries.budget_ratio
        self.retries.min_concurrent = config.retries.budget_min
        self.cache.configure(config.cache)
        self.dispatcher.pump()

    def ready_backends(self) -> list[Backend]:
        return [b for b in self.pool.backends if b.state is BackendState.READY]

    def pick_ready(self) -> Backend:
        ready = self.ready_backends()
        if not ready:
            raise NoBackend("No backend is ready", retry_after=1.0)
        return min(ready, key=lambda b: b.in_flight)
