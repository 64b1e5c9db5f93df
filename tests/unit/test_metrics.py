"""scheduler.runtime.metrics: driven with fake events and a real (pure) scheduler, read from a fresh registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backend.pool import Backend
from backend.state import BackendState
from scheduler.config import ClassConfig, SidecarConfig
from scheduler.core.admission import Rejection
from scheduler.core.concurrency import AdaptiveLimit, SlotPolicy
from scheduler.core.queue import Job
from scheduler.core.running import BackendView
from scheduler.core.scheduler import Scheduler
from scheduler.runtime.build import build_scheduler
from scheduler.runtime.dispatcher import Dispatcher
from scheduler.runtime.metrics import Metrics, Outcome, Sources, classify

BANDS = ("interactive", "standard", "batch")


@dataclass
class World:
    """What the collector reads, as plain mutable fields."""

    scheduler: Scheduler
    backends: list[Backend]
    now: float = 100.0
    draining: bool = False
    reloads: tuple[int, int] = (0, 0)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


@pytest.fixture
def world(metrics: Metrics) -> World:
    config = SidecarConfig(classes=(ClassConfig(name="any", max_chars=None),))  # requests keep their band
    w = World(scheduler=build_scheduler(config), backends=[Backend(spec) for spec in config.backends.layout()])
    metrics.watch(Sources(scheduler=lambda: w.scheduler, bands=lambda: BANDS, backends=lambda: w.backends,
                          draining=lambda: w.draining, reloads=lambda: w.reloads, clock=lambda: w.now))
    return w


def views(world: World) -> list[BackendView]:
    return [BackendView(id=b.id, ready=b.state is BackendState.READY, alive=True, slots=1, model_key=b.model_key)
            for b in world.backends]


def offer(world: World, id: str, *, band: int, at: float, chars: int = 10, tenant: str = "default") -> Job:
    job = world.scheduler.make_job(id=id, chars=chars, units=float(chars), model_key=(24000, False), now=at,
                                   band=band, tenant=tenant)
    assert world.scheduler.offer(job, at, views(world)) is None
    return job


@pytest.mark.parametrize(("status", "proxy_outcome", "expected"), [
    (200, "ok", Outcome.OK),
    (200, "failed", Outcome.FAILED),
    (422, "failed", Outcome.FAILED),  # a 4xx from the backend
    (500, "backend_error", Outcome.BACKEND_ERROR),
    (200, "backend_cut", Outcome.BACKEND_ERROR),
    (502, "rejected", Outcome.BACKEND_ERROR),  # BackendFailed: it went away before answering
    (429, "rejected", Outcome.REJECTED),
    (503, "rejected", Outcome.REJECTED),
    (503, "refused", Outcome.REJECTED),  # draining, at the edge
    (408, "rejected", Outcome.DEADLINE),
    (0, "client_gone", Outcome.CLIENT_GONE),
    (200, "client_gone", Outcome.CLIENT_GONE),
    (400, "refused", Outcome.INVALID),
    (401, "refused", Outcome.INVALID),
    (413, "refused", Outcome.INVALID),
    (422, "refused", Outcome.INVALID),
])
def test_classify(status: int, proxy_outcome: str, expected: Outcome) -> None:
    assert classify(status, proxy_outcome) is expected


def test_a_finished_request_moves_its_counter_and_histograms(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.request_finished(cls="short", tenant="acme", outcome=Outcome.OK, total_s=1.5, queue_s=0.3,
                             service_s=1.2, predicted_s=1.0)
    metrics.request_finished(cls="short", tenant="acme", outcome=Outcome.DEADLINE, total_s=60.0, queue_s=None)
    value = registry.get_sample_value
    assert value("glmtts_sidecar_requests_total", {"class": "short", "tenant": "acme", "outcome": "ok"}) == 1
    assert value("glmtts_sidecar_requests_total", {"class": "short", "tenant": "acme", "outcome": "deadline"}) == 1
    assert value("glmtts_sidecar_request_duration_seconds_count", {"class": "short"}) == 2
    assert value("glmtts_sidecar_request_duration_seconds_sum", {"class": "short"}) == 61.5
    assert value("glmtts_sidecar_request_duration_seconds_bucket", {"class": "short", "le": "2.5"}) == 1
    assert value("glmtts_sidecar_request_duration_seconds_bucket", {"class": "short", "le": "900.0"}) == 2
    assert value("glmtts_sidecar_queue_wait_seconds_count", {"class": "short"}) == 1  # the 408 never got a slot
    assert value("glmtts_sidecar_queue_wait_seconds_bucket", {"class": "short", "le": "0.25"}) == 0
    assert value("glmtts_sidecar_queue_wait_seconds_bucket", {"class": "short", "le": "0.5"}) == 1
    assert value("glmtts_sidecar_service_seconds_sum", {"class": "short"}) == 1.2
    assert value("glmtts_sidecar_service_ratio_bucket", {"class": "short", "le": "1.0"}) == 0
    assert value("glmtts_sidecar_service_ratio_bucket", {"class": "short", "le": "1.25"}) == 1


def test_only_successes_feed_the_service_ratio(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.request_finished(cls="long", tenant="default", outcome=Outcome.FAILED, total_s=2.0, queue_s=0.0,
                             service_s=2.0, predicted_s=1.0)
    assert registry.get_sample_value("glmtts_sidecar_service_seconds_count", {"class": "long"}) == 1
    assert registry.get_sample_value("glmtts_sidecar_service_ratio_count", {"class": "long"}) is None


def test_prepare_creates_every_configured_series_at_zero(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.prepare(["short", "long"], ["default", "acme"])
    for outcome in Outcome:
        assert registry.get_sample_value(
            "glmtts_sidecar_requests_total", {"class": "long", "tenant": "acme", "outcome": outcome.value}) == 0
    assert registry.get_sample_value("glmtts_sidecar_service_ratio_count", {"class": "short"}) == 0


def test_queue_gauges_are_computed_at_scrape(world: World, registry: CollectorRegistry) -> None:
    value = registry.get_sample_value
    assert value("glmtts_sidecar_queue_depth", {"band": "batch"}) == 0
    offer(world, "a", band=0, at=90.0)
    offer(world, "b", band=2, at=70.0)
    offer(world, "c", band=2, at=95.0)
    assert value("glmtts_sidecar_queue_depth", {"band": "interactive"}) == 1
    assert value("glmtts_sidecar_queue_depth", {"band": "standard"}) == 0
    assert value("glmtts_sidecar_queue_depth", {"band": "batch"}) == 2
    assert value("glmtts_sidecar_queue_oldest_wait_seconds", {"band": "batch"}) == 30.0
    assert value("glmtts_sidecar_queue_oldest_wait_seconds", {"band": "standard"}) == 0
    world.now = 110.0
    assert value("glmtts_sidecar_queue_oldest_wait_seconds", {"band": "batch"}) == 40.0
    world.scheduler.cancel("b")
    assert value("glmtts_sidecar_queue_oldest_wait_seconds", {"band": "batch"}) == 15.0
    assert value("glmtts_sidecar_queue_depth", {"band": "batch"}) == 1


def test_the_tally_is_read_as_counters(world: World, metrics: Metrics, registry: CollectorRegistry) -> None:
    value = registry.get_sample_value
    for reason in ("no_backend", "queue_full", "tenant_queue_full", "deadline_unmeetable", "draining"):
        assert value("glmtts_sidecar_admission_rejections_total", {"reason": reason}) == 0
    tally = world.scheduler.tally
    tally.rejected["queue_full"] += 3
    tally.expired_queued, tally.expired_running, tally.orphaned_s = 2, 1, 4.5
    metrics.draining_rejection()
    assert value("glmtts_sidecar_admission_rejections_total", {"reason": "queue_full"}) == 3
    assert value("glmtts_sidecar_admission_rejections_total", {"reason": "draining"}) == 1
    assert value("glmtts_sidecar_deadline_expiries_total", {"where": "queued"}) == 2
    assert value("glmtts_sidecar_deadline_expiries_total", {"where": "running"}) == 1
    assert value("glmtts_sidecar_orphaned_backend_seconds_total") == 4.5


def test_backend_series_follow_the_pool(world: World, registry: CollectorRegistry) -> None:
    value = registry.get_sample_value
    first, second = world.backends
    first.state, first.in_flight, first.restarts = BackendState.READY, 1, 2
    first.health_failures, first.model_reloads = 3, 4
    assert value("glmtts_sidecar_backend_state", {"backend": first.id, "state": "ready"}) == 1
    assert value("glmtts_sidecar_backend_state", {"backend": first.id, "state": "starting"}) == 0
    assert value("glmtts_sidecar_backend_state", {"backend": second.id, "state": "starting"}) == 1
    states = [value("glmtts_sidecar_backend_state", {"backend": second.id, "state": s.value}) for s in BackendState]
    assert sorted(states) == [0.0] * (len(BackendState) - 1) + [1.0]
    assert value("glmtts_sidecar_backend_in_flight", {"backend": first.id}) == 1
    assert value("glmtts_sidecar_backend_restarts_total", {"backend": first.id}) == 2
    assert value("glmtts_sidecar_backend_health_failures_total", {"backend": first.id}) == 3
    assert value("glmtts_sidecar_backend_model_reloads_total", {"backend": first.id}) == 4
    assert value("glmtts_sidecar_backends_ready") == 1
    assert value("glmtts_sidecar_backend_slow", {"backend": first.id}) == 0
    cost = world.scheduler.cost
    for _ in range(cost.priors.slow_min_samples):
        cost.observe(10.0, (24000, False), 100.0, backend_id=first.id)
        cost.observe(10.0, (24000, False), 0.1, backend_id=second.id)
    assert value("glmtts_sidecar_backend_slow", {"backend": first.id}) == 1
    assert value("glmtts_sidecar_backend_slow", {"backend": second.id}) == 0
    world.backends.remove(second)  # a topology change removed it: its series go with it
    assert value("glmtts_sidecar_backend_in_flight", {"backend": second.id}) is None
    assert value("glmtts_sidecar_backend_state", {"backend": second.id, "state": "starting"}) is None


def test_slot_limits_fixed_and_learned(world: World, registry: CollectorRegistry, metrics: Metrics) -> None:
    value = registry.get_sample_value
    first, second = world.backends
    first.slots = 2
    assert value("glmtts_sidecar_backend_slots", {"backend": first.id}) == 2  # without a slots source: the backend's
    assert value("glmtts_sidecar_backend_throughput_ratio", {"backend": first.id, "level": "1"}) is None
    dispatcher = Dispatcher(world.scheduler, lambda: world.backends, slots=SlotPolicy(fixed=None),
                            clock=lambda: world.now)
    metrics.watch(dataclasses.replace(metrics.sources, slots=dispatcher.slot_states))
    first.state = BackendState.READY
    dispatcher.pump()  # the pool's change notice
    limit = dispatcher.limit(first)
    assert isinstance(limit, AdaptiveLimit)
    for i in range(2 * limit.settings.samples):  # a warm-up cohort, then one at a time, each twice its solo estimate
        limit.dispatched(f"j{i}", world.now + i, 1)
        limit.released(f"j{i}", world.now + i + 0.5, 0, work_s=0.25, budget_s=60.0, ok=True)
    assert value("glmtts_sidecar_backend_slots", {"backend": first.id}) == 1
    assert value("glmtts_sidecar_backend_slots", {"backend": second.id}) == 1
    assert value("glmtts_sidecar_backend_throughput_ratio", {"backend": first.id, "level": "1"}) == 0.5
    assert value("glmtts_sidecar_backend_stretch_ratio", {"backend": first.id, "level": "1"}) == 2.0
    assert value("glmtts_sidecar_backend_stretch_ratio", {"backend": first.id, "level": "2"}) is None
    assert first.as_json()["slots"] == 1 and first.as_json()["slot_mode"] == "auto"


def test_a_scrape_changes_no_slot_limit(world: World, registry: CollectorRegistry, metrics: Metrics) -> None:
    first, second = world.backends
    first.state = BackendState.READY  # the second is starting: a limit the dispatcher resets on its events
    dispatcher = Dispatcher(world.scheduler, lambda: world.backends, slots=SlotPolicy(fixed=None),
                            clock=lambda: world.now)
    metrics.watch(dataclasses.replace(metrics.sources, slots=dispatcher.slot_states))
    dispatcher.pump()  # the pool's change notice
    learned, starting = dispatcher.limit(first), dispatcher.limit(second)
    assert isinstance(learned, AdaptiveLimit) and isinstance(starting, AdaptiveLimit)
    epochs = (learned._epoch, starting._epoch)
    first.restarts += 1  # restarted, not noticed yet
    for _ in range(3):
        generate_latest(registry)
    assert (learned._epoch, starting._epoch) == epochs
    assert dispatcher.limit(first) is learned and dispatcher.limit(second) is starting


def test_reloads_draining_and_build_info(world: World, registry: CollectorRegistry) -> None:
    value = registry.get_sample_value
    assert value("glmtts_sidecar_draining") == 0
    world.draining, world.reloads = True, (3, 1)
    assert value("glmtts_sidecar_draining") == 1
    assert value("glmtts_sidecar_config_reloads_total", {"result": "ok"}) == 3
    assert value("glmtts_sidecar_config_reloads_total", {"result": "failed"}) == 1
    info = next(m for m in registry.collect() if m.name == "glmtts_sidecar_build_info")
    assert [(s.labels.keys(), s.value) for s in info.samples] == [({"version", "python"}, 1.0)]


def test_every_metric_is_named_documented_and_exposed(world: World, metrics: Metrics,
                                                      registry: CollectorRegistry) -> None:
    metrics.prepare(["short"], ["default"])
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
                if not f.name.endswith("_created")}  # the client's creation timestamps of counters and histograms
    expected = {
        "requests": "counter", "admission_rejections": "counter", "queue_depth": "gauge",
        "queue_oldest_wait_seconds": "gauge", "queue_wait_seconds": "histogram", "service_seconds": "histogram",
        "request_duration_seconds": "histogram", "service_ratio": "histogram", "backend_state": "gauge",
        "backend_in_flight": "gauge", "backend_slots": "gauge", "backend_throughput_ratio": "gauge",
        "backend_stretch_ratio": "gauge", "backend_restarts": "counter", "backend_health_failures": "counter",
        "backend_model_reloads": "counter", "backend_slow": "gauge", "backends_ready": "gauge",
        "orphaned_backend_seconds": "counter", "deadline_expiries": "counter", "config_reloads": "counter",
        "draining": "gauge", "build_info": "gauge", "cache_requests": "counter", "cache_bytes": "gauge",
        "cache_entries": "gauge", "fanout_pieces": "histogram", "fanout_declined": "counter", "fanout_cuts": "counter",
        "time_to_first_audio_seconds": "histogram",
    }
    assert {name: f.type for name, f in families.items()} == {f"glmtts_sidecar_{n}": t for n, t in expected.items()}
    for family in families.values():
        assert len(family.documentation) > 30, family.name


def test_state_metrics_are_empty_until_watched(metrics: Metrics, registry: CollectorRegistry) -> None:
    assert registry.get_sample_value("glmtts_sidecar_backends_ready") is None
    assert b"# HELP glmtts_sidecar_queue_depth" in generate_latest(registry)


async def test_the_dispatcher_counts_a_model_switch_on_the_backend(world: World) -> None:
    backend = world.backends[0]
    backend.state, backend.model_key = BackendState.READY, (32000, True)
    dispatcher = Dispatcher(world.scheduler, lambda: world.backends[:1], slots=1)
    job = world.scheduler.make_job(id="j", chars=10, units=10.0, model_key=(24000, False), now=dispatcher.clock())
    future = dispatcher.offer(job)
    assert not isinstance(future, Rejection), future
    assert await future is backend
    assert backend.model_reloads == 1
    dispatcher.finish(job, backend, ok=True)
    dispatcher.close()
