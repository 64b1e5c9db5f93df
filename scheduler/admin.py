"""Upstream's endpoints other than TTS: reads go to one ready backend, writes to every backend.

A prompt write or clear_cache changes per-process state, so it is sent to every backend that is
running, and the clients get one combined answer: the backends' common answer when they agree,
else 502 with each backend's answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from backend.client import Answer, BackendTimeout, BackendUnavailable
from backend.pool import Backend
from backend.state import BackendState
from glmtts.contract import LONG_TEXT_THRESHOLD, upstream_length_class
from glmtts.responses import json_response
from scheduler.control import Control
from scheduler.errors import NoBackend
from scheduler.proxy import REQUEST_ID, Proxy, error_response

log = logging.getLogger("glmtts_sidecar.admin")

ADMIN_TIMEOUT_S = 30.0
# Backends that are up, or may be: a write must reach every process that will serve traffic.
WRITABLE = (BackendState.WARMING, BackendState.READY, BackendState.UNHEALTHY, BackendState.DRAINING)


class Admin:
    def __init__(self, proxy: Proxy, control: Control) -> None:
        self.proxy = proxy
        self.control = control

    # --- reads: one ready backend -------------------------------------------------------------

    async def forward_read(self, request: web.Request) -> web.Response:
        try:
            backend = self.proxy.pick_ready()
        except NoBackend as exc:
            return error_response(exc)
        try:
            answer = await self._exchange(backend, request.method, request.path_qs, None, request)
        except (BackendUnavailable, BackendTimeout) as exc:
            self.proxy.pool.report_failure(backend, str(exc))
            return error_response(NoBackend(f"Backend {backend.id} did not answer: {exc}", retry_after=1.0))
        return self._relay(answer, backend.id)

    # --- writes: every backend ----------------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        return self.proxy.config.admin.allows(request.headers.get("Authorization"))

    async def fan_out(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return unauthorized()
        body = await request.read()
        targets = [b for b in self.proxy.pool.backends if b.state in WRITABLE]
        if not targets:
            return error_response(NoBackend("No backend is running to apply this change", retry_after=1.0))
        results = await asyncio.gather(
            *(self._exchange(b, request.method, request.path_qs, body, request) for b in targets),
            return_exceptions=True)
        answers: dict[str, Answer] = {}
        failures: dict[str, str] = {}
        for backend, result in zip(targets, results, strict=True):
            if isinstance(result, Answer):
                answers[backend.id] = result
            elif isinstance(result, BaseException):
                self.proxy.pool.report_failure(backend, str(result))
                failures[backend.id] = str(result)
        if request.path == "/api/v1/clear_cache":
            for backend in targets:
                if backend.id in answers and answers[backend.id].status == 200:
                    backend.model_key = None
        await self.proxy.prompts.refresh()
        distinct = {(a.status, a.body) for a in answers.values()}
        if not failures and len(distinct) == 1:
            return self._relay(next(iter(answers.values())), ",".join(answers))
        log.error("%s %s: backends disagree or failed: %s", request.method, request.path,
                  {**{k: a.status for k, a in answers.items()}, **failures})
        return json_response({
            "detail": "Backends gave different answers; their prompt caches may now differ",
            "reason": "partial_failure",
            "backends": [*({"id": k, "status": a.status, "body": _maybe_json(a.body)} for k, a in answers.items()),
                         *({"id": k, "status": None, "error": e} for k, e in failures.items())],
        }, 502)

    async def _exchange(self, backend: Backend, method: str, path: str, body: bytes | None,
                        request: web.Request) -> Answer:
        headers = {REQUEST_ID: request["request_id"]}
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        return await self.proxy.client.exchange(method, backend.url + path, body=body, headers=headers,
                                                timeout=ADMIN_TIMEOUT_S)

    @staticmethod
    def _relay(answer: Answer, backend_ids: str) -> web.Response:
        headers = {"X-Backend": backend_ids}
        for name in ("Content-Type", "Allow"):
            if name in answer.headers:
                headers[name] = answer.headers[name]
        return web.Response(body=answer.body, status=answer.status, headers=headers)

    # --- computed by the sidecar --------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """Upstream's shape, aggregated over the pool: healthy while any backend is ready."""
        ready = self.proxy.ready_backends()
        loaded = next((b for b in ready if b.model_key is not None), None)
        indexes = self.proxy.prompts.indexes
        payload = {
            "status": "healthy" if ready else "unhealthy",
            "model_loaded": loaded is not None,
            "model_sample_rate": loaded.model_key[0] if loaded and loaded.model_key else None,
            "model_use_phoneme": loaded.model_key[1] if loaded and loaded.model_key else None,
            "prompt_cache_count": len(indexes) if indexes is not None else 0,
            "backends": [b.as_json() for b in self.proxy.pool.backends],
        }
        return json_response(payload, 200 if ready else 503)

    async def concurrency(self, request: web.Request) -> web.Response:
        """Upstream's shape for the pool: upstream's short/long split at 200 characters, limits from
        backend slots and the length classes' caps; plus the queue."""
        proxy = self.proxy
        scheduler = proxy.scheduler
        proxy.dispatcher.views()  # brings every backend's slot limit up to date
        slots = sum(b.slots for b in proxy.ready_backends())
        long_cap = scheduler.classes.cap(scheduler.classes.of(LONG_TEXT_THRESHOLD + 1).name, slots)
        limits = {"short_text": slots, "long_text": slots if long_cap is None else long_cap}
        active = {"short_text": 0, "long_text": 0}
        for run in scheduler.running.values():
            active[upstream_length_class(run.job.chars)] += 1
        stats = {cls: {"active": active[cls], "total": proxy.served[cls], "limit": limits[cls],
                       "available": max(0, limits[cls] - active[cls])} for cls in active}
        tiers = proxy.config.deadlines
        backends = len(proxy.pool.backends)
        return json_response({
            "success": True,
            "stats": stats,
            "config": {
                "concurrency": {"short_text": limits["short_text"], "long_text": limits["long_text"],
                                "threshold": LONG_TEXT_THRESHOLD},
                "timeout": {"short_text": tiers.tier_for(50), "medium_text": tiers.tier_for(LONG_TEXT_THRESHOLD),
                            "long_text": tiers.tier_for(LONG_TEXT_THRESHOLD + 1)},
                "queue": {"max_size": scheduler.queue.max_size, "worker_count": backends, "enabled": True},
                "workers": backends,
            },
            "queue": scheduler.status(proxy.dispatcher.clock()),
        })

    async def queue_status(self, request: web.Request) -> web.Response:
        """Queue depth by band, tenant and class; predicted waits for a new request; backends."""
        proxy = self.proxy
        scheduler = proxy.scheduler
        now = proxy.dispatcher.clock()
        status = scheduler.status(now)
        status["by_band"] = {proxy.tenants.band_names[b]: n for b, n in status["by_band"].items()}
        views = proxy.dispatcher.views()
        estimates = {}
        for name, chars, units in (("short", 20, 20.0), ("long", 500, 500.0)):
            job = scheduler.make_job(id="~estimate", chars=chars, units=units, model_key=(24000, False), now=now,
                                     band=proxy.tenants.default_band)
            outlook = scheduler.outlook(job, now, views)
            estimates[name] = {"chars": chars, "wait_s": round(outlook.wait_s, 3),
                               "service_s": round(outlook.service_s, 3), "deadline_s": round(outlook.budget_s, 3)}
        return json_response({
            **status,
            "policy": {"order": proxy.config.queue.order, "deadlines": proxy.config.deadlines.policy,
                       "bands": list(proxy.tenants.band_names), "tenants": proxy.tenants.names},
            "estimates": estimates,
            "cost": scheduler.cost.describe(),
            "slow_backends": sorted(scheduler.cost.slow_backends()),
            "slots": proxy.dispatcher.slot_states(),
            "backends": [b.as_json() for b in proxy.pool.backends],
        })

    # --- /admin ---------------------------------------------------------------------------------

    async def reload(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return unauthorized()
        result = await self.control.reload("POST /admin/reload")
        if not result.ok:
            return json_response({"detail": "The configuration file is invalid; the running one is kept",
                                  "reason": "invalid_config", "problems": result.problems}, 400)
        return json_response({"reloaded": True, "changed": result.changed, "needs_restart": result.ignored})

    async def drain(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return unauthorized()
        self.control.drain("POST /admin/drain")
        scheduler = self.proxy.scheduler
        return json_response({"draining": True, "queued": len(scheduler.queue), "running": len(scheduler.running),
                              "drain_timeout_s": self.proxy.config.shutdown.drain_timeout_s}, 202)

    async def restart_backend(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return unauthorized()
        backend_id = request.match_info["backend_id"]
        try:
            self.control.restart_backend(backend_id)
        except KeyError:
            return json_response({"detail": f"No backend {backend_id!r}", "reason": "unknown_backend"}, 404)
        return json_response({"restarting": backend_id}, 202)

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = len(self.proxy.ready_backends())
        ok = ready > 0 and not self.proxy.draining
        return json_response({"ready": ok, "ready_backends": ready, "draining": self.proxy.draining},
                             200 if ok else 503)


async def fetch_prompt_indexes(proxy: Proxy) -> set[str] | None:
    """The prompt indexes of one ready backend, or None when none answers."""
    for backend in proxy.ready_backends():
        try:
            answer = await proxy.client.exchange("GET", backend.url + "/api/v1/prompts", timeout=5.0)
        except (BackendUnavailable, BackendTimeout):
            continue
        if answer.status == 200:
            try:
                return {item["index"] for item in json.loads(answer.body)["prompts"]}
            except (ValueError, KeyError, TypeError):
                log.warning("backend %s: unreadable prompt list", backend.id)
    return None


def unauthorized() -> web.Response:
    return json_response({"detail": "This endpoint needs the admin token (Authorization: Bearer <token>)",
                          "reason": "unauthorized"}, 401, {"WWW-Authenticate": "Bearer"})


def _maybe_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
