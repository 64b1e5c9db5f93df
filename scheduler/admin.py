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
from scheduler.errors import NoBackend
from scheduler.proxy import REQUEST_ID, Proxy, error_response, json_response

log = logging.getLogger("glmtts_sidecar.admin")

ADMIN_TIMEOUT_S = 30.0
# Backends that are up, or may be: a write must reach every process that will serve traffic.
WRITABLE = (BackendState.READY, BackendState.UNHEALTHY)


class Admin:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

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

    async def fan_out(self, request: web.Request) -> web.Response:
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
        """Upstream's shape, for the pool: limits are backend slots; plus the queue."""
        proxy = self.proxy
        slots = len(proxy.ready_backends()) * proxy.dispatcher.slots
        stats = {cls: {"active": proxy.counters.active[cls], "total": proxy.counters.served[cls],
                       "limit": slots, "available": max(0, slots - proxy.dispatcher.in_service())}
                 for cls in ("short_text", "long_text")}
        cap = proxy.config.backends.request_timeout_s
        backends = len(proxy.pool.backends)
        return json_response({
            "success": True,
            "stats": stats,
            "config": {
                "concurrency": {"short_text": slots, "long_text": slots, "threshold": 200},
                "timeout": {"short_text": cap, "medium_text": cap, "long_text": cap},
                "queue": {"max_size": proxy.dispatcher.queue.max_size, "worker_count": backends,
                          "enabled": True},
                "workers": backends,
            },
            "queue": {"depth": len(proxy.dispatcher.queue), "max_size": proxy.dispatcher.queue.max_size},
        })

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = len(self.proxy.ready_backends())
        return json_response({"ready": ready > 0, "ready_backends": ready}, 200 if ready else 503)


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


def _maybe_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
