"""Upstream's endpoints other than TTS: reads go to one ready backend, writes to every backend.

A prompt write or clear_cache changes per-process state, so it is sent to every backend that is
running, and the clients get one combined answer: the backends' common answer when they agree,
else 502 with each backend's answer. Either way the result cache forgets what the write may
change. With ``prompts.allowed_dirs`` set, a prompt write naming a file outside those directories
is refused before any backend sees it.

What anonymous callers see of the sidecar is upstream's: /api/v1/health in upstream's shape, and
of /api/v1/queue the depth and the estimates a client can act on. The details (backends, tenants,
the cost model, slots) need the admin token, or the metrics listener (the operator's port).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from backend.record import Backend
from backend.state import BackendState
from backend.transport import Answer, BackendTimeout, BackendUnavailable
from glmtts.contract import LONG_TEXT_THRESHOLD, parse_prompt_add, upstream_length_class
from glmtts.errors import HTTPDetailError
from glmtts.responses import json_response
from scheduler.errors import InvalidConfig, NoBackend, PartialFailure, PromptPathNotAllowed, UnknownBackend
from scheduler.http.auth import is_admin, require_admin
from scheduler.http.middleware import REQUEST_ID, request_id_of
from scheduler.runtime.context import Runtime
from scheduler.runtime.control import Control
from scheduler.runtime.prompts import written_audio_path

log = logging.getLogger("glmtts_sidecar.admin")

ADMIN_TIMEOUT_S = 30.0
# Backends that are up, or may be: a write must reach every process that will serve traffic.
WRITABLE = (BackendState.WARMING, BackendState.READY, BackendState.UNHEALTHY, BackendState.DRAINING)
# What anyone may read of the queue's state: how busy it is, by priority band and length class.
PUBLIC_QUEUE = ("depth", "max_size", "oldest_wait_s", "by_band", "by_class", "in_service", "in_service_by_class")


class Admin:
    def __init__(self, runtime: Runtime, control: Control) -> None:
        self.runtime = runtime
        self.control = control

    # --- reads: one ready backend -------------------------------------------------------------

    async def forward_read(self, request: web.Request) -> web.Response:
        backend = self.runtime.pick_ready()
        try:
            answer = await self._exchange(backend, request.method, request.path_qs, None, request)
        except (BackendUnavailable, BackendTimeout) as exc:
            self.runtime.pool.report_failure(backend, str(exc))  # the why (with its URL) is the operator's
            raise NoBackend(f"Backend {backend.id} did not answer", retry_after=1.0) from None
        return self._relay(answer, backend.id)

    # --- writes: every backend ----------------------------------------------------------------

    async def fan_out(self, request: web.Request) -> web.Response:
        require_admin(request, self.runtime.config.admin)
        return await self._fan_out(request, await request.read())

    async def write_prompt(self, request: web.Request) -> web.Response:
        """POST /api/v1/prompts, PUT /api/v1/prompts/{index}: fanned out once the file it names
        passes ``prompts.allowed_dirs``."""
        require_admin(request, self.runtime.config.admin)
        body = await request.read()
        prompts = self.runtime.config.prompts
        if prompts.allowed_dirs:
            cwd = self.runtime.config.backends.cwd or Path.cwd()  # where a managed backend runs
            content_type = request.headers.get("Content-Type")

            def permitted() -> bool:  # parsing a large form and resolving a path: off the loop
                return prompts.permits(written_audio_path(request.method, content_type, body), cwd)

            # An invalid form raises upstream's answer (glmtts.errors.HTTPDetailError).
            if not await asyncio.to_thread(permitted):
                # The same answer whether or not the file exists: no probing of the server's files.
                raise PromptPathNotAllowed("prompt_audio_path is outside the directories prompts.allowed_dirs permits")
        return await self._fan_out(request, body)

    async def _fan_out(self, request: web.Request, body: bytes) -> web.Response:
        targets = [b for b in self.runtime.pool.backends if b.state in WRITABLE]
        if not targets:
            raise NoBackend("No backend is running to apply this change", retry_after=1.0)
        results = await asyncio.gather(
            *(self._exchange(b, request.method, request.path_qs, body, request) for b in targets),
            return_exceptions=True)
        answers: dict[str, Answer] = {}
        failures: dict[str, str] = {}
        for backend, result in zip(targets, results, strict=True):
            if isinstance(result, Answer):
                answers[backend.id] = result
            elif isinstance(result, BaseException):
                self.runtime.pool.report_failure(backend, str(result))
                failures[backend.id] = str(result)
        if request.path == "/api/v1/clear_cache":
            for backend in targets:
                if backend.id in answers and answers[backend.id].status == 200:
                    backend.model_key = None
        await self._invalidate(request, body)
        await self.runtime.prompts.refresh()
        distinct = {(a.status, a.body) for a in answers.values()}
        if not failures and len(distinct) == 1:
            return self._relay(next(iter(answers.values())), ",".join(answers))
        log.error("%s %s: backends disagree or failed: %s", request.method, request.path,
                  {**{k: a.status for k, a in answers.items()}, **failures})
        raise PartialFailure(
            "Backends gave different answers; their prompt caches may now differ",
            backends=[*({"id": k, "status": a.status, "body": _maybe_json(a.body)} for k, a in answers.items()),
                      *({"id": k, "status": None, "error": e} for k, e in failures.items())])

    async def _invalidate(self, request: web.Request, body: bytes) -> None:
        """A write went out (whatever the backends answered: some may have applied it): cached TTS
        answers it may change can never be served again. A prompt write bumps its index's
        generation, clear_cache (or a prompt add whose index cannot be read) the global one."""
        cache = self.runtime.cache
        index = request.match_info.get("index")
        if index is None and request.method == "POST" and request.path == "/api/v1/prompts":
            content_type = request.headers.get("Content-Type")
            try:
                index = (await asyncio.to_thread(parse_prompt_add, content_type, body)).index
            except HTTPDetailError:
                index = None
        if index:
            cache.bump(index)
        else:
            cache.bump_all()

    async def _exchange(self, backend: Backend, method: str, path: str, body: bytes | None,
                        request: web.Request) -> Answer:
        headers = {REQUEST_ID: request_id_of(request)}
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        return await self.runtime.transport.exchange(method, backend.url + path, body=body, headers=headers,
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
        """Upstream's shape, aggregated over the pool: healthy while any backend is ready; with the
        admin token, plus each backend's state."""
        return self._health(details=is_admin(request, self.runtime.config.admin))

    async def health_details(self, request: web.Request) -> web.Response:
        """/api/v1/health with each backend's state (the metrics listener's)."""
        return self._health(details=True)

    def _health(self, *, details: bool) -> web.Response:
        ready = self.runtime.ready_backends()
        loaded = next((b for b in ready if b.model_key is not None), None)
        indexes = self.runtime.prompts.indexes
        payload: dict[str, Any] = {
            "status": "healthy" if ready else "unhealthy",
            "model_loaded": loaded is not None,
            "model_sample_rate": loaded.model_key[0] if loaded and loaded.model_key else None,
            "model_use_phoneme": loaded.model_key[1] if loaded and loaded.model_key else None,
            "prompt_cache_count": len(indexes) if indexes is not None else 0,
        }
        if details:
            payload["backends"] = [b.as_json() for b in self.runtime.pool.backends]
        return json_response(payload, 200 if ready else 503)

    async def concurrency(self, request: web.Request) -> web.Response:
        """Upstream's shape for the pool: upstream's short/long split at 200 characters, limits from
        backend slots and the length classes' caps; plus the queue."""
        runtime = self.runtime
        scheduler = runtime.scheduler
        slots = sum(b.slots for b in runtime.ready_backends())
        long_cap = scheduler.classes.cap(scheduler.classes.of(LONG_TEXT_THRESHOLD + 1).name, slots)
        limits = {"short_text": slots, "long_text": slots if long_cap is None else long_cap}
        active = {"short_text": 0, "long_text": 0}
        for run in scheduler.running.values():
            active[upstream_length_class(run.job.chars)] += 1
        stats = {cls: {"active": active[cls], "total": runtime.served[cls], "limit": limits[cls],
                       "available": max(0, limits[cls] - active[cls])} for cls in active}
        tiers = runtime.config.deadlines
        backends = len(runtime.pool.backends)
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
            "queue": self._queue_state(details=is_admin(request, runtime.config.admin)),
        })

    async def queue_status(self, request: web.Request) -> web.Response:
        """Queue depth by band and class, and predicted waits for a new request; with the admin
        token, plus tenants, counters, the cost model, slots and backends."""
        return self._queue(details=is_admin(request, self.runtime.config.admin))

    async def queue_details(self, request: web.Request) -> web.Response:
        """/api/v1/queue with every detail (the metrics listener's)."""
        return self._queue(details=True)

    def _queue_state(self, *, details: bool) -> dict[str, Any]:
        runtime = self.runtime
        status = runtime.scheduler.status(runtime.dispatcher.clock())
        status["by_band"] = {runtime.tenants.band_names[b]: n for b, n in status["by_band"].items()}
        return status if details else {key: status[key] for key in PUBLIC_QUEUE}

    def _queue(self, *, details: bool) -> web.Response:
        runtime = self.runtime
        scheduler = runtime.scheduler
        now = runtime.dispatcher.clock()
        status = self._queue_state(details=details)
        views = runtime.dispatcher.views()
        estimates = {}
        for name, chars, units in (("short", 20, 20.0), ("long", 500, 500.0)):
            job = scheduler.make_job(id="~estimate", chars=chars, units=units, model_key=(24000, False), now=now,
                                     band=runtime.tenants.default_band)
            outlook = scheduler.outlook(job, now, views)
            estimates[name] = {"chars": chars, "wait_s": round(outlook.wait_s, 3),
                               "service_s": round(outlook.service_s, 3), "deadline_s": round(outlook.budget_s, 3)}
        if not details:
            return json_response({**status, "policy": {"bands": list(runtime.tenants.band_names)},
                                  "estimates": estimates})
        return json_response({
            **status,
            "policy": {"order": runtime.config.queue.order, "deadlines": runtime.config.deadlines.policy,
                       "bands": list(runtime.tenants.band_names), "tenants": runtime.tenants.names},
            "estimates": estimates,
            "cost": scheduler.cost.describe(),
            "slow_backends": sorted(scheduler.cost.slow_backends()),
            "slots": runtime.dispatcher.slot_states(),
            "backends": [b.as_json() for b in runtime.pool.backends],
        })

    # --- /admin ---------------------------------------------------------------------------------

    async def reload(self, request: web.Request) -> web.Response:
        require_admin(request, self.runtime.config.admin)
        result = await self.control.reload("POST /admin/reload")
        if not result.ok:
            raise InvalidConfig("The configuration file is invalid; the running one is kept", problems=result.problems)
        return json_response({"reloaded": True, "changed": result.changed, "needs_restart": result.ignored})

    async def drain(self, request: web.Request) -> web.Response:
        require_admin(request, self.runtime.config.admin)
        self.control.drain("POST /admin/drain")
        scheduler = self.runtime.scheduler
        return json_response({"draining": True, "queued": len(scheduler.queue), "running": len(scheduler.running),
                              "drain_timeout_s": self.runtime.config.shutdown.drain_timeout_s}, 202)

    async def restart_backend(self, request: web.Request) -> web.Response:
        require_admin(request, self.runtime.config.admin)
        backend_id = request.match_info["backend_id"]
        try:
            self.control.restart_backend(backend_id)
        except KeyError:
            raise UnknownBackend(f"No backend {backend_id!r}") from None
        return json_response({"restarting": backend_id}, 202)

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = len(self.runtime.ready_backends())
        ok = ready > 0 and not self.runtime.draining
        return json_response({"ready": ok, "ready_backends": ready, "draining": self.runtime.draining},
                             200 if ok else 503)


def _maybe_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
