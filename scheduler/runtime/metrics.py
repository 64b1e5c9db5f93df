"""Prometheus metrics: ``GET /metrics``. Each metric's HELP string is its documentation.

Two kinds. Events the proxy reports as they happen -- a TTS request answered, with its class,
tenant, outcome and timings -- are counters and histograms updated through ``request_finished``.
Everything that mirrors state -- the queue, the backends, the scheduler's tally, reloads,
draining -- is read by a collector at scrape time from ``Sources``, so it is exact at every
scrape and needs no update hooks; a backend that leaves the pool leaves the output with it.

Labels are bounded: ``class`` is a configured length class (``unknown`` before the text was
read), ``tenant`` a configured tenant or ``default``, ``band`` a configured priority band,
``backend`` an id from the backend layout.
"""

from __future__ import annotations

import enum
import logging
import platform
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backend.pool import Backend
from backend.state import BackendState
from glmtts import __version__
from scheduler.core.admission import Reason
from scheduler.core.scheduler import Scheduler
from scheduler.errors import RateLimited

log = logging.getLogger("glmtts_sidecar.metrics")

PREFIX = "glmtts_sidecar_"
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 300, 600, 900)
RATIO_BUCKETS = (0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10)
PIECE_BUCKETS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# Why a TTS request was synthesized whole (scheduler.runtime.fanout).
FANOUT_DECLINED = ("disabled", "client_off", "short_text", "pressure", "busy", "one_piece")
FANOUT_CUTS = ("even", "tapered", "stream")  # scheduler.runtime.fanout.Plan.cut
UNKNOWN_CLASS = "unknown"  # the class of a request refused before its text was read
DRAINING = "draining"  # the admission rejection reason of a request refused while draining


class Outcome(enum.Enum):
    """How a TTS request ended, as ``glmtts_sidecar_requests_total`` counts it."""

    OK = "ok"  # the backend answered success
    FAILED = "failed"  # the backend answered, not success: 200 with success false, or a 4xx
    BACKEND_ERROR = "backend_error"  # a 5xx from the backend, an answer cut short, or 502: it failed before answering
    REJECTED = "rejected"  # turned away by admission (429/503) or because the sidecar is draining
    DEADLINE = "deadline"  # 408: the deadline passed, queued or running
    CLIENT_GONE = "client_gone"  # the client left before its answer was complete
    INVALID = "invalid"  # refused at the edge: validation, authentication, too large


def classify(status: int, proxy_outcome: str) -> Outcome:
    """The metric outcome of a request: ``proxy_outcome`` is the access log's outcome (``ok``,
    ``failed``, ``backend_error``, ``backend_cut``, ``client_gone``; anything else, e.g.
    ``rejected``, means the sidecar answered itself with ``status``)."""
    direct = {"ok": Outcome.OK, "failed": Outcome.FAILED, "backend_error": Outcome.BACKEND_ERROR,
              "backend_cut": Outcome.BACKEND_ERROR, "client_gone": Outcome.CLIENT_GONE}
    if proxy_outcome in direct:
        return direct[proxy_outcome]
    if status == 408:
        return Outcome.DEADLINE
    if status in (429, 503):
        return Outcome.REJECTED
    if status >= 500:
        return Outcome.BACKEND_ERROR
    return Outcome.INVALID


@dataclass(frozen=True, kw_only=True)
class Sources:
    """Where the scrape-time collector reads the sidecar's state; each is called at every scrape
    and only reads (a scrape changes nothing: e.g. ``Dispatcher.slot_states`` for ``slots``)."""

    scheduler: Callable[[], Scheduler]  # the current one (a reload replaces it)
    bands: Callable[[], Sequence[str]]  # priority band names, index = band number
    backends: Callable[[], Sequence[Backend]]
    draining: Callable[[], bool]
    reloads: Callable[[], tuple[int, int]]  # configuration reloads applied, refused
    clock: Callable[[], float]  # the scheduler's clock (monotonic seconds)
    # Each backend's slot limit as scheduler.core.concurrency describes it (what slots: auto learned).
    slots: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None


class Metrics:
    """Owns the registry (a fresh one unless given) and every sidecar metric in it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests_total",
            "TTS requests (POST /api/v1/tts) answered, by length class, tenant and outcome. outcome: ok "
            "(backend answered success); failed (backend answered 200 with success false, or a 4xx); "
            "backend_error (backend 5xx, answer cut short, or 502 when the backend failed before answering); "
            "rejected (429/503 from admission, or 503 while draining); deadline (408, queued or running); "
            "client_gone (the client left first); invalid (refused at the edge: validation, 401, 413). "
            "class is 'unknown' and tenant 'default' for requests refused before their text or tenant was known.",
            ["class", "tenant", "outcome"], registry=r)
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "Seconds a TTS request waited from arrival until a backend slot was assigned (the last assignment "
            "when retried), by length class. Requests that left the queue without a slot are not observed.",
            ["class"], buckets=SECONDS_BUCKETS, registry=r)
        self.service = Histogram(
            PREFIX + "service_seconds",
            "Seconds from forwarding a TTS request to a backend until the backend's answer began (the synthesis), "
            "by length class; observed for every request that got an answer from a backend.",
            ["class"], buckets=SECONDS_BUCKETS, registry=r)
        self.duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Seconds a TTS request spent in the sidecar end to end, from arrival until its answer was sent or it "
            "ended otherwise, by length class; every request counted in glmtts_sidecar_requests_total.",
            ["class"], buckets=SECONDS_BUCKETS, registry=r)
        self.service_ratio = Histogram(
            PREFIX + "service_ratio",
            "Actual over predicted service seconds of successful TTS requests, by length class: how well the "
            "cost model predicts (1 = exact, above 1 = slower than predicted).",
            ["class"], buckets=RATIO_BUCKETS, registry=r)
        self.cache_requests = Counter(
            PREFIX + "cache_requests",
            "TTS requests (POST /api/v1/tts, POST /v1/audio/speech) looked up in the result cache while "
            "cache.enabled, by result: hit (answered from the cache: no queue place, no backend slot), miss "
            "(ran a synthesis of its own), shared (waited for an identical request's synthesis in flight).",
            ["result"], registry=r)
        for result in ("hit", "miss", "shared"):
            self.cache_requests.labels(result)
        self.cache_bytes = Gauge(
            PREFIX + "cache_bytes", "Bytes of backend answers held in the result cache now (bounded by "
            "cache.max_bytes).", registry=r)
        self.cache_entries = Gauge(
            PREFIX + "cache_entries", "Backend answers held in the result cache now (0 while cache.enabled is "
            "false).", registry=r)
        self.fanout_pieces = Histogram(
            PREFIX + "fanout_pieces",
            "Pieces a split TTS request (fanout) was synthesized in, observed once per split request.",
            buckets=PIECE_BUCKETS, registry=r)
        self.fanout_declined = Counter(
            PREFIX + "fanout_declined",
            "TTS requests synthesized whole rather than split (fanout), by reason: disabled (fanout.enabled is "
            "false and no X-Fanout: on), client_off (X-Fanout: off), short_text (under fanout.min_text_chars), "
            "pressure (a request was turned away for want of capacity, or a queued one ran out of time, in the "
            "last 30 s or that request's predicted service, whichever is longer), busy (fewer than 2 backend "
            "slots free when it arrived, or anything queued), one_piece (the text does not cut into 2 pieces).",
            ["reason"], registry=r)
        for reason in FANOUT_DECLINED:
            self.fanout_declined.labels(reason)
        self.fanout_cuts = Counter(
            PREFIX + "fanout_cuts",
            "Split TTS requests by how the text was cut: even (about fanout.pieces_per_slot even pieces per free "
            "slot), tapered (one big piece per free slot and smaller ones behind them, expected sooner under the "
            "measured service-time noise: fanout.taper), stream (a streamed answer: a short first piece, then "
            "even pieces).", ["cut"], registry=r)
        for cut in FANOUT_CUTS:
            self.fanout_cuts.labels(cut)
        self.first_audio = Histogram(
            PREFIX + "time_to_first_audio_seconds",
            "Seconds from the arrival of a streamed speech request (POST /v1/audio/speech with stream_format "
            "audio or sse) until its first audio bytes were sent, by stream_format.",
            ["stream_format"], buckets=SECONDS_BUCKETS, registry=r)
        Gauge(PREFIX + "build_info", "Always 1; labels: the sidecar's version and the Python version running it.",
              ["version", "python"], registry=r).labels(__version__, platform.python_version()).set(1)
        self.draining_rejections = 0
        self.rate_limited_rejections = 0
        self.sources: Sources | None = None
        r.register(_StateCollector(self))

    def fanout(self, *, pieces: int | None = None, cut: str | None = None, declined: str | None = None) -> None:
        """A TTS request was split into ``pieces`` (``cut`` one of FANOUT_CUTS), or synthesized whole
        for the ``declined`` reason."""
        if pieces is not None:
            self.fanout_pieces.observe(pieces)
        if cut is not None:
            self.fanout_cuts.labels(cut).inc()
        if declined is not None:
            self.fanout_declined.labels(declined).inc()

    def watch(self, sources: Sources) -> None:
        """Read state from ``sources`` at every scrape (before this, state metrics have no samples)."""
        self.sources = sources

    def prepare(self, classes: Iterable[str], tenants: Iterable[str]) -> None:
        """Create the series of every configured class and tenant at 0, so they exist before traffic."""
        classes, tenants = list(classes), list(tenants)
        for cls in classes:
            for histogram in (self.queue_wait, self.service, self.duration, self.service_ratio):
                histogram.labels(cls)
            for tenant in tenants:
                for outcome in Outcome:
                    self.requests.labels(cls, tenant, outcome.value)

    # --- events, reported by the proxy ----------------------------------------------------------

    def request_finished(self, *, cls: str, tenant: str, outcome: Outcome, total_s: float,
                         queue_s: float | None = None, service_s: float | None = None,
                         predicted_s: float | None = None) -> None:
        """One TTS request is over. ``queue_s``: None unless it got a backend slot; ``service_s``:
        None unless a backend answered; ``predicted_s``: its predicted service (for the ratio)."""
        self.requests.labels(cls, tenant, outcome.value).inc()
        self.duration.labels(cls).observe(max(0.0, total_s))
        if queue_s is not None:
            self.queue_wait.labels(cls).observe(max(0.0, queue_s))
        if service_s is not None:
            self.service.labels(cls).observe(max(0.0, service_s))
            if outcome is Outcome.OK and predicted_s:
                self.service_ratio.labels(cls).observe(service_s / predicted_s)

    def cache_request(self, result: str) -> None:
        """A TTS request was looked up in the result cache: ``hit``, ``miss`` or ``shared``."""
        self.cache_requests.labels(result).inc()

    def watch_cache(self, size: Callable[[], tuple[int, int]]) -> None:
        """Read the result cache's (bytes, entries) at every scrape."""
        self.cache_bytes.set_function(lambda: size()[0])
        self.cache_entries.set_function(lambda: size()[1])

    def draining_rejection(self) -> None:
        """A TTS request was refused because the sidecar is draining."""
        self.draining_rejections += 1

    def rate_limited_rejection(self) -> None:
        """A TTS request was refused because its tenant is over its request rate."""
        self.rate_limited_rejections += 1

    # --- serving ----------------------------------------------------------------------------------

    def handler(self) -> Handler:
        """The ``GET /metrics`` handler (Prometheus text format; OpenMetrics when asked for)."""
        return make_aiohttp_handler(self.registry)

    def separate_site(self, host: str, port: int, pages: Mapping[str, Handler] | None = None,
                      ) -> Callable[[web.Application], AsyncIterator[None]]:
        """A cleanup context serving /metrics and ``pages`` (more GET paths: the operator's views)
        on its own address, in this process."""
        async def site(_: web.Application) -> AsyncIterator[None]:
            app = web.Application()
            app.router.add_get("/metrics", self.handler())
            for path, handler in (pages or {}).items():
                app.router.add_get(path, handler, allow_head=False)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                log.error("cannot serve metrics on %s:%d: %s", host, port, exc)
                await runner.cleanup()
                raise
            log.info("metrics on http://%s:%d/metrics", host, port)
            try:
                yield
            finally:
                await runner.cleanup()

        return site


class _StateCollector(Collector):
    """The metrics that mirror state, computed from ``Metrics.sources`` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        sources = self._metrics.sources
        depth = GaugeMetricFamily(
            PREFIX + "queue_depth", "TTS requests waiting in the queue for a backend slot, by priority band.",
            labels=["band"])
        oldest = GaugeMetricFamily(
            PREFIX + "queue_oldest_wait_seconds",
            "Seconds the longest-waiting queued TTS request of each priority band has waited so far (0 when none).",
            labels=["band"])
        rejections = CounterMetricFamily(
            PREFIX + "admission_rejections",
            "TTS requests turned away before queueing, by reason: no_backend (503, nothing running or starting), "
            "queue_full (429), tenant_queue_full (429, the tenant's share of the queue), deadline_unmeetable "
            "(429, predicted wait plus service exceeds the deadline), draining (503, the sidecar is shutting down), "
            "rate_limited (429, the tenant is over its tenants.*.rate).",
            labels=["reason"])
        expiries = CounterMetricFamily(
            PREFIX + "deadline_expiries",
            "TTS requests answered 408 because their deadline passed, by where: queued (still waiting for a slot), "
            "shed (still waiting at their latest start, deadline less predicted service: answered then, before "
            "the deadline, as they could no longer finish in time) or running (the backend was still working; "
            "its slot stays busy until it finishes).",
            labels=["where"])
        orphaned = CounterMetricFamily(
            PREFIX + "orphaned_backend_seconds",
            "Backend seconds spent on requests whose client had already been answered 408 (GLM-TTS cannot "
            "cancel work): capacity lost to missed deadlines.")
        state = GaugeMetricFamily(
            PREFIX + "backend_state",
            "1 for each backend's current lifecycle state, 0 for its other states: starting, warming, ready "
            "(takes traffic), unhealthy, draining, restarting, failed (crash loop cool-down), stopping, stopped.",
            labels=["backend", "state"])
        in_flight = GaugeMetricFamily(
            PREFIX + "backend_in_flight",
            "TTS requests a backend holds a slot for right now (including orphaned work).", labels=["backend"])
        restarts = CounterMetricFamily(
            PREFIX + "backend_restarts",
            "Times a backend was restarted: exits, failed starts or warm-ups, watchdog kills, operator restarts.",
            labels=["backend"])
        health_failures = CounterMetricFamily(
            PREFIX + "backend_health_failures",
            "Health checks of a backend that failed while it was up (ready or unhealthy).", labels=["backend"])
        reloads = CounterMetricFamily(
            PREFIX + "backend_model_reloads",
            "Requests dispatched to a backend that had another model configuration (sample_rate, use_phoneme) "
            "loaded, so it switches configuration first.", labels=["backend"])
        slots = GaugeMetricFamily(
            PREFIX + "backend_slots",
            "Requests a backend may hold at once right now: backends.slots when it is a number; with "
            "slots: auto, the limit learned for this backend (1..backends.max_slots).", labels=["backend"])
        level_throughput = GaugeMetricFamily(
            PREFIX + "backend_throughput_ratio",
            "slots: auto only: seconds of solo (one-at-a-time) work a backend completes per second with `level` "
            "requests in flight, as learned from recent completions; levels not yet measured are absent.",
            labels=["backend", "level"])
        level_stretch = GaugeMetricFamily(
            PREFIX + "backend_stretch_ratio",
            "slots: auto only: how many times its solo time a request takes on a backend with `level` requests "
            "in flight, as learned from recent completions; levels not yet measured are absent.",
            labels=["backend", "level"])
        slow = GaugeMetricFamily(
            PREFIX + "backend_slow",
            "1 when the cost model flags a backend slow (its actual/predicted service average exceeds "
            "cost.slow_ratio over at least cost.slow_min_samples requests), else 0.", labels=["backend"])
        ready = GaugeMetricFamily(PREFIX + "backends_ready", "Backends in state ready: taking TTS traffic.")
        config_reloads = CounterMetricFamily(
            PREFIX + "config_reloads",
            "Configuration reloads (SIGHUP or POST /admin/reload), by result: ok (applied) or failed (the file "
            "was invalid; the running configuration was kept).", labels=["result"])
        draining = GaugeMetricFamily(
            PREFIX + "draining", "1 while the sidecar is draining (refusing new requests before it stops), else 0.")
        families: list[Metric] = [depth, oldest, rejections, expiries, orphaned, state, in_flight, slots,
                                  level_throughput, level_stretch, restarts, health_failures, reloads, slow, ready,
                                  config_reloads, draining]
        if sources is None:
            return families
        scheduler = sources.scheduler()
        now = sources.clock()
        bands = list(sources.bands())
        count: Tally[str] = Tally()
        waited = dict.fromkeys(bands, 0.0)
        for job in scheduler.queue.jobs():
            band = bands[job.band] if job.band < len(bands) else str(job.band)
            count[band] += 1
            waited[band] = max(waited.get(band, 0.0), now - job.arrived_at)
        for band, seconds in waited.items():
            depth.add_metric([band], count[band])
            oldest.add_metric([band], max(0.0, seconds))
        tally = scheduler.tally
        rejected = {reason.value: tally.rejected.get(reason.value, 0) for reason in Reason}
        rejected[DRAINING] = self._metrics.draining_rejections
        rejected[RateLimited.reason] = self._metrics.rate_limited_rejections
        for reason, n in rejected.items():
            rejections.add_metric([reason], n)
        expiries.add_metric(["queued"], tally.expired_queued)
        expiries.add_metric(["shed"], tally.shed)
        expiries.add_metric(["running"], tally.expired_running)
        orphaned.add_metric([], tally.orphaned_s)
        flagged = scheduler.cost.slow_backends()
        backends = list(sources.backends())
        learned = sources.slots() if sources.slots is not None else {}
        for backend in backends:
            limit = learned.get(backend.id, {})
            slots.add_metric([backend.id], limit.get("slots", backend.slots))
            for level, seen in limit.get("levels", {}).items():
                if seen.get("throughput") is not None:
                    level_throughput.add_metric([backend.id, level], seen["throughput"])
                if seen.get("stretch") is not None:
                    level_stretch.add_metric([backend.id, level], seen["stretch"])
            for value in BackendState:
                state.add_metric([backend.id, value.value], 1.0 if backend.state is value else 0.0)
            in_flight.add_metric([backend.id], backend.in_flight)
            restarts.add_metric([backend.id], backend.restarts)
            health_failures.add_metric([backend.id], backend.health_failures)
            reloads.add_metric([backend.id], backend.model_reloads)
            slow.add_metric([backend.id], 1.0 if backend.id in flagged else 0.0)
        ready.add_metric([], sum(1 for b in backends if b.state is BackendState.READY))
        applied, refused = sources.reloads()
        config_reloads.add_metric(["ok"], applied)
        config_reloads.add_metric(["failed"], refused)
        draining.add_metric([], 1.0 if sources.draining() else 0.0)
        return families
