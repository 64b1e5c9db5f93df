"""scheduler.runtime.tasks.TaskService in process: the real exchange, dispatcher and task store over an
in-process backend. Whatever ends a request (store errors, the client leaving at any await,
admission refusing it, backend errors, DELETE), no backend slot, queue place or stored task is
left behind."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from backend.record import Backend
from backend.state import BackendState
from backend.transport import BackendUnavailable
from glmtts.errors import HTTPDetailError
from glmtts.wav import write_wav
from scheduler.config import SidecarConfig, parse_config
from scheduler.errors import SidecarError
from scheduler.http.middleware import REQUEST_ID_KEY, error_response
from scheduler.http.tasks import TaskHandlers
from scheduler.http.tts import TTSHandler
from scheduler.runtime.build import build_scheduler, build_tenants
from scheduler.runtime.context import Runtime
from scheduler.runtime.dispatcher import Dispatcher
from scheduler.runtime.exchange import Exchange
from scheduler.runtime.metrics import Metrics
from scheduler.runtime.prompts import PromptCatalogue
from scheduler.runtime.tasks import TaskService
from scheduler.runtime.taskstore import StoreError, Task, TaskState, TaskStore

# The handlers read the request id under a string key, as the app does (the middleware sets it).
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")

FORM = "application/x-www-form-urlencoded"
KEY = "alpha-key-0123456789abcdef"
WAV = write_wav(b"\x00\x00" * 2400, 24000)
# Serialised as upstream's FastAPI does: compact, success first.
SUCCESS = json.dumps({"success": True, "message": "TTS generation successful",
                      "audio_base64": base64.b64encode(WAV).decode(), "sample_rate": 24000,
                      "generation_time": 0.1, "error": None}, separators=(",", ":")).encode()


def form(text: str = "hello there") -> bytes:
    return f"input_text={text.replace(' ', '+')}&index=exampleA".encode()


# --- the in-process backend ------------------------------------------------------------------------


class Answer:
    """A backend.transport.Reply: status, headers, the body, release()."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.reason = "OK" if status == 200 else "Error"
        self.headers = {"Content-Type": "application/json"}
        self.content_length = len(body)
        self.content = self
        self._body = body

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        return self._body

    async def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        for start in range(0, len(self._body), size):
            await asyncio.sleep(0)
            yield self._body[start:start + size]

    def release(self) -> None:
        pass


class FakeBackends:
    """Answers each forwarded request by the next step of ``script`` ("ok" once it is empty):
    ok, 500, no_success (200 with success false), bad_audio, unavailable (refused before it was
    sent), broken (the request cannot be sent at all), hold (answers once ``release`` is set)."""

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = list(script or [])
        self.forwarded: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.release = asyncio.Event()

    async def open(self, method: str, url: str, *, body: bytes | None = None,
                   headers: dict[str, str] | None = None, timeout: float | None = None,
                   fresh: bool = False) -> Answer:
        self.forwarded.append(url)
        self.headers.append(dict(headers or {}))
        await asyncio.sleep(0)
        step = self.script.pop(0) if self.script else "ok"
        if step == "hold":
            await self.release.wait()
        if step == "unavailable":
            raise BackendUnavailable(f"{url}: connection refused", sent=False)
        if step == "broken":
            raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
        if step == "500":
            return Answer(500, b'{"detail":"Internal Server Error"}')
        if step == "no_success":
            return Answer(200, b'{"success":false,"message":"TTS generation failed","error":"oom"}')
        if step == "bad_audio":
            return Answer(200, b'{"success":true,"audio_base64":"AAAA"}')
        return Answer(200, SUCCESS)


class FakePool:
    """The pool as the exchange sees it: ready backends; a reported failure takes one out of rotation
    until ``heal`` (the supervisor's health checks) brings them all back."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self.heals_at_once = False  # True: a failed backend is healthy again on the next loop turn
        self.on_change: Callable[[], None] = lambda: None

    def report_failure(self, backend: Backend, reason: str) -> None:
        backend.last_error = reason
        backend.state = BackendState.UNHEALTHY
        if self.heals_at_once:
            asyncio.get_running_loop().call_soon(self.heal)

    def heal(self) -> None:
        for backend in self.backends:
            backend.state = BackendState.READY
        self.on_change()

    def report_outcome(self, backend: Backend, *, ok: bool, latency_ratio: float | None) -> None:
        pass

    def kill_backend(self, backend: Backend, reason: str) -> None:
        pass


class Body:
    """A request body as aiohttp's StreamReader hands it out, in chunks; ``cancel_at``: the client
    leaves (the handler is cancelled) when that chunk is asked for."""

    def __init__(self, data: bytes, *, chunk: int = 4096, cancel_at: int | None = None) -> None:
        self._chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
        self._cancel_at = cancel_at
        self._read = 0

    async def readany(self) -> bytes:
        if self._read == self._cancel_at:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
        self._read += 1
        await asyncio.sleep(0)
        return self._chunks.pop(0) if self._chunks else b""


def request(method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None,
            task_id: str | None = None, cancel_at: int | None = None) -> web.Request:
    given = CIMultiDict(headers or {})
    if method == "POST":
        given.setdefault("Content-Type", FORM)
        given["Content-Length"] = str(len(body))
    ascii_only = CIMultiDict((k, v.encode("ascii", "replace").decode()) for k, v in given.items())
    req = make_mocked_request(method, path, headers=ascii_only, match_info={"task_id": task_id} if task_id else {},
                              payload=Body(body, cancel_at=cancel_at))  # type: ignore[arg-type]
    # As aiohttp's parser hands them over: a byte that is not UTF-8 is a lone surrogate.
    req._headers = CIMultiDictProxy(given)
    req[REQUEST_ID_KEY] = "test"
    return req


# --- the rig ---------------------------------------------------------------------------------------


class Rig:
    def __init__(self, config: SidecarConfig, backends: FakeBackends) -> None:
        self.config = config
        self.backends = backends
        self.pool = FakePool([Backend(spec) for spec in config.backends.layout()])
        for backend in self.pool.backends:
            backend.state, backend.pid, backend.model_key = BackendState.READY, 1, (24000, False)
        self.dispatcher = Dispatcher(build_scheduler(config), lambda: self.pool.backends,
                                     slots=config.backends.slot_policy())
        self.pool.on_change = self.dispatcher.pump

        async def indexes() -> set[str]:
            return {"exampleA"}

        self.runtime = Runtime(config, self.pool, backends, PromptCatalogue(indexes),  # type: ignore[arg-type]
                               self.dispatcher, build_tenants(config), metrics=Metrics())
        exchange = Exchange(self.runtime)
        self.service = TaskService(self.runtime, exchange, config.tasks)
        routes = TaskHandlers(self.runtime, self.service)
        tts = TTSHandler(self.runtime, exchange, submit_task=routes.submit)
        # As the app's middleware does: a raised error is the answer.
        self.submit_route, self.status_route, self.audio_route, self.cancel_route, self.tts_route = (
            rendered(routes.submit), rendered(routes.status), rendered(routes.audio), rendered(routes.cancel),
            rendered(tts.tts))

    @property
    def store(self) -> TaskStore:
        assert self.service.store is not None
        return self.service.store

    async def submit(self, body: bytes | None = None, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
        headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
        response = await self.submit_route(request("POST", "/api/v1/tasks", body=form() if body is None else body,
                                                     headers=headers, **kwargs))
        return answer(response)

    async def call(self, handler: Callable[[web.Request], Any], task_id: str, method: str = "GET",
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
        response = await handler(request(method, f"/api/v1/tasks/{task_id}", task_id=task_id,
                                         headers={"Authorization": f"Bearer {KEY}", **(headers or {})}))
        return answer(response)

    def stored(self) -> dict[str, Task]:
        rows = sqlite3.connect(self.store.directory / "tasks.sqlite3").execute("SELECT id, tenant FROM tasks")
        return {task_id: task for task_id, tenant in rows if (task := self.store.get(task_id, tenant=tenant))}

    def assert_idle(self) -> None:
        """No backend slot taken, nothing queued or in service."""
        assert [b.in_flight for b in self.pool.backends] == [0] * len(self.pool.backends)
        assert len(self.dispatcher.scheduler.queue) == 0
        assert not self.dispatcher.scheduler.running
        assert self.dispatcher.idle()


def rendered(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
             ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def call(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (SidecarError, HTTPDetailError) as exc:
            return error_response(exc)

    return call


def answer(response: web.StreamResponse) -> tuple[int, dict[str, Any], Any]:
    assert isinstance(response, web.Response)
    assert response.body is not None
    return response.status, dict(response.headers), json.loads(response.body)  # type: ignore[arg-type]


def config_for(directory: Path, **tasks: Any) -> SidecarConfig:
    data = {
        # One request per backend and one length class that keeps the band asked for: the tasks'
        # own behaviour, not the defaults' express slot for short texts, is what these tests see.
        "backends": {"gpus": [], "external": ["http://127.0.0.1:9001", "http://127.0.0.1:9002"], "slots": 1,
                     **tasks.pop("backends", {})},
        "classes": [{"name": "any", "max_chars": None}],
        "tenants": {"list": [{"name": "alpha", "keys": [KEY]}]},
        "queue": tasks.pop("queue", {}),
        "tasks": {"state_dir": str(directory), **tasks},
    }
    return parse_config(json.dumps(data), check_paths=False)


@asynccontextmanager
async def rig(directory: Path, script: list[str] | None = None, **tasks: Any) -> AsyncIterator[Rig]:
    r = Rig(config_for(directory, **tasks), FakeBackends(script))
    await r.service.start()
    try:
        yield r
    finally:
        r.backends.release.set()
        r.pool.heal()
        await settle()
        await r.service.close()


async def settle(timeout: float = 5.0) -> None:
    """Let everything the service started run to its end (runners, removals, orphaned work); the
    sweeper, which only sleeps, is left alone."""
    me = asyncio.current_task()
    for _ in range(100):
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()
                   and getattr(t.get_coro(), "__name__", "") != "_sweeper"]
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=timeout)
        assert not still, f"stuck: {still}"
    raise AssertionError("tasks kept starting more tasks")


class FaultyStore:
    """The real store, with a fault at chosen calls (numbered over the methods in CALLS, in call
    order). ``cancel``: the coroutine awaiting the call is cancelled (its client left, a DELETE,
    shutdown) while the call runs on to its end in its thread."""

    CALLS = frozenset({"find", "create", "delete", "mark_running", "succeed", "fail", "cancel", "get",
                       "audio_path"})
    ERRORS: ClassVar[dict[str, Callable[[], BaseException]]] = {
        "store_error": lambda: StoreError("disk I/O error"),
        "sqlite": lambda: sqlite3.OperationalError("database is locked"),
        "unicode": lambda: UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"),
        "runtime": lambda: RuntimeError("unexpected"),
    }

    def __init__(self, store: TaskStore, faults: dict[int, str]) -> None:
        self._store = store
        self._faults = faults
        self.calls = 0
        self.unremoved: set[str] = set()  # tasks a faulted delete may have left

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if name not in self.CALLS:
            return method
        fault = self._faults.get(self.calls)
        self.calls += 1
        if fault is None:
            return method
        loop = asyncio.get_running_loop()
        caller = asyncio.current_task()

        def faulty(*args: Any, **kwargs: Any) -> Any:
            if name == "delete":
                self.unremoved.add(args[0])
            if fault == "cancel":
                if caller is not None:
                    loop.call_soon_threadsafe(caller.cancel)
                return method(*args, **kwargs)
            raise self.ERRORS[fault]()

        return faulty


# --- item by item ----------------------------------------------------------------------------------


async def test_a_task_is_stored_then_run_and_its_body_goes_when_it_succeeds(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        status, headers, body = await r.submit()
        assert status == 202 and headers["Location"] == f"/api/v1/tasks/{body['task_id']}"
        await settle()
        task = r.stored()[body["task_id"]]
        assert task.state is TaskState.SUCCEEDED and task.band == "standard"
        assert task.body_bytes == 0 and task.audio_bytes == len(WAV)
        assert not (r.store.directory / "requests" / f"{task.id}.body").exists()
        assert r.store.usage("alpha") == (1, len(WAV))
        r.assert_idle()


@pytest.mark.parametrize("error", list(FaultyStore.ERRORS))
async def test_a_store_error_of_any_kind_answers_503_and_leaves_no_job(tmp_path: Path, error: str) -> None:
    async with rig(tmp_path) as r:
        store = r.service.store
        r.service.store = FaultyStore(r.store, {0: error})  # type: ignore[assignment]
        status, headers, body = await r.submit()
        r.service.store = store
        assert status == 503 and body["reason"] == "store_unavailable" and headers["Retry-After"] == "30"
        await settle()
        r.assert_idle()
        assert r.stored() == {}
        # The pool is whole: the next task runs at once.
        status, _, body = await r.submit()
        await settle()
        assert status == 202 and r.stored()[body["task_id"]].state is TaskState.SUCCEEDED


async def test_a_client_leaving_while_its_task_is_written_takes_nothing(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        store = r.service.store
        faulty = FaultyStore(r.store, {0: "cancel"})  # cancelled while create runs on in its thread
        r.service.store = faulty  # type: ignore[assignment]
        submit = asyncio.ensure_future(r.submit(form("a long upload " * 500)))
        with pytest.raises(asyncio.CancelledError):
            await submit
        r.service.store = store
        await settle()
        assert faulty.calls >= 1
        assert r.stored() == {}  # the row appeared after the client left; it was removed again
        assert list((r.store.directory / "requests").iterdir()) == []
        assert r.backends.forwarded == []
        r.assert_idle()


@pytest.mark.parametrize("chunk", [0, 1, 2])
async def test_a_client_leaving_mid_upload_takes_nothing(tmp_path: Path, chunk: int) -> None:
    async with rig(tmp_path) as r:
        with pytest.raises(asyncio.CancelledError):
            await r.submit(form("x" * 9000), cancel_at=chunk)
        await settle()
        assert r.stored() == {} and r.backends.forwarded == []
        r.assert_idle()


async def test_a_refusal_by_admission_removes_the_stored_task(tmp_path: Path) -> None:
    async with rig(tmp_path, ["hold", "hold"], queue={"max_size": 1}) as r:
        held = [(await r.submit(form(f"held {i}")))[2]["task_id"] for i in range(2)]  # one per backend
        queued = (await r.submit(form("queued")))[2]["task_id"]
        status, headers, body = await r.submit(form("one too many"))
        assert status == 429 and body["reason"] == "queue_full" and int(headers["Retry-After"]) >= 1
        assert set(r.stored()) == {*held, queued}
        assert len(list((r.store.directory / "requests").iterdir())) == 3
        r.backends.release.set()
        await settle()
        assert {t.state for t in r.stored().values()} == {TaskState.SUCCEEDED}
        r.assert_idle()


@pytest.mark.parametrize("route", ["submit", "tts", "status", "audio", "cancel"])
@pytest.mark.parametrize(("header", "value"), [
    ("Content-Type", "application/x-www-form-urlencoded; x=\udcff"),
    ("X-Callback-URL", "http://hooks.example/\udcff"),
    ("Authorization", "Bearer \udcff"),
])
async def test_a_header_that_is_not_ascii_is_refused_on_every_task_route(tmp_path: Path, route: str, header: str,
                                                                         value: str) -> None:
    async with rig(tmp_path) as r:
        _, _, accepted = await r.submit()
        await settle()
        task_id = accepted["task_id"]
        headers = {"Authorization": f"Bearer {KEY}", header: value}
        if route in ("submit", "tts"):
            if route == "tts":
                headers["Prefer"] = "respond-async"
            handler = r.submit_route if route == "submit" else r.tts_route
            response = await handler(request("POST", f"/api/v1/{route}", body=form(), headers=headers))
        else:
            handler = {"status": r.status_route, "audio": r.audio_route, "cancel": r.cancel_route}[route]
            method = "DELETE" if route == "cancel" else "GET"
            response = await handler(request(method, f"/api/v1/tasks/{task_id}", task_id=task_id, headers=headers))
        status, _, body = answer(response)
        assert status == 400 and body["reason"] == "non_ascii_header" and header in body["detail"]
        await settle()
        assert set(r.stored()) == {task_id} and r.stored()[task_id].state is TaskState.SUCCEEDED
        r.assert_idle()


async def test_an_idempotency_key_is_bound_to_its_request(tmp_path: Path) -> None:
    async with rig(tmp_path, ["hold"], max_per_tenant=1) as r:
        status, _, first = await r.submit(form("order one"), headers={"Idempotency-Key": "k1"})
        assert status == 202
        admitted = r.dispatcher.scheduler.tally.admitted
        # The same request again: the same task; no new admission, and not refused by the cap of 1.
        status, _, again = await r.submit(form("order one"), headers={"Idempotency-Key": "k1"})
        assert status in (200, 202) and again["task_id"] == first["task_id"]
        assert r.dispatcher.scheduler.tally.admitted == admitted
        # Another request under the same key: refused, and it learns nothing of the first task.
        status, _, other = await r.submit(form("someone else's text"), headers={"Idempotency-Key": "k1"})
        assert status == 422 and other["reason"] == "idempotency_key_reused" and "k1" in other["detail"]
        assert first["task_id"] not in json.dumps(other)
        other_type = form("order one")
        status, _, other = await r.submit(other_type, headers={"Idempotency-Key": "k1",
                                                               "Content-Type": f"{FORM}; charset=utf-8"})
        assert status == 422
        # A new key is a new task: over the cap now.
        status, _, over = await r.submit(form("order two"), headers={"Idempotency-Key": "k2"})
        assert status == 429 and over["reason"] == "task_quota" and over["limit"] == "tasks.max_per_tenant"
        r.backends.release.set()
        await settle()
        assert list(r.stored()) == [first["task_id"]]
        r.assert_idle()


class GatedStore:
    """The real store whose create, once done, waits for ``gate`` before it returns."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self.created = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def create(self, **kwargs: Any) -> tuple[Task, bool]:
        result = self._store.create(**kwargs)
        self.created.set()
        self.gate.wait(10)
        return result


async def test_a_retry_while_the_first_submit_is_removed_gets_a_task_that_stays(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        gated = GatedStore(r.store)
        r.service.store = gated  # type: ignore[assignment]
        first = asyncio.ensure_future(r.submit(headers={"Idempotency-Key": "k"}))
        assert await asyncio.to_thread(gated.created.wait, 10)  # stored; its create has not returned yet
        first.cancel()  # the client leaves: the task it stored is to be removed
        with pytest.raises(asyncio.CancelledError):
            await first
        retry = asyncio.ensure_future(r.submit(headers={"Idempotency-Key": "k"}))
        done, _ = await asyncio.wait([retry], timeout=0.2)
        assert not done, "the retry was answered while the first submit's task was still to be removed"
        gated.gate.set()
        status, _, body = await retry
        await settle()
        assert status == 202 and list(r.stored()) == [body["task_id"]]
        assert r.stored()[body["task_id"]].state is TaskState.SUCCEEDED
        r.assert_idle()


async def test_the_per_tenant_caps_answer_429_with_retry_after(tmp_path: Path) -> None:
    big = form() + b"&padding=" + b"x" * 600_000  # an unknown field: ignored, as upstream ignores it
    async with rig(tmp_path, ["hold"], max_per_tenant=3, max_bytes_per_tenant=1 << 20, ttl_s=600.0) as r:
        assert (await r.submit(big))[0] == 202
        status, headers, body = await r.submit(big)
        assert status == 429 and body["limit"] == "tasks.max_bytes_per_tenant", body
        assert "tasks.max_bytes_per_tenant" in body["detail"] and int(headers["Retry-After"]) >= 1
        r.backends.release.set()
        await settle()  # the first task finished: its body is gone, only its audio counts
        assert (await r.submit(big))[0] == 202
        await settle()
        assert (await r.submit())[0] == 202
        status, headers, body = await r.submit()
        assert status == 429 and body["limit"] == "tasks.max_per_tenant" and "3" in body["detail"]
        # Room comes back when the oldest finished task is swept, tasks.ttl_s after it finished.
        assert 590 <= int(headers["Retry-After"]) <= 601
        # Another tenant (here the default one: no key) is not affected.
        assert answer(await r.submit_route(request("POST", "/api/v1/tasks", body=form())))[0] == 202
        await settle()
        r.assert_idle()


async def test_low_disk_answers_503_and_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with rig(tmp_path, min_free_bytes=1 << 30, sweep_interval_s=20.0) as r:
        monkeypatch.setattr(r.store, "free_bytes", lambda: (1 << 30) + 10)  # less than the body to spare
        status, headers, body = await r.submit()
        assert status == 503 and body["reason"] == "disk_low" and body["limit"] == "tasks.min_free_bytes"
        assert headers["Retry-After"] == "20"
        assert r.stored() == {}
        monkeypatch.setattr(r.store, "free_bytes", lambda: 10 << 30)
        assert (await r.submit())[0] == 202
        await settle()
        r.assert_idle()


@pytest.mark.parametrize(("step", "state"), [("no_success", TaskState.FAILED), ("bad_audio", TaskState.FAILED),
                                             ("broken", TaskState.FAILED)])
async def test_a_failed_task_keeps_no_body(tmp_path: Path, step: str, state: TaskState) -> None:
    async with rig(tmp_path, [step, step], backends={"external": ["http://127.0.0.1:9001"]}) as r:
        task_id = (await r.submit())[2]["task_id"]
        await settle()
        task = r.stored()[task_id]
        assert task.state is state and task.body_bytes == 0 and task.reason
        assert list((r.store.directory / "requests").iterdir()) == []
        r.assert_idle()


async def test_delete_reaches_the_retry_of_a_task(tmp_path: Path) -> None:
    # Two backends: a blocker holds one; the task's first attempt fails on the other, which leaves
    # rotation, so its retry waits in the queue. DELETE must take that retry out of the queue.
    async with rig(tmp_path, ["hold", "unavailable"]) as r:
        blocker = (await r.submit(form("blocker")))[2]["task_id"]
        task_id = (await r.submit(form("the task")))[2]["task_id"]
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(r.backends.forwarded) == 2 and len(r.dispatcher.scheduler.queue) == 1
        status, _, body = await r.call(r.cancel_route, task_id, "DELETE")
        assert status == 200 and body["status"] == "cancelled"
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(r.dispatcher.scheduler.queue) == 0
        r.backends.release.set()
        await settle()
        assert len(r.backends.forwarded) == 2  # the retry never reached a backend
        assert r.stored()[blocker].state is TaskState.SUCCEEDED
        cancelled = r.stored()[task_id]
        assert cancelled.state is TaskState.CANCELLED and cancelled.body_bytes == 0
        r.assert_idle()


async def test_delete_of_a_running_task_frees_its_slot_when_the_backend_answers(tmp_path: Path) -> None:
    async with rig(tmp_path, ["hold"]) as r:
        task_id = (await r.submit())[2]["task_id"]
        for _ in range(20):
            await asyncio.sleep(0)
        assert r.dispatcher.in_service() == 1
        assert (await r.call(r.cancel_route, task_id, "DELETE"))[2]["status"] == "cancelled"
        await asyncio.sleep(0)
        assert r.dispatcher.in_service() == 1  # GLM-TTS cannot cancel: the slot is busy until it answers
        r.backends.release.set()
        await settle()
        assert r.stored()[task_id].state is TaskState.CANCELLED and r.stored()[task_id].audio_bytes == 0
        r.assert_idle()


# --- the synchronous route -------------------------------------------------------------------------


async def test_a_content_type_byte_that_is_not_utf8_is_served_on_the_synchronous_route(tmp_path: Path) -> None:
    # Upstream reads a urlencoded form whatever the parameters say; so does the sidecar. The byte
    # cannot be sent on (aiohttp's writer would fail or drop it): it is left out, explicitly.
    async with rig(tmp_path) as r:
        response = await r.tts_route(request("POST", "/api/v1/tts", body=form(), headers={
            "Content-Type": f"{FORM}; x=\udcff"}))
        assert response.status == 200
        assert r.backends.headers[-1]["Content-Type"] == f"{FORM}; x="
        r.assert_idle()


async def test_a_request_that_cannot_be_sent_frees_its_slot(tmp_path: Path) -> None:
    async with rig(tmp_path, ["broken", "broken"]) as r:
        for _ in range(2):
            status, _, body = answer(await r.tts_route(request("POST", "/api/v1/tts", body=form())))
            assert status == 502 and body["reason"] == "backend_failed"
            r.assert_idle()
        assert (await r.tts_route(request("POST", "/api/v1/tts", body=form()))).status == 200
        r.assert_idle()


# --- restarts ---------------------------------------------------------------------------------------


async def test_a_recovered_task_keeps_its_band(tmp_path: Path) -> None:
    seed = TaskStore(tmp_path)
    try:
        ids = {band: seed.create(tenant="alpha", body=form(band), content_type=FORM, chars=5,
                                 deadline_at=4e9, now=1e9, band=band)[0].id
               for band in ("batch", "interactive", "retired")}
        expired = seed.create(tenant="alpha", body=form(), content_type=FORM, chars=5, deadline_at=1.0, now=0.5)[0]
    finally:
        seed.close()
    async with rig(tmp_path, ["hold", "hold"], backends={"external": ["http://127.0.0.1:9001"]}) as r:
        scheduler = r.dispatcher.scheduler
        jobs = [*scheduler.queue.candidates(0.0), *(run.job for run in scheduler.running.values())]
        bands = {job.id.removeprefix("task-"): job.band for job in jobs}
        names = r.runtime.tenants.band_names
        assert bands == {ids["batch"]: names.index("batch"), ids["interactive"]: names.index("interactive"),
                         ids["retired"]: r.runtime.tenants.default_band}
        gone = r.stored()[expired.id]
        assert gone.state is TaskState.EXPIRED and gone.body_bytes == 0
        r.backends.release.set()
        await settle()
        r.assert_idle()


async def test_unfinished_callbacks_are_resumed_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = TaskStore(tmp_path)
    try:
        def task(url: str | None, state: TaskState | None, callback: str | None) -> str:
            created = seed.create(tenant="alpha", body=form(), content_type=FORM, chars=5, deadline_at=4e9,
                                  now=1e9, callback_url=url)[0]
            if state is TaskState.SUCCEEDED:
                seed.succeed(created.id, wav=WAV, result={}, now=1e9)
            elif state is not None:
                seed.fail(created.id, state=state, reason="x", result=None, now=1e9)
            if callback is not None:
                seed.set_callback_state(created.id, callback)
            return created.id

        due = {task("http://hooks/1", TaskState.SUCCEEDED, "pending"), task("http://hooks/2", TaskState.FAILED, None),
               task("http://hooks/3", TaskState.EXPIRED, "pending")}
        # Unfinished, its deadline passed while the sidecar was stopped: it expires at start, announced once.
        due.add(seed.create(tenant="alpha", body=form(), content_type=FORM, chars=5, deadline_at=1.0, now=0.5,
                            callback_url="http://hooks/6")[0].id)
        task("http://hooks/4", TaskState.SUCCEEDED, "delivered")
        task("http://hooks/5", TaskState.FAILED, "failed")
        task(None, TaskState.SUCCEEDED, None)
    finally:
        seed.close()
    announced: list[str] = []

    async def announce(self: TaskService, submitted: Task) -> None:
        announced.append(submitted.id)

    monkeypatch.setattr(TaskService, "_announce", announce)
    async with rig(tmp_path):
        await settle()
    assert sorted(announced) == sorted(due)  # each once


async def test_a_version_1_store_is_migrated_and_its_tasks_recovered(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_taskstore import V1_IDS, write_v1_store

    write_v1_store(tmp_path)
    announced: list[str] = []

    async def announce(self: TaskService, submitted: Task) -> None:
        announced.append(submitted.id)

    monkeypatch.setattr(TaskService, "_announce", announce)
    async with rig(tmp_path, ["hold"], backends={"external": ["http://127.0.0.1:9001"]}) as r:
        scheduler = r.dispatcher.scheduler
        jobs = [*scheduler.queue.candidates(0.0), *(run.job for run in scheduler.running.values())]
        assert {job.id.removeprefix("task-") for job in jobs} == {V1_IDS["queued"], V1_IDS["running"]}
        assert {job.band for job in jobs} == {r.runtime.tenants.default_band}  # version 1 kept no band
        r.backends.release.set()
        await settle()
        states = {task.id: task.state.value for task in r.stored().values()}
        assert states == {V1_IDS["queued"]: "succeeded", V1_IDS["running"]: "succeeded",
                          V1_IDS["succeeded"]: "succeeded", V1_IDS["failed"]: "failed"}
        assert V1_IDS["failed"] in announced  # its callback was pending when version 1 stopped
        r.assert_idle()


# --- the invariant --------------------------------------------------------------------------------

STEPS = st.sampled_from(["ok", "ok", "500", "no_success", "bad_audio", "unavailable", "broken"])
FAULTS = st.sampled_from([*FaultyStore.ERRORS, "cancel"])


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="task-service-") as name:
        yield Path(name)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(STEPS, max_size=8),
    faults=st.dictionaries(st.integers(0, 24), FAULTS, max_size=4),
    submits=st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.sampled_from([None, "k1", "k2"])),
                     min_size=1, max_size=5),
    queue_size=st.integers(1, 4),
    deletes=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 4)), max_size=3),
)
def test_whatever_ends_a_request_no_slot_queue_place_or_task_is_left(
        script: list[str], faults: dict[int, str], submits: list[tuple[int, bool, str | None]], queue_size: int,
        deletes: list[tuple[int, int]]) -> None:
    """Each submit may leave mid-upload (the first of its triple: the chunk, 3 = never) and may use
    an Idempotency-Key; store calls fail or are cancelled as ``faults`` says; backends answer by
    ``script``; meanwhile accepted tasks are deleted (after so many loop turns, the how-many-th told
    of). Once everything has run out: no slot is taken, nothing is queued, and the store holds
    exactly the tasks clients were told of."""

    async def scenario(directory: Path) -> None:
        async with rig(directory, script, queue={"max_size": queue_size}) as r:
            r.pool.heals_at_once = True
            faulty = FaultyStore(r.store, faults)
            real = r.service.store
            r.service.store = faulty  # type: ignore[assignment]
            told: set[str] = set()

            async def one(i: int, leave_at: int, keyed: bool, key: str | None) -> None:
                headers = {"Idempotency-Key": key} if keyed and key else {}
                try:
                    status, _, body = await r.submit(form(f"text {i % 2}"), headers=headers,
                                                     cancel_at=leave_at if leave_at < 3 else None)
                except asyncio.CancelledError:
                    return
                assert status in (200, 202, 400, 422, 429, 503), (status, body)
                if status in (200, 202):
                    told.add(body["task_id"])

            async def deleter() -> None:
                order: list[str] = []
                for steps, which in deletes:
                    for _ in range(steps):
                        await asyncio.sleep(0)
                    order.extend(sorted(told - set(order)))
                    if order:
                        with suppress(asyncio.CancelledError):  # a store call of the DELETE was cancelled
                            await r.call(r.cancel_route, order[which % len(order)], "DELETE")

            await asyncio.gather(*(one(i, *s) for i, s in enumerate(submits)), deleter())
            r.backends.release.set()
            await settle()
            r.service.store = real
            r.assert_idle()
            stored = set(r.stored())
            assert told <= stored, "a task its client was told of is gone"
            assert stored - told <= faulty.unremoved, "a task nobody was told of is kept"

    with scratch() as directory:
        asyncio.run(scenario(directory))
