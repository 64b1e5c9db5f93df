"""One attempt's life with a backend, from admission to the freed slot: the only place it is run.

admit -> wait for a backend slot (a ``Permit``) -> send -> watch (the watchdog) -> orphan (the
client left, or its deadline passed, while the backend still works) -> retry elsewhere under the
retry budget -> finish (ok or failed) -> metrics and access log. The synchronous TTS handler
(scheduler.http.tts) and the async tasks (scheduler.runtime.tasks) both go through it.

A slot is given back exactly once, whatever ends the attempt (an error, cancellation, the client
leaving): the ``Permit`` the dispatcher's slot becomes is finished by whoever holds it last --
this module while sending, an orphan watcher while an abandoned request runs on, the ``Answered``
context while the answer is read -- and a second finish is logged, never applied. Success is
judged by one function (glmtts.responses.succeeded); orphaned backend seconds of a client that left
are counted in one place (``_orphan``; the core scheduler counts those past a deadline itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType

from backend.record import Backend
from backend.state import BackendState
from backend.transport import BackendTimeout, BackendUnavailable, Reply
from glmtts.contract import TTSRequest, upstream_length_class
from glmtts.loop import wait_for
from glmtts.responses import succeeded
from scheduler.core.admission import Rejection
from scheduler.core.deadlines import shed_message, timeout_message
from scheduler.core.queue import Job
from scheduler.errors import BackendFailed, DeadlineExpired, Rejected, SidecarError
from scheduler.runtime.context import Runtime
from scheduler.runtime.dispatcher import QueuedDeadline
from scheduler.runtime.metrics import classify

__all__ = ["PASSED_HEADERS", "Answered", "Exchange", "Intake", "Outcome", "Permit", "Whole"]

# Backend answer headers worth passing on; hop-by-hop and framing headers are ours to set.
PASSED_HEADERS = ("Content-Type", "Allow", "Retry-After")

log = logging.getLogger("glmtts_sidecar.proxy")
access_log = logging.getLogger("glmtts_sidecar.access")


@dataclass(frozen=True, kw_only=True)
class Intake:
    """A validated, attributed TTS request, its job made but not yet admitted."""

    request_id: str
    arrived: float
    body: bytes
    content_type: str
    tts: TTSRequest  # the body as parsed and validated
    job: Job
    fanout: bool | None = None  # the client's X-Fanout: on, off, or None (the configuration decides)


@dataclass
class Outcome:
    """What happened to one TTS request, for the access log."""

    request_id: str = ""  # the client's X-Request-ID (or ours)
    status: int = 0
    outcome: str = "ok"
    reason: str | None = None
    backend: str | None = None
    queue_s: float = 0.0
    started: float = 0.0  # when the job was last forwarded (dispatcher clock)
    service_s: float | None = None
    attempts: int = 0
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Whole:
    """A backend's whole answer to a TTS request (or the joined answer of its pieces), and how it was got."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    ok: bool = True  # upstream's success
    outcome: str = "ok"  # the access log's outcome of the request that ran it
    backend: str | None = None  # the backend that made it (pieces: each one's, comma separated); None: a cache's copy
    queue_s: float = 0.0
    service_s: float | None = None
    pieces: int = 1


class Permit:
    """The backend slot the dispatcher granted one job, given back exactly once: ``finish`` (the
    backend is done with it) or ``requeue`` (it failed before answering; the job waits again)."""

    def __init__(self, runtime: Runtime, job: Job, backend: Backend) -> None:
        self._runtime = runtime
        self.job = job
        self.backend = backend
        self.done = False

    def _settle(self, how: str) -> bool:
        if self.done:
            log.error("request %s: slot on backend %s given back twice (%s); ignored", self.job.id,
                      self.backend.id, how, stack_info=True)
            return False
        self.done = True
        return True

    def finish(self, *, ok: bool) -> None:
        if self._settle("finish"):
            self._runtime.dispatcher.finish(self.job, self.backend, ok=ok)

    def requeue(self) -> asyncio.Future[Backend]:
        if not self._settle("requeue"):
            raise RuntimeError(f"request {self.job.id}: requeue of a slot already given back")
        return self._runtime.dispatcher.requeue(self.job, self.backend)


class Answered:
    """A backend's answer that has begun: read it (``reply``), then ``finish`` once with whether it
    is upstream's success. Used as ``async with``: leaving it releases the reply and finishes a
    failure if nothing did."""

    def __init__(self, runtime: Runtime, permit: Permit, reply: Reply, record: Outcome) -> None:
        self._runtime = runtime
        self.permit = permit
        self.reply = reply
        self.record = record
        self.finished = False

    @property
    def backend(self) -> Backend:
        return self.permit.backend

    def finish(self, ok: bool) -> None:
        """The backend's answer is complete: learn, report the outcome, free the slot."""
        if self.finished:
            log.error("request %s: answer finished twice; ignored", self.permit.job.id, stack_info=True)
            return
        self.finished = True
        job, backend, record, status = self.permit.job, self.backend, self.record, self.reply.status
        if ok:
            backend.model_key = job.model_key
        elif record.outcome == "ok":
            record.outcome = "backend_error" if status >= 500 else "failed"
        backend.served += 1
        self._runtime.served[upstream_length_class(job.chars)] += 1
        # For outlier detection a client's error (4xx) says nothing about the backend.
        healthy = ok or 400 <= status < 500
        ratio = (record.service_s / job.predicted_s) if ok and record.service_s and job.predicted_s else None
        self._runtime.pool.report_outcome(backend, ok=healthy, latency_ratio=ratio)
        self.permit.finish(ok=ok)

    async def __aenter__(self) -> Answered:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.reply.release()
        if not self.finished:
            self.finish(False)


class Exchange:
    """Admission and the attempts of every job, over the runtime's pool, dispatcher and transport."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._orphans: set[asyncio.Task[None]] = set()

    def admit(self, job: Job, *, force: bool = False) -> asyncio.Future[Backend]:
        """Admission: a future for the job's backend slot, or the Rejected error to answer.

        ``force``: a job admitted before (an async task re-queued after a restart) skips the bounds."""
        runtime = self.runtime
        runtime.retries.record_request(runtime.dispatcher.clock())
        admitted = runtime.dispatcher.offer(job, force=force)
        if isinstance(admitted, Rejection):
            rejection = admitted
            raise Rejected(rejection.status, rejection.reason.value, rejection.detail,
                           retry_after=rejection.retry_after_s)
        return admitted

    async def forward(self, job: Job, future: asyncio.Future[Backend], body: bytes, headers: dict[str, str],
                      record: Outcome) -> Answered:
        """Wait for a slot, forward, and return once a backend's answer has begun; a backend that
        fails before answering is reported and the job retried elsewhere within the retry budget.
        The caller reads the answer inside ``async with`` the result."""
        runtime = self.runtime
        clock = runtime.dispatcher.clock
        retrying = False  # holds a permit of the retry budget
        try:
            while True:
                permit = Permit(runtime, job, await self._wait(job, future))
                backend = permit.backend
                record.attempts += 1
                record.backend = backend.id
                record.queue_s = clock() - job.arrived_at
                record.started = clock()
                try:
                    reply = await self._send(permit, body, headers, record)
                except BackendUnavailable as exc:
                    runtime.pool.report_failure(backend, str(exc))
                    runtime.pool.report_outcome(backend, ok=False, latency_ratio=None)
                    retrying = self._retry_permit(job, record, held=retrying)
                    if not retrying:
                        permit.finish(ok=False)
                        # The client learns which backend; its address and the error stay in the log.
                        log.warning("request %s: backend %s failed before answering (%s); no retry left", job.id,
                                    backend.id, exc)
                        raise BackendFailed(f"Backend {backend.id} went away before answering") from None
                    log.warning("request %s: backend %s failed before answering (%s); trying again", job.id,
                                backend.id, exc)
                    future = permit.requeue()
                    continue
                record.service_s = clock() - record.started
                if reply.status < 500:
                    return Answered(runtime, permit, reply, record)
                # A server error before any byte went to the client: another backend may succeed.
                retrying = self._retry_permit(job, record, held=retrying)
                if not retrying:
                    return Answered(runtime, permit, reply, record)  # its finish reports it
                runtime.pool.report_outcome(backend, ok=False, latency_ratio=None)
                log.warning("request %s: backend %s answered HTTP %d; trying again", job.id, backend.id,
                            reply.status)
                reply.release()  # no await: a client leaving now must not strand the slot
                if any(b.state is BackendState.READY for b in runtime.pool.backends if b is not backend):
                    # Out of rotation until health answers `rise` times (nginx's max_fails), so the
                    # failing backend, idle and quick to fail, does not draw the retry back to itself.
                    runtime.pool.report_failure(backend, f"answered HTTP {reply.status}")
                future = permit.requeue()
        finally:
            if retrying:
                runtime.retries.release()

    async def answer_whole(self, job: Job, future: asyncio.Future[Backend], body: bytes, headers: dict[str, str],
                           record: Outcome) -> Whole:
        """``forward``, then the backend's answer read whole and judged; the slot is free on return.
        An answer cut short is a BackendFailed (nothing went to the client yet, but the work is lost)."""
        async with await self.forward(job, future, body, headers, record) as answered:
            reply = answered.reply
            record.status = reply.status
            try:
                data = await reply.read()
            except (BackendUnavailable, BackendTimeout) as exc:
                record.outcome = "backend_cut"
                self.runtime.pool.report_failure(answered.backend, f"answer cut short: {exc}")
                raise BackendFailed(f"The backend's answer was cut short: {exc}") from None
            ok = succeeded(reply.status, data)
            answered.finish(ok)
            passed = {name: reply.headers[name] for name in PASSED_HEADERS if name in reply.headers}
            return Whole(status=reply.status, body=data, headers=passed, ok=ok, outcome=record.outcome,
                         backend=answered.backend.id, queue_s=record.queue_s, service_s=record.service_s)

    def _retry_permit(self, job: Job, record: Outcome, *, held: bool) -> bool:
        """After a failed attempt: give back the retry permit it held (``held``), then whether the
        job may be tried again, taking a permit of the retry budget if so."""
        retries = self.runtime.retries
        if held:
            retries.release()
        now = self.runtime.dispatcher.clock()
        return (record.attempts < self.runtime.config.retries.max_attempts and now < job.deadline_at
                and retries.try_acquire(now))

    async def _wait(self, job: Job, future: asyncio.Future[Backend]) -> Backend:
        try:
            return await future
        except QueuedDeadline as exc:
            raise expired(job, shed=exc.shed) from None
        except asyncio.CancelledError:
            self.runtime.dispatcher.withdraw(job, future)  # the client went away while queued
            raise

    async def _send(self, permit: Permit, body: bytes, headers: dict[str, str], record: Outcome) -> Reply:
        """Forward the original bytes and wait for the answer's headers, until the deadline.

        The exchange is shielded: GLM-TTS cannot cancel, so when the deadline passes or the client
        leaves, the backend slot stays busy until the backend answers, and is freed then. Whatever
        happens here, the permit is finished, handed to an orphan watcher, or (BackendUnavailable,
        a reply) left to the caller."""
        runtime, job, backend = self.runtime, permit.job, permit.backend
        timeout = runtime.config.backends.request_timeout_s
        task = asyncio.ensure_future(runtime.transport.open(
            "POST", backend.url + "/api/v1/tts", body=body, headers=headers, timeout=timeout))
        self._watch(task, permit)
        left = job.deadline_at - runtime.dispatcher.clock()
        try:
            return await wait_for(asyncio.shield(task), max(0.0, left))
        except asyncio.TimeoutError:
            runtime.dispatcher.answered_early(job)
            self._orphan(task, permit)
            record.outcome = "deadline_running"
            raise expired(job) from None
        except asyncio.CancelledError:
            self._orphan(task, permit, client_left=runtime.dispatcher.clock())
            raise
        except BackendTimeout as exc:
            runtime.pool.report_failure(backend, str(exc))
            permit.finish(ok=False)
            raise BackendFailed(f"Backend {backend.id} did not answer within {timeout:g} s") from exc
        except BackendUnavailable:
            raise
        except Exception as exc:  # the request could not even be sent: the slot is free again
            log.exception("request %s: cannot forward to backend %s", job.id, backend.id)
            permit.finish(ok=False)
            raise BackendFailed(f"The request could not be forwarded to backend {backend.id}: "
                                f"{exc.__class__.__name__}") from exc

    def _watch(self, task: asyncio.Future[Reply], permit: Permit) -> None:
        """The watchdog: a request still without an answer far beyond its prediction means a stuck
        backend; kill it (its supervisor restarts it) and the request is retried elsewhere."""
        job, backend = permit.job, permit.backend
        limit = self.runtime.config.backends.watchdog.limit_s(job.p95_s)

        def fire() -> None:
            if not task.done():
                log.error("request %s: no answer from backend %s after %.0f s (predicted p95 %.1f s); killing it",
                          job.id, backend.id, limit, job.p95_s)
                self.runtime.pool.kill_backend(backend, f"watchdog: request {job.id} ran over {limit:.0f} s")

        handle = asyncio.get_running_loop().call_later(limit, fire)
        task.add_done_callback(lambda _: handle.cancel())

    def _orphan(self, task: asyncio.Future[Reply], permit: Permit, *, client_left: float | None = None) -> None:
        """Keep the slot busy until the backend really finishes the abandoned request. ``client_left``:
        when its client went away (not a deadline, which the scheduler counts itself)."""
        runtime, job, backend = self.runtime, permit.job, permit.backend

        async def finish() -> None:
            ok = False
            try:
                reply = await task
                try:
                    ok = succeeded(reply.status, await reply.read())
                except (BackendUnavailable, BackendTimeout):
                    pass
                finally:
                    reply.release()
            except (BackendUnavailable, BackendTimeout) as exc:
                runtime.pool.report_failure(backend, str(exc))
            finally:
                permit.finish(ok=ok)
                if client_left is not None:  # backend time nobody will receive: orphaned, not lost
                    runtime.scheduler.tally.orphaned_s += max(0.0, runtime.dispatcher.clock() - client_left)
                log.info("request %s: backend %s finished work whose client was already answered", job.id,
                         backend.id)

        orphan = asyncio.ensure_future(finish())
        self._orphans.add(orphan)
        orphan.add_done_callback(self._orphans.discard)

    @contextlib.contextmanager
    def reporting(self, job: Job, record: Outcome, arrived: float, *, gone: str = "client_gone") -> Iterator[None]:
        """Run one request's handling and report it once, however it ends: a SidecarError answered
        is "rejected" with its status and reason, unless the attempt already said what happened
        (a deadline passed while running, an answer cut short); cancellation is the client gone
        (``gone``: the reason, e.g. "shutdown" for work no client waits on)."""
        try:
            yield
        except SidecarError as exc:
            if record.outcome == "ok":
                record.status, record.outcome, record.reason = exc.status, "rejected", exc.reason
            raise
        except asyncio.CancelledError:
            record.outcome, record.reason = "client_gone", gone
            raise
        finally:
            self.report(job, record, arrived)

    def report(self, job: Job, record: Outcome, arrived: float) -> None:
        """The access log line and the metrics of one finished request."""
        runtime = self.runtime
        total_s = runtime.dispatcher.clock() - arrived
        entry = {
            "id": record.request_id, "tenant": job.tenant, "band": runtime.tenants.band_names[job.band],
            "chars": job.chars, "units": job.units, "class": job.cls, "predicted_s": round(job.predicted_s, 3),
            "service_s": None if record.service_s is None else round(record.service_s, 3),
            "queue_s": round(record.queue_s, 3), "total_s": round(total_s, 3),
            "backend": record.backend, "status": record.status, "outcome": record.outcome,
            "reason": record.reason, "attempts": record.attempts,
        }
        pieces = record.extra.get("pieces")
        if pieces is not None:  # split (scheduler.runtime.fanout): its service is the pieces' wall time
            entry["pieces"] = pieces
            entry["cut"] = record.extra.get("cut")
        # Text logs carry the entry as a JSON message; JSON logs merge its fields into the record.
        access_log.info(json.dumps(entry, ensure_ascii=False), extra={"access": entry})
        runtime.metrics.request_finished(
            cls=job.cls, tenant=job.tenant, outcome=classify(record.status, record.outcome),
            total_s=runtime.dispatcher.clock() - arrived, queue_s=record.queue_s if record.attempts else None,
            service_s=record.service_s, predicted_s=None if pieces is not None else job.predicted_s)

    async def close(self) -> None:
        """Wait for orphaned backend work, so no slot accounting is left dangling."""
        self.runtime.dispatcher.close()
        if self._orphans:
            await asyncio.gather(*self._orphans, return_exceptions=True)


def expired(job: Job, *, shed: bool = False) -> DeadlineExpired:
    """Upstream's 408; ``shed``: taken out of the queue at its latest start, said why."""
    budget = job.deadline_at - job.arrived_at
    if shed:
        return DeadlineExpired(shed_message(budget, job.chars, job.predicted_s))
    return DeadlineExpired(timeout_message(budget, job.chars))
