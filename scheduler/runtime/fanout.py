"""Fan-out (docs/fanout.md): one long TTS request split into pieces synthesized at once, joined in order.

``decide`` says whether a request is split and how: only when fan-out is on for it (``fanout``
config, or the client's ``X-Fanout``), its text is long enough, the pool is calm (no request
turned away for want of capacity or run out of time in the queue lately: ``Scheduler.pressure``)
and at least two backend slots are free with nothing queued
(``Scheduler.free_slots``); the text is then cut at sentence ends into
pieces balanced over those free slots, its "lanes" (glmtts.split.split_balanced; ``pieces_per_slot``
pieces per lane, so a lane that finishes early takes more). Under load nothing is
free, and a request runs whole exactly as without fan-out: splitting never takes a slot another
request waits for. A streamed answer is split even on one lane (its pieces one after another), for
an early first piece.

``SplitRun`` runs one split request. Admission judges it whole (``Dispatcher.offer_pieces``); its
first pieces, one per lane, are queued together and start at once; each lane, when its piece is
answered, queues the next piece nobody started as a continuation, which goes before new requests of
its band. Every piece keeps the request's class, band, tenant and deadline, is retried like any
request (the exchange), and is charged to the tenant (its own predicted seconds: the tenant pays
the sum). A piece whose backend answers other than success fails the request with that answer
(``PieceFailed``): no partial audio in upstream's JSON. ``close`` on every path (a failure, the
client leaving): pieces still queued leave the queue, pieces not made are never made, and a piece
a backend is running finishes there (GLM-TTS cannot cancel), freeing its slot then.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from backend.record import Backend
from glmtts.audio import Pcm, decode_wav
from glmtts.contract import tts_fields
from glmtts.form import encode_multipart, multipart_content_type
from glmtts.responses import JoinedSuccess
from glmtts.split import even_and_tapered, longest_first, split_balanced
from glmtts.text import units
from scheduler.config import FanoutConfig
from scheduler.core.admission import Rejection
from scheduler.core.makespan import expected_makespan, noise_sigma, tail_share
from scheduler.core.queue import Job
from scheduler.errors import BackendFailed, Rejected, SidecarError
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import Exchange, Intake, Outcome, Whole

__all__ = ["PieceFailed", "Plan", "SplitRun", "answer_pcm", "decide", "synthesize", "whole_cut"]

log = logging.getLogger("glmtts_sidecar.fanout")


@dataclass(frozen=True)
class Plan:
    """A split: the pieces' texts in order, how many may run at once, the order they start in
    (indices into ``texts``; each index once), and how the text was cut."""

    texts: tuple[str, ...]
    lanes: int
    order: tuple[int, ...]
    cut: str = "even"  # "even", "tapered" (big first pieces, smaller ones behind: ``whole_cut``) or "stream"


def decide(runtime: Runtime, intake: Intake, *, choice: bool | None, stream: bool = False) -> Plan | None:
    """The split of ``intake``'s request, or None to synthesize it whole (the reason counted).
    ``choice``: the client's ``X-Fanout`` (None: the configuration decides). ``stream``: the answer
    is streamed, so its first piece is short (``first_chars``) and one lane is enough."""
    config = runtime.config.fanout
    tts, job = intake.tts, intake.job
    reason = None
    if choice is False:
        reason = "client_off"
    elif choice is None and not config.enabled:
        reason = "disabled"
    elif choice is None and tts.chars < config.min_text_chars:
        reason = "short_text"
    lanes = 0
    if reason is None:
        dispatcher, scheduler = runtime.dispatcher, runtime.scheduler
        now, views = dispatcher.clock(), dispatcher.views()
        pressed = scheduler.pressure(now)
        lanes = 0 if pressed else scheduler.free_slots(job, now, views)
        if lanes < 2:  # a streamed answer is still split, its pieces one after another, for early audio
            reason = None if stream else ("pressure" if pressed else "busy")
            lanes = 1 if stream else 0
    texts: list[str] = []
    tapered = False
    if reason is None:
        if stream:
            texts = split_balanced(tts.input_text, lanes=lanes * config.pieces_per_slot, min_chars=config.min_chars,
                                   max_chars=config.max_chars, first_chars=config.first_chars)
        else:
            cost, key = runtime.scheduler.cost, job.model_key
            texts, tapered = whole_cut(tts.input_text, lanes=lanes, config=config,
                                       sigma=noise_sigma(job.predicted_s, job.p95_s),
                                       seconds=lambda piece: cost.predict(units(piece), key).mean_s)
        if len(texts) < 2:
            reason = "one_piece"
    if reason is not None:
        runtime.metrics.fanout(declined=reason)
        return None
    cut = "stream" if stream else "tapered" if tapered else "even"
    runtime.metrics.fanout(pieces=len(texts), cut=cut)
    # A stream plays the pieces in text order, so they start in it; a whole answer waits for the
    # last piece, which comes soonest when the longest start first.
    order = range(len(texts)) if stream else longest_first(texts)
    return Plan(tuple(texts), min(lanes, len(texts)), tuple(order), cut=cut)


def whole_cut(text: str, *, lanes: int, config: FanoutConfig, sigma: float,
              seconds: Callable[[str], float]) -> tuple[list[str], bool]:
    """The cut of a whole (not streamed) answer's ``text`` over ``lanes`` free slots, and whether it
    is the tapered one. ``sigma``: the service-time noise the cost model measures
    (``scheduler.core.makespan.noise_sigma``); ``seconds``: a piece's predicted mean service.
    Both cuts come from one scan (``glmtts.split.even_and_tapered``): ``pieces_per_slot`` even
    pieces per lane, and (``taper`` on, noise measured) big first pieces with
    ``tail_share(sigma, lanes)`` of the text in smaller ones behind them. The tapered cut is
    kept only when its expected makespan over the same noise draws, longest piece first, is
    shorter (``scheduler.core.makespan``). A text that needs more than ``lanes × pieces_per_slot``
    pieces of ``max_chars`` is many pieces already (lanes that free take the next): split
    returns no tapered cut for it, so neither the cut nor the estimate is done for nothing."""
    share = tail_share(sigma, lanes) if config.taper else 0.0
    even, tapered = even_and_tapered(text, lanes=lanes, per_lane=config.pieces_per_slot, tail_share=share,
                                     min_chars=config.min_chars, max_chars=config.max_chars)
    if tapered == even:  # no tail asked for, or none to cut (a text too long gives the even cut twice)
        return even, False

    def makespan(pieces: Sequence[str]) -> float:
        return expected_makespan([seconds(pieces[index]) for index in longest_first(pieces)], lanes, sigma)

    if makespan(tapered) < makespan(even):
        return tapered, True
    return even, False


class PieceFailed(Exception):
    """A piece's backend answered, but not with success (after its retries): the request's answer."""

    def __init__(self, whole: Whole) -> None:
        super().__init__(f"a piece failed with HTTP {whole.status}")
        self.whole = whole


def answer_pcm(answer: bytes) -> Pcm:
    """The samples in a backend's successful JSON answer (CPU-bound for a long text: off the loop)."""
    try:
        payload = json.loads(answer)
        return decode_wav(base64.b64decode(payload["audio_base64"], validate=True))
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BackendFailed(f"The backend's answer held no usable audio: {exc}") from None


class SplitRun:
    """One split request's pieces in flight. ``start`` (admission), then ``audio`` or ``joined``,
    and always ``close``. ``record`` collects the request's access-log outcome across its pieces.
    ``headers``: what every piece is forwarded with (the request id), its Content-Type added."""

    def __init__(self, runtime: Runtime, exchange: Exchange, intake: Intake, plan: Plan, record: Outcome,
                 headers: dict[str, str]) -> None:
        self.runtime = runtime
        self.exchange = exchange
        self.intake = intake
        self.plan = plan
        self.record = record
        self._headers = headers
        self._done: list[asyncio.Future[Pcm]] = []
        self._lanes: set[asyncio.Task[None]] = set()
        self._next = 0  # where in plan.order the next piece no lane has taken is
        self._backends: list[str] = []
        self._first_start: float | None = None
        self._last_answer: float | None = None
        record.extra["pieces"] = len(plan.texts)
        record.extra["cut"] = plan.cut

    @property
    def pieces(self) -> int:
        return len(self.plan.texts)

    def start(self) -> None:
        """Admission of the request, judged whole; its first pieces (one per lane) are queued
        together. Raises Rejected as a whole request's admission would."""
        runtime, parent = self.runtime, self.intake.job
        runtime.retries.record_request(runtime.dispatcher.clock())
        starting = self.plan.order[:self.plan.lanes]
        first = [self._job(i) for i in starting]
        admitted = runtime.dispatcher.offer_pieces(parent, first)
        if isinstance(admitted, Rejection):
            raise Rejected(admitted.status, admitted.reason.value, admitted.detail, retry_after=admitted.retry_after_s)
        loop = asyncio.get_running_loop()
        self._done = [loop.create_future() for _ in self.plan.texts]
        self._next = len(first)
        for index, job, future in zip(starting, first, admitted, strict=True):
            lane = asyncio.ensure_future(self._lane(index, job, future))
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)

    def _job(self, index: int, *, continues: bool = False) -> Job:
        text = self.plan.texts[index]
        job = self.runtime.scheduler.make_piece(self.intake.job, id=f"{self.intake.job.id}.{index}", chars=len(text),
                                                units=units(text))
        job.continues = continues
        return job

    def _body(self, index: int) -> tuple[bytes, str]:
        fields = tts_fields(self.intake.tts, input_text=self.plan.texts[index])
        for _ in range(3):  # a random delimiter inside an uploaded prompt: practically never, then another
            boundary = uuid.uuid4().hex
            try:
                return encode_multipart(fields, boundary=boundary), multipart_content_type(boundary)
            except ValueError:
                continue
        raise BackendFailed("The request's pieces could not be encoded for the backend")

    async def _lane(self, index: int, job: Job, future: asyncio.Future[Backend]) -> None:
        """Run pieces one after another on this lane's slot until none is left unstarted. The next
        piece is queued and forwarded as soon as this one is answered, while this one's audio is
        decoded, so the slot never waits on the decoding; it is stopped like a client's request
        (``_stop``) when the decoding fails or the lane stops."""
        answering: asyncio.Task[Whole] | None = asyncio.ensure_future(self._answer(index, job, future))
        try:
            while answering is not None:
                whole = await answering
                answered, answering = index, None
                if self._next < self.pieces:
                    index, self._next = self.plan.order[self._next], self._next + 1
                    following = self._job(index, continues=True)
                    answering = asyncio.ensure_future(
                        self._answer(index, following, self.runtime.dispatcher.add_piece(following)))
                pcm = await asyncio.to_thread(answer_pcm, whole.body)
                if self._done[answered].done():  # the request already failed elsewhere
                    return
                self._done[answered].set_result(pcm)
        except asyncio.CancelledError:
            raise
        except (SidecarError, PieceFailed) as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: the request fails, the lane does not die silently
            log.exception("request %s: piece %d failed", self.record.request_id, index)
            self._fail(BackendFailed(f"A piece of the request failed: {exc.__class__.__name__}"))
        finally:
            if answering is not None:
                await _stop(answering)

    def _fail(self, exc: BaseException) -> None:
        """The request failed: every piece not yet answered gets the failure (the reader learns at
        once, not after the pieces before it), and the other lanes stop."""
        for done in self._done:
            if not done.done():
                done.set_exception(exc)
        for lane in list(self._lanes):
            if lane is not asyncio.current_task():
                lane.cancel()

    async def _answer(self, index: int, job: Job, future: asyncio.Future[Backend]) -> Whole:
        """Piece ``index`` forwarded (``job`` waiting on ``future``) and answered with success."""
        body, content_type = self._body(index)
        piece = Outcome(request_id=self.record.request_id)
        headers = {**self._headers, "Content-Type": content_type}
        try:
            whole = await self.exchange.answer_whole(job, future, body, headers, piece)
        finally:
            self._note(piece)
        if not whole.ok:
            raise PieceFailed(whole)
        return whole

    def _note(self, piece: Outcome) -> None:
        """Fold one piece's attempt into the request's record."""
        record, clock = self.record, self.runtime.dispatcher.clock
        record.attempts += piece.attempts
        if piece.backend is not None and piece.backend not in self._backends:
            self._backends.append(piece.backend)
            record.backend = ",".join(self._backends)
        if piece.attempts and self._first_start is None:
            self._first_start = piece.started
            record.queue_s, record.started = piece.queue_s, piece.started
        if piece.service_s is not None:
            self._last_answer = clock()
        if piece.outcome != "ok" and record.outcome == "ok":
            record.outcome = piece.outcome
        if piece.status:
            record.status = piece.status

    @property
    def service_s(self) -> float | None:
        """Wall seconds from the first piece's forwarding to the last answer: the request's synthesis."""
        if self._first_start is None or self._last_answer is None:
            return None
        return max(0.0, self._last_answer - self._first_start)

    async def audio(self) -> AsyncIterator[Pcm]:
        """Each piece's samples in order, as soon as it and every piece before it are answered;
        the request's failure (SidecarError or PieceFailed) as soon as any piece fails."""
        for done in self._done:
            yield await asyncio.shield(done)

    async def joined(self) -> Whole:
        """The whole answer in upstream's JSON shape: the pieces joined (``fanout.crossfade_s`` or
        ``pause_s``) into one WAV, ``generation_time`` the pieces' wall time; or the failed piece's
        answer as it came. The answer is assembled as the pieces come in text order
        (``JoinedSuccess``), so the last piece leaves little to do."""
        config = self.runtime.config.fanout
        answer = JoinedSuccess(crossfade_s=config.crossfade_s, pause_s=config.pause_s)
        body, index = None, 0
        try:
            while body is None:
                ready = [await asyncio.shield(self._done[index])]
                index += 1
                while index < self.pieces and self._done[index].done():
                    ready.append(self._done[index].result())  # a failed piece raises here
                    index += 1
                body = await asyncio.to_thread(self._assemble, answer, ready, index == self.pieces)
        except PieceFailed as failed:
            self.record.service_s = self.service_s
            return failed.whole
        seconds = self.service_s or 0.0
        self.record.service_s = seconds
        return Whole(status=200, body=body, headers={"Content-Type": "application/json"}, ok=True,
                     outcome=self.record.outcome, backend=self.record.backend, queue_s=self.record.queue_s,
                     service_s=seconds, pieces=self.pieces)

    def _assemble(self, answer: JoinedSuccess, pcms: Sequence[Pcm], last: bool) -> bytes | None:
        for pcm in pcms:
            answer.push(pcm)
        # every piece is answered once the last is pushed: the wall time is known
        return answer.finish(generation_time=round(self.service_s or 0.0, 2)) if last else None

    async def close(self) -> None:
        """Stop every lane (queued pieces leave the queue; a running one is left to finish on its
        backend, which frees its slot then) and wait until they have."""
        lanes = list(self._lanes)
        for lane in lanes:
            lane.cancel()
        if lanes:
            await asyncio.gather(*lanes, return_exceptions=True)
        for done in self._done:
            if done.done() and not done.cancelled():
                done.exception()  # retrieved: a failure already answered is not "never retrieved"
            else:
                done.cancel()


async def _stop(task: asyncio.Task[Whole]) -> None:
    """Stop a piece's exchange as a departing client's (queued: it leaves the queue; forwarded: its
    backend finishes it, freeing the slot then) and wait until it has, even when cancelled meanwhile."""
    task.cancel()
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            continue
    if not task.cancelled():
        task.exception()  # retrieved: the request's answer no longer depends on it


async def synthesize(runtime: Runtime, exchange: Exchange, intake: Intake, record: Outcome, headers: dict[str, str],
                     plan: Plan | None) -> Whole:
    """The request's whole answer: forwarded as it came (``plan`` None), or split and joined."""
    if plan is None:
        job = intake.job
        return await exchange.answer_whole(job, exchange.admit(job), intake.body,
                                           {**headers, "Content-Type": intake.content_type}, record)
    run = SplitRun(runtime, exchange, intake, plan, record, headers)
    run.start()
    try:
        return await run.joined()
    finally:
        await run.close()
