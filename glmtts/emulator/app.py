"""The emulator's HTTP server: upstream's whole API over aiohttp, with upstream's behaviour.

Same paths, status codes, JSON bodies (FastAPI's serialisation) and error wording as GLM-TTS's
``tools/api_server.py``; plus ``/emulator/*`` endpoints (faults, stats) that upstream lacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from glmtts import __version__
from glmtts.contract import (
    PromptConfig,
    check_tts,
    parse_prompt_add,
    parse_prompt_update,
    parse_tts_form,
    prompt_not_found,
)
from glmtts.emulator.engine import Engine, SynthesisError, SynthesisJob
from glmtts.emulator.faults import Faults, FaultSpecError
from glmtts.emulator.gpu import GpuShare
from glmtts.emulator.prompts import PromptStore
from glmtts.emulator.upstream import UpstreamConcurrency, UpstreamConfig
from glmtts.errors import HTTPDetailError
from glmtts.form import parse_form
from glmtts.loop import wait_for
from glmtts.responses import json_response, success_json
from glmtts.text import units

log = logging.getLogger("glmtts.emulator")

CLEAR_CACHE_MESSAGE = "Memory cleared. Models will reload on next inference."


def detail_response(exc: HTTPDetailError) -> web.Response:
    return json_response(exc.body(), exc.status)


class InferenceHTTPError(Exception):
    """Inference failed the way upstream turns into ``500 {"detail": "Inference failed: ..."}``."""


@dataclass
class EmulatorStats:
    """What a test or benchmark reads from ``GET /emulator/stats``."""

    tts_received: int = 0
    tts_started: int = 0  # passed validation and entered inference
    tts_completed: int = 0  # inference finished, answered or not
    tts_failed: int = 0
    tts_timeouts: int = 0  # answered 408 while inference went on
    orphaned: int = 0  # finished after the client had gone (no cancellation upstream)
    in_flight: int = 0
    max_in_flight: int = 0
    model_loads: int = 0
    busy_seconds: float = 0.0
    first_request_id: str | None = None  # X-Request-ID of the first TTS request, when one was sent
    last_request_id: str | None = None  # X-Request-ID of the last TTS request, when one was sent
    started_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class LoadedModel:
    """The one model configuration a process holds; a different (sample_rate, use_phoneme) reloads.

    Requests already running on the old model fail when it is swapped under them, as upstream's can.
    """

    def __init__(self, engine: Engine, stats: EmulatorStats) -> None:
        self.engine = engine
        self.stats = stats
        self.key: tuple[int, bool] | None = None
        self.generation = 0
        self._lock = asyncio.Lock()

    async def ensure(self, key: tuple[int, bool]) -> int:
        """Load ``key`` if it is not the loaded configuration; returns the model's generation."""
        async with self._lock:
            if self.key != key:
                log.info("loading model sample_rate=%s use_phoneme=%s (was %s)", key[0], key[1], self.key)
                self.key = None
                self.generation += 1
                await self.engine.load(sample_rate=key[0], use_phoneme=key[1])
                self.key = key
                self.stats.model_loads += 1
            return self.generation

    async def clear(self) -> None:
        async with self._lock:
            await self.engine.unload()
            self.key = None
            self.generation += 1


@dataclass(frozen=True, kw_only=True)
class EmulatorOptions:
    time_scale: float = 1.0  # applies to upstream's timeouts too, so they keep their meaning
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    faults: Faults = field(default_factory=Faults)
    gpu: GpuShare | None = None  # the GPU this process shares with others, for the stats


class Emulator:
    def __init__(self, engine: Engine, store: PromptStore, options: EmulatorOptions) -> None:
        self.engine = engine
        self.store = store
        self.options = options
        self.faults = options.faults
        self.stats = EmulatorStats()
        self.model = LoadedModel(engine, self.stats)
        self.concurrency = UpstreamConcurrency(options.upstream)
        self._fails_left = options.faults.fail_count
        self._hanging = options.faults.hang
        self._started = time.monotonic()
        self._inference: set[asyncio.Task[bytes]] = set()

    # --- wiring ---------------------------------------------------------------------------

    def make_app(self, *, max_body_bytes: int = 1 << 30) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes, middlewares=[self._middleware])
        app.router.add_post("/api/v1/tts", self.tts)
        app.router.add_get("/api/v1/prompts", self.list_prompts, allow_head=False)
        app.router.add_post("/api/v1/prompts", self.add_prompt)
        app.router.add_get("/api/v1/prompts/{index}", self.get_prompt, allow_head=False)
        app.router.add_put("/api/v1/prompts/{index}", self.update_prompt)
        app.router.add_delete("/api/v1/prompts/{index}", self.delete_prompt)
        app.router.add_get("/api/v1/health", self.health, allow_head=False)
        app.router.add_get("/api/v1/stats/concurrency", self.concurrency_stats, allow_head=False)
        app.router.add_post("/api/v1/clear_cache", self.clear_cache)
        app.router.add_get("/openapi.json", self.openapi, allow_head=False)
        app.router.add_get("/docs", self.docs, allow_head=False)
        app.router.add_get("/emulator/faults", self.get_faults, allow_head=False)
        app.router.add_post("/emulator/faults", self.set_faults)
        app.router.add_delete("/emulator/faults", self.clear_faults)
        app.router.add_get("/emulator/stats", self.get_stats, allow_head=False)
        app.router.add_post("/emulator/stats/reset", self.reset_stats)
        app.on_response_prepare.append(self._server_header)
        app.on_shutdown.append(self._on_shutdown)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self._hanging:
            await asyncio.Event().wait()  # never answers; the connection stays open
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            # Starlette's wording and shape, not aiohttp's plain-text page.
            allow = ", ".join(sorted(exc.allowed_methods))
            return json_response({"detail": "Method Not Allowed"}, 405, {"Allow": allow})
        except web.HTTPNotFound:
            return json_response({"detail": "Not Found"}, 404)
        except web.HTTPRequestEntityTooLarge:
            return json_response({"detail": "Request body too large"}, 413)

    @staticmethod
    async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = "uvicorn"

    async def _on_shutdown(self, app: web.Application) -> None:
        for task in list(self._inference):
            task.cancel()

    # --- TTS ------------------------------------------------------------------------------

    async def tts(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        body = await request.read()
        self.stats.tts_received += 1
        self.stats.last_request_id = request.headers.get("X-Request-ID")
        if self.stats.tts_received == 1:
            self.stats.first_request_id = self.stats.last_request_id
        await self._arrival_faults()
        try:
            req = parse_tts_form(parse_form(request.headers.get("Content-Type"), body))
            check_tts(req, prompts=self.store)
        except HTTPDetailError as exc:
            return detail_response(exc)
        if req.index:
            preset = self.store[req.index]
            audio = self.store.resolve(preset.prompt_audio_path)
            if not audio.exists():
                return json_response(
                    {"detail": f"Audio file not found for index '{req.index}': {audio}"}, 404)
            prompt_text = preset.prompt_text
        else:
            prompt_text = req.prompt_text or ""
        job = SynthesisJob(
            text=req.input_text, units=units(req.input_text), sample_rate=req.sample_rate,
            use_phoneme=req.use_phoneme, seed=req.seed, sample_method=req.sample_method,
            sampling=req.sampling, beam_size=req.beam_size, prompt_text=prompt_text,
            use_cache=req.use_cache,
        )
        chars = req.chars
        timeout = self.options.upstream.timeout_for(chars)
        await self.concurrency.acquire(chars)
        try:
            task = asyncio.ensure_future(self._infer(job, request))
            self._inference.add(task)
            task.add_done_callback(self._inference.discard)
            try:
                # Upstream's wait_for around run_in_executor: the 408 does not stop the thread.
                wav = await wait_for(asyncio.shield(task), timeout * self.options.time_scale)
            except asyncio.TimeoutError:
                self.stats.tts_timeouts += 1
                return json_response({"detail": f"Request timeout after {timeout} seconds. "
                                                f"Text length: {chars} characters."}, 408)
        except InferenceHTTPError as exc:
            return json_response({"detail": f"Inference failed: {exc}"}, 500)
        except SynthesisError as exc:
            return json_response({"success": False, "message": "TTS generation failed",
                                  "audio_base64": None, "sample_rate": None,
                                  "generation_time": round(time.monotonic() - started, 2),
                                  "error": str(exc)})
        finally:
            self.concurrency.release(chars)
        return web.Response(body=success_json(wav, sample_rate=req.sample_rate,
                                              generation_time=round(time.monotonic() - started, 2)),
                            headers={"Content-Type": "application/json"})

    async def _infer(self, job: SynthesisJob, request: web.Request) -> bytes:
        stats = self.stats
        stats.tts_started += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        began = time.monotonic()
        try:
            self._injected_failure()
            generation = await self.model.ensure((job.sample_rate, job.use_phoneme))
            wav = await self.engine.synthesize(job)
            if self.model.generation != generation:
                raise SynthesisError("model was replaced during inference")
            return wav
        except (SynthesisError, InferenceHTTPError):
            stats.tts_failed += 1
            raise
        finally:
            stats.in_flight -= 1
            stats.tts_completed += 1
            stats.busy_seconds += time.monotonic() - began
            transport = request.transport
            if transport is None or transport.is_closing():
                stats.orphaned += 1

    def _injected_failure(self) -> None:
        status = self.faults.fail_status
        if status is None:
            return
        if self._fails_left is not None:
            if self._fails_left <= 0:
                return
            self._fails_left -= 1
        if status == 500:
            raise InferenceHTTPError("emulated fault")
        raise SynthesisError("emulated fault")

    async def _arrival_faults(self) -> None:
        served = self.stats.tts_received - 1
        crash_after = self.faults.crash_after
        if crash_after is not None and served >= crash_after:
            log.error("fault injection: crashing after %d requests", crash_after)
            logging.shutdown()
            os._exit(70)
        hang_after = self.faults.hang_after
        if hang_after is not None and served >= hang_after:
            log.error("fault injection: hanging after %d requests", hang_after)
            self._hanging = True
            await asyncio.Event().wait()

    # --- prompts --------------------------------------------------------------------------

    async def list_prompts(self, request: web.Request) -> web.Response:
        return json_response({"success": True, "prompts": [
            {"index": index, "config": config.as_dict()} for index, config in self.store.items()]})

    async def get_prompt(self, request: web.Request) -> web.Response:
        index = request.match_info["index"]
        if index not in self.store:
            return detail_response(prompt_not_found(index))
        return json_response({"index": index, "config": self.store[index].as_dict()})

    async def add_prompt(self, request: web.Request) -> web.Response:
        try:
            form = parse_prompt_add(request.headers.get("Content-Type"), await request.read())
        except HTTPDetailError as exc:
            return detail_response(exc)
        if form.index in self.store:
            return json_response({"detail": f"Prompt index '{form.index}' already exists"}, 400)
        return self._store_prompt(form.index, PromptConfig(
            prompt_audio_path=form.prompt_audio_path, prompt_text=form.prompt_text), "added")

    async def update_prompt(self, request: web.Request) -> web.Response:
        index = request.match_info["index"]
        try:
            form = parse_prompt_update(request.headers.get("Content-Type"), await request.read())
        except HTTPDetailError as exc:
            return detail_response(exc)
        if index not in self.store:
            return detail_response(prompt_not_found(index))
        return self._store_prompt(index, PromptConfig(
            prompt_audio_path=form.prompt_audio_path, prompt_text=form.prompt_text), "updated")

    def _store_prompt(self, index: str, config: PromptConfig, verb: str) -> web.Response:
        if not self.store.is_valid(config):
            return json_response({"detail": "Invalid prompt configuration"}, 400)
        self.store.put(index, config)
        return json_response({"success": True, "message": f"Prompt '{index}' {verb} successfully",
                              "index": index, "config": config.as_dict()})

    async def delete_prompt(self, request: web.Request) -> web.Response:
        index = request.match_info["index"]
        if index not in self.store:
            return detail_response(prompt_not_found(index))
        self.store.delete(index)
        return json_response({"success": True, "message": f"Prompt '{index}' deleted successfully"})

    # --- health, stats, cache -------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        flap = self.faults.health_flap_s
        if flap is not None and int((time.monotonic() - self._started) / flap) % 2 == 1:
            return json_response({"detail": "emulated unhealthy period"}, 503)
        key = self.model.key
        return json_response({
            "status": "healthy",
            "model_loaded": key is not None,
            "model_sample_rate": key[0] if key else None,
            "model_use_phoneme": key[1] if key else None,
            "prompt_cache_count": len(self.store),
        })

    async def concurrency_stats(self, request: web.Request) -> web.Response:
        return json_response({"success": True, "stats": self.concurrency.stats(),
                              "config": self.options.upstream.as_json()})

    async def clear_cache(self, request: web.Request) -> web.Response:
        await self.model.clear()
        return json_response({"success": True, "message": CLEAR_CACHE_MESSAGE})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document())

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(text=_DOCS_HTML, content_type="text/html")

    # --- emulator-only --------------------------------------------------------------------

    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response(self.faults.as_json())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            faults = Faults.from_json(await request.json())
        except (ValueError, TypeError) as exc:  # JSONDecodeError and FaultSpecError are ValueErrors
            message = str(exc) if isinstance(exc, FaultSpecError) else f"invalid JSON: {exc}"
            return json_response({"detail": message}, 400)
        self.faults = faults
        self._fails_left = faults.fail_count
        self._hanging = faults.hang
        log.warning("faults set: %s", faults.as_json())
        return json_response(faults.as_json())

    async def clear_faults(self, request: web.Request) -> web.Response:
        self.faults = Faults()
        self._fails_left = None
        return json_response(self.faults.as_json())

    async def get_stats(self, request: web.Request) -> web.Response:
        key = self.model.key
        gpu = self.options.gpu
        sharing = gpu.as_json() if gpu is not None else {"gpu": None, "gpu_busy_processes": 0, "gpu_speed": 1.0}
        return json_response({**self.stats.as_json(), "engine": self.engine.name, "pid": os.getpid(),
                              "model": list(key) if key else None, "version": __version__, **sharing})

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.max_in_flight = self.stats.in_flight
        return await self.get_stats(request)


def openapi_document() -> dict[str, Any]:
    """A description of the upstream API (paths and methods), for tools that look for one."""
    paths: dict[str, dict[str, Any]] = {
        "/api/v1/tts": {"post": {"summary": "Generate Tts"}},
        "/api/v1/prompts": {"get": {"summary": "List Prompts"}, "post": {"summary": "Add Prompt"}},
        "/api/v1/prompts/{index}": {"get": {"summary": "Get Prompt"}, "put": {"summary": "Update Prompt"},
                                    "delete": {"summary": "Delete Prompt"}},
        "/api/v1/health": {"get": {"summary": "Health Check"}},
        "/api/v1/stats/concurrency": {"get": {"summary": "Get Concurrency Stats"}},
        "/api/v1/clear_cache": {"post": {"summary": "Clear Model Cache"}},
    }
    return {"openapi": "3.1.0", "info": {"title": "GLM-TTS API", "version": "1.0.0"}, "paths": paths}


_DOCS_HTML = """<!DOCTYPE html>
<html><head><title>GLM-TTS API - Docs</title></head>
<body><h1>GLM-TTS API</h1><p>Emulated backend. The API description is at
<a href="/openapi.json">/openapi.json</a>.</p></body></html>
"""
