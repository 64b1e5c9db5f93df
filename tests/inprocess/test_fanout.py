"""Fan-out in-process: a long text split over the backends that are free, joined in order, and streamed.

The sidecar's app under pytest-aiohttp's client; its backends are in-memory ones (backend.fake)
that answer each text with a WAV whose samples hold one level derived from that text and whose
length grows with it, so a joined answer shows which piece went where, in what order, and how
long each was. After each test nothing is left queued, in service or unreleased.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import wave
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import openai
import pytest
from aiohttp import ClientTimeout, web
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest

from backend.fake import FakeAnswer, FakeBackend, FakeRequest, FakeTransport
from glmtts.audio import decode_wav
from glmtts.contract import parse_tts_form
from glmtts.form import parse_form
from glmtts.responses import success_json
from glmtts.text import units
from glmtts.wav import write_wav
from scheduler.config import parse_config
from scheduler.http.app import RUNTIME, build_app
from scheduler.runtime.context import Runtime
from tests.inprocess.support import assert_nothing_held, until

URLS = [f"http://backend-{i}.test:9000" for i in range(4)]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SECONDS_PER_CHAR = 0.01
SENTENCES = ["The quick brown fox jumps over the dog.", "A second sentence follows here!",
             "Is this the third one?", "Yes, and then a fourth sentence comes along.",
             "Fifth: the pieces must stay in order.", "Sixth and last, it ends the text."]
LONG = " ".join(SENTENCES)  # 220 characters
MORE = ("Seventh comes after the sixth, as it should. Eighth is short. Ninth keeps the count going on. "
        "Tenth: nearly done now! Eleventh is the one before last. Twelfth, and that is all of it.")
FANOUT = {"enabled": True, "min_text_chars": 50, "min_chars": 10, "max_chars": 80, "first_chars": 25,
          "pieces_per_slot": 1, "crossfade_s": 0.005, "pause_s": 0.0}
ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def level(text: str) -> int:
    """The sample level a backend speaks ``text`` with: different texts, different levels."""
    return 1000 + zlib.crc32(text.encode()) % 20000


def spoken(text: str, rate: int) -> FakeAnswer:
    samples = np.full(int(rate * SECONDS_PER_CHAR * len(text)), level(text), dtype="<i2")
    return FakeAnswer(body=success_json(write_wav(samples.tobytes(), rate), sample_rate=rate, generation_time=0.1))


class Speaker(FakeBackend):
    """A backend whose answer says which text it spoke (``level``), as long as the text."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.fields: list[dict[str, Any]] = []

    async def _tts(self, request: FakeRequest) -> FakeAnswer:
        tts = parse_tts_form(parse_form(request.headers.get("Content-Type"), request.body))
        self.texts.append(tts.input_text)
        self.fields.append({k: v for k, v in vars(tts).items() if k != "input_text"})
        answer = await super()._tts(request)
        return answer if self.answer is not None else spoken(tts.input_text, tts.sample_rate)


@dataclass
class Sidecar:
    client: TestClient[web.Request, web.Application]
    runtime: Runtime
    transport: FakeTransport
    backends: list[Speaker]

    async def tts(self, text: str = LONG, **headers: str) -> tuple[int, dict[str, str], bytes]:
        body = f"input_text={text}&index=exampleA&seed=7".encode()
        async with self.client.post("/api/v1/tts", data=body, headers={**FORM, **headers}) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    def texts(self) -> list[str]:
        return [t for b in self.backends for t in b.texts]

    def gate(self) -> asyncio.Event:
        gate = asyncio.Event()
        for backend in self.backends:
            backend.gate = gate
        return gate

    async def assert_idle(self) -> None:
        await assert_nothing_held(self.runtime)
        assert self.transport.unreleased() == []

    def gone(self) -> float:
        """Requests whose client left, as the metrics counted them (the handler's last word)."""
        registry = self.runtime.metrics.registry
        return sum(registry.get_sample_value("glmtts_sidecar_requests_total",
                                             {"class": cls, "tenant": "default", "outcome": "client_gone"}) or 0.0
                   for cls in ("short", "medium", "long"))


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start(aiohttp_client: ClientFactory) -> AsyncIterator[SidecarFactory]:
    async def go(urls: list[str] = URLS, **sections: Any) -> Sidecar:
        transport = FakeTransport()
        backends = [Speaker() for _ in urls]
        for url, backend in zip(urls, backends, strict=True):
            transport.route(url, backend)
        data: dict[str, Any] = {
            "backends": {"gpus": [], "external": urls, "slots": 1,
                         "health": {"interval_s": 0.02, "timeout_s": 1.0, "rise": 1},
                         "warmup": {"enabled": False}, **sections.pop("backends", {})},
            "tasks": {"enabled": False}, "fanout": {**FANOUT, **sections.pop("fanout", {})}, **sections}
        app = build_app(parse_config(json.dumps(data), check_paths=False), transport=transport)
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        sidecar = Sidecar(client, app[RUNTIME], transport, backends)
        await until(lambda: len(sidecar.runtime.ready_backends()) == len(urls), "every backend to be ready")
        return sidecar

    yield go


def joined_audio(body: bytes) -> tuple[np.ndarray[Any, Any], int, dict[str, Any]]:
    payload = json.loads(body)
    pcm = decode_wav(base64.b64decode(payload["audio_base64"]))
    return np.frombuffer(pcm.samples, dtype="<i2"), pcm.rate, payload


def segments(samples: np.ndarray[Any, Any], texts: list[str], rate: int, overlap: int) -> list[int]:
    """The level in the middle of each piece's stretch of ``samples``, pieces in ``texts`` order."""
    levels, at = [], 0
    for text in texts:
        n = int(rate * SECONDS_PER_CHAR * len(text))
        levels.append(int(samples[at + n // 2]))
        at += n - overlap
    return levels


def squeezed(text: str) -> str:
    return re.sub(r"\s", "", text)


# --- the JSON API ------------------------------------------------------------------------------------


async def test_a_long_text_on_an_idle_pool_is_split_over_every_backend_and_joined_in_order(
        start: SidecarFactory) -> None:
    sidecar = await start()
    status, headers, body = await sidecar.tts()
    assert status == 200
    pieces = [t for t in sidecar.texts()]
    assert headers["X-Fanout-Pieces"] == str(len(pieces)) and 2 <= len(pieces) <= 4
    assert all(len(b.texts) <= 1 for b in sidecar.backends)  # one piece per free backend, all at once
    in_order = sorted(pieces, key=LONG.index)
    assert squeezed("".join(in_order)) == squeezed(LONG) and all(len(p) <= FANOUT["max_chars"] for p in pieces)
    # Every piece spoke with the request's prompt, seed and sampling fields.
    assert all(fields == sidecar.backends[0].fields[0] for b in sidecar.backends for fields in b.fields)
    assert sidecar.backends[0].fields[0]["seed"] == 7 and sidecar.backends[0].fields[0]["index"] == "exampleA"
    samples, rate, payload = joined_audio(body)
    assert list(payload) == ["success", "message", "audio_base64", "sample_rate", "generation_time", "error"]
    assert payload["success"] is True and payload["sample_rate"] == rate == 24000
    overlap = round(FANOUT["crossfade_s"] * rate)
    lengths = [int(rate * SECONDS_PER_CHAR * len(p)) for p in in_order]
    assert len(samples) == sum(lengths) - (len(in_order) - 1) * overlap  # the sum less the crossfades
    assert segments(samples, in_order, rate, overlap) == [level(p) for p in in_order]
    assert headers["X-Backend"].count(",") == len(pieces) - 1
    await sidecar.assert_idle()


async def test_with_two_pieces_per_slot_a_lane_done_early_takes_the_next_piece(start: SidecarFactory) -> None:
    sidecar = await start(fanout={"pieces_per_slot": 2})
    status, headers, body = await sidecar.tts()
    pieces = sorted(sidecar.texts(), key=LONG.index)
    assert status == 200 and 4 < len(pieces) <= 8 and int(headers["X-Fanout-Pieces"]) == len(pieces)
    assert sum(1 for b in sidecar.backends if b.texts) == 4  # every free backend took part
    samples, rate, _ = joined_audio(body)
    assert segments(samples, pieces, rate, round(FANOUT["crossfade_s"] * rate)) == [level(p) for p in pieces]
    await sidecar.assert_idle()


@pytest.mark.parametrize(("taper", "cut"), [(True, "tapered"), (False, "even")])
async def test_under_measured_noise_a_whole_answer_is_cut_into_big_pieces_then_small_ones(
        start: SidecarFactory, caplog: pytest.LogCaptureFixture, taper: bool, cut: str) -> None:
    # A p95 twice the mean: service times noisy enough (σ ≈ 0.42) for tapering to pay on 4 lanes.
    sidecar = await start(fanout={"pieces_per_slot": 2, "taper": taper}, cost={"p95_ratio": 2.0, "prior_weight": 1e6})
    text = f"{LONG} {MORE}"
    gate = sidecar.gate()
    with caplog.at_level("INFO", logger="glmtts_sidecar.access"):
        answer = asyncio.ensure_future(sidecar.tts(text))
        await until(lambda: len(sidecar.texts()) == 4, "a first piece on every backend")
        first = sidecar.texts()
        gate.set()
        status, headers, body = await answer
    assert status == 200
    pieces = sorted(sidecar.texts(), key=text.index)
    assert int(headers["X-Fanout-Pieces"]) == len(pieces)
    samples, rate, _ = joined_audio(body)
    assert segments(samples, pieces, rate, round(FANOUT["crossfade_s"] * rate)) == [level(p) for p in pieces]
    entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "glmtts_sidecar.access"]
    assert [e["cut"] for e in entries] == [cut]
    metrics = generate_latest(sidecar.runtime.metrics.registry).decode()
    assert f'glmtts_sidecar_fanout_cuts_total{{cut="{cut}"}} 1.0' in metrics
    rest = [p for p in pieces if p not in first]
    if taper:  # the four that started first are the text's first part, each longer than any behind them
        assert sorted(first, key=text.index) == pieces[:4]
        assert min(map(len, first)) > max(map(len, rest))
    else:
        assert max(map(len, pieces)) - min(map(len, pieces)) < min(map(len, first))
    await sidecar.assert_idle()


@pytest.mark.parametrize(("sections", "headers", "reason"), [
    ({"fanout": {"enabled": False}}, {}, "disabled"),
    ({}, {"X-Fanout": "off"}, "client_off"),
    ({"fanout": {"min_text_chars": 1000}}, {}, "short_text"),
])
async def test_a_request_not_split_is_forwarded_whole(start: SidecarFactory, sections: dict[str, Any],
                                                      headers: dict[str, str], reason: str) -> None:
    sidecar = await start(**sections)
    status, answer_headers, _body = await sidecar.tts(**headers)
    assert status == 200 and sidecar.texts() == [LONG]
    assert "X-Fanout-Pieces" not in answer_headers
    metrics = generate_latest(sidecar.runtime.metrics.registry).decode()
    assert f'glmtts_sidecar_fanout_declined_total{{reason="{reason}"}} 1.0' in metrics
    await sidecar.assert_idle()


async def test_x_fanout_on_splits_even_when_the_configuration_does_not(start: SidecarFactory) -> None:
    sidecar = await start(fanout={"enabled": False})
    status, headers, _ = await sidecar.tts(**{"X-Fanout": "ON"})
    assert status == 200 and int(headers["X-Fanout-Pieces"]) >= 2 and len(sidecar.texts()) >= 2
    await sidecar.assert_idle()


@pytest.mark.parametrize("value", ["yes", "", "on,off", "\u00e9"])
async def test_a_bad_x_fanout_is_a_400_naming_the_header(start: SidecarFactory, value: str) -> None:
    sidecar = await start(urls=URLS[:1])
    body = b"input_text=hello&index=exampleA"
    async with sidecar.client.post("/api/v1/tts", data=body,
                                   headers={**FORM, "X-Fanout": value.encode("utf-8").decode("latin-1")}) as resp:
        assert resp.status == 400
        detail = (await resp.json())["detail"]
    assert detail.startswith("X-Fanout must be 'on' or 'off'")
    assert sidecar.texts() == []
    await sidecar.assert_idle()


async def test_a_busy_pool_runs_a_long_text_whole(start: SidecarFactory) -> None:
    """Fan-out takes only slots free when a request starts: none free, none taken."""
    sidecar = await start(urls=URLS[:2])
    gate = sidecar.gate()
    short = [asyncio.create_task(sidecar.tts(f"a short text number {i}", **{"X-Fanout": "off"})) for i in range(2)]
    await until(lambda: sum(b.busy for b in sidecar.backends) == 2, "both backends to be busy")
    long = asyncio.create_task(sidecar.tts())
    await until(lambda: len(sidecar.runtime.scheduler.queue) == 1, "the long text to queue")
    assert [j.parent for j in sidecar.runtime.scheduler.queue.jobs()] == [None]  # queued whole
    gate.set()
    status, headers, _ = await long
    assert status == 200 and "X-Fanout-Pieces" not in headers and LONG in sidecar.texts()
    assert [(await s)[0] for s in short] == [200, 200]
    metrics = generate_latest(sidecar.runtime.metrics.registry).decode()
    assert 'glmtts_sidecar_fanout_declined_total{reason="busy"} 1.0' in metrics
    await sidecar.assert_idle()


async def test_more_pieces_than_free_slots_run_as_each_lane_frees(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:2], fanout={"max_chars": 40, "min_chars": 10})
    status, headers, body = await sidecar.tts()
    assert status == 200
    pieces = sorted(sidecar.texts(), key=LONG.index)
    assert int(headers["X-Fanout-Pieces"]) == len(pieces) > 2 and squeezed("".join(pieces)) == squeezed(LONG)
    samples, rate, _ = joined_audio(body)
    assert segments(samples, pieces, rate, round(FANOUT["crossfade_s"] * rate)) == [level(p) for p in pieces]
    await sidecar.assert_idle()


def on_arrival(sidecar: Sidecar, hook: Callable[[str], Awaitable[None]]) -> None:
    """Every backend awaits ``hook(text)`` with each piece's text as it arrives, before answering."""
    for backend in sidecar.backends:
        original = backend._tts

        async def hooked(request: FakeRequest, original: Any = original) -> FakeAnswer:
            await hook(parse_tts_form(parse_form(request.headers.get("Content-Type"), request.body)).input_text)
            return await original(request)

        backend._tts = hooked  # type: ignore[method-assign]


def record_arrivals(sidecar: Sidecar) -> list[str]:
    """Every piece's text in the order it reached any backend."""
    arrivals: list[str] = []

    async def record(text: str) -> None:
        arrivals.append(text)

    on_arrival(sidecar, record)
    return arrivals


async def test_a_whole_answer_starts_the_longest_pieces_first_and_a_stream_starts_in_text_order(
        start: SidecarFactory) -> None:
    # Two lanes, uneven pieces: each lane takes the next piece of the plan's order as it frees, so
    # a piece never reaches a backend before one `lanes` places behind it in that order.
    text = ("Short one. " + "This middle sentence is quite a bit longer than the first one. " + "Tiny. "
            + "And here the longest sentence of them all comes, well past the others in length. " + "Last bit.")
    sidecar = await start(urls=URLS[:2], fanout={"max_chars": 90, "min_chars": 5, "min_text_chars": 20,
                                                 "pieces_per_slot": 4})
    arrivals = record_arrivals(sidecar)
    status, headers, body = await sidecar.tts(text)
    assert status == 200 and int(headers["X-Fanout-Pieces"]) == len(arrivals) >= 4, arrivals
    assert all(units(a) >= units(b) for a, b in zip(arrivals, arrivals[2:], strict=False)), arrivals
    assert max(arrivals[:2], key=units) == max(arrivals, key=units)  # the longest piece starts at once
    pieces = sorted(arrivals, key=text.index)
    samples, rate, _ = joined_audio(body)  # joined in text order whatever order they ran in
    assert segments(samples, pieces, rate, round(FANOUT["crossfade_s"] * rate)) == [level(p) for p in pieces]

    arrivals.clear()
    async with sidecar.client.post("/v1/audio/speech", json=speech(input=text, response_format="pcm",
                                                                  stream_format="audio")) as resp:
        assert resp.status == 200 and await resp.read()
    assert len(arrivals) >= 4 and text.startswith(arrivals[0]), arrivals
    assert all(text.index(a) < text.index(b) for a, b in zip(arrivals, arrivals[2:], strict=False)), arrivals
    await sidecar.assert_idle()


async def test_a_piece_that_fails_fails_the_request_with_upstream_s_answer(start: SidecarFactory) -> None:
    sidecar = await start(retries={"max_attempts": 1})
    failure = {"success": False, "message": "TTS generation failed", "audio_base64": None, "sample_rate": None,
               "generation_time": 0.1, "error": "CUDA out of memory"}
    sidecar.backends[1].answer = FakeAnswer(body=json.dumps(failure, separators=(",", ":")).encode())
    status, _headers, body = await sidecar.tts()
    assert status == 200 and json.loads(body) == failure  # no partial audio
    await sidecar.assert_idle()


async def test_a_piece_with_no_usable_audio_fails_the_request_and_stops_the_next_piece(start: SidecarFactory) -> None:
    # 2 lanes, 6 pieces: a lane queues its next piece before decoding the one answered, and that
    # piece must leave the queue (or finish on its backend) when the decoding fails
    sidecar = await start(urls=URLS[:2], fanout={"max_chars": 40, "min_chars": 10})
    broken = {"success": True, "message": "TTS generation completed", "audio_base64": "not base64!",
              "sample_rate": 24000, "generation_time": 0.1}
    sidecar.backends[0].answer = FakeAnswer(body=json.dumps(broken, separators=(",", ":")).encode())
    status, _headers, body = await sidecar.tts()
    assert status == 502 and b"no usable audio" in body, body
    await sidecar.assert_idle()


async def test_a_piece_still_queued_when_the_request_fails_leaves_the_queue(start: SidecarFactory) -> None:
    # 2 lanes, 6 pieces. A lane queues its next piece as soon as its piece is answered, before
    # decoding it; here a higher band's request takes the freed slot first, so that next piece is
    # still queued when the answered piece's audio turns out unusable: it must leave the queue and
    # never reach a backend
    sidecar = await start(urls=URLS[:2], fanout={"max_chars": 40, "min_chars": 10}, retries={"max_attempts": 1})
    first, held = asyncio.Event(), asyncio.Event()
    broken = {"success": True, "message": "TTS generation completed", "audio_base64": "not base64!",
              "sample_rate": 24000, "generation_time": 0.1}
    sidecar.backends[0].answer = FakeAnswer(body=json.dumps(broken, separators=(",", ":")).encode())
    sidecar.backends[0].gate, sidecar.backends[1].gate = first, held
    request = asyncio.create_task(sidecar.tts())
    await until(lambda: all(b.busy == 1 for b in sidecar.backends), "the first two pieces to run")
    sidecar.backends[0].gate = held  # what backend 0 takes next waits
    # a long text, whole: a short one could take an express slot beside a piece
    urgent = asyncio.create_task(sidecar.tts(LONG, **{"X-Priority": "interactive", "X-Fanout": "off"}))
    await until(lambda: len(list(sidecar.runtime.scheduler.queue.jobs())) == 1, "the urgent request to queue")
    first.set()
    status, _headers, body = await request
    assert status == 502 and b"no usable audio" in body, body
    assert list(sidecar.runtime.scheduler.queue.jobs()) == []  # the next piece left the queue
    held.set()
    assert (await urgent)[0] == 200
    await sidecar.assert_idle()
    assert len(sidecar.texts()) == 3  # the first two pieces and the urgent request: nothing else ran


async def test_a_piece_whose_backend_resets_is_retried_elsewhere(start: SidecarFactory) -> None:
    sidecar = await start()
    sidecar.transport.fail_next(URLS[0], sent=False)
    sidecar.transport.fail_next(URLS[1], sent=False)
    status, headers, body = await sidecar.tts()
    assert status == 200 and json.loads(body)["success"] is True
    pieces = sorted(sidecar.texts(), key=LONG.index)
    assert squeezed("".join(pieces)) == squeezed(LONG) and int(headers["X-Fanout-Pieces"]) == len(pieces)
    await sidecar.assert_idle()


async def test_a_client_leaving_stops_the_pieces_not_started(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:2], fanout={"max_chars": 40, "min_chars": 10})
    gate = sidecar.gate()
    request = asyncio.create_task(sidecar.tts())
    await until(lambda: sum(b.busy for b in sidecar.backends) == 2, "the first pieces to run")
    request.cancel()
    await until(lambda: sidecar.gone() == 1, "the request to be over")
    assert not any(j.parent for j in sidecar.runtime.scheduler.queue.jobs())  # no piece queued
    gate.set()
    await sidecar.assert_idle()
    assert len(sidecar.texts()) == 2  # only the two pieces that had started ever reached a backend


async def test_the_tenant_is_charged_every_piece_and_the_request_logged_once(
        start: SidecarFactory, caplog: pytest.LogCaptureFixture) -> None:
    sidecar = await start()
    with caplog.at_level("INFO", logger="glmtts_sidecar.access"):
        status, headers, _ = await sidecar.tts()
    assert status == 200
    entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "glmtts_sidecar.access"]
    assert len(entries) == 1 and entries[0]["pieces"] == int(headers["X-Fanout-Pieces"])
    assert entries[0]["outcome"] == "ok" and entries[0]["attempts"] == entries[0]["pieces"]
    assert sidecar.runtime.scheduler.tally.completed == entries[0]["pieces"]
    assert sidecar.runtime.scheduler.tally.admitted == 1
    await sidecar.assert_idle()


# --- streaming on /v1/audio/speech -----------------------------------------------------------------------


def speech(**fields: Any) -> dict[str, Any]:
    return {"model": "tts-1", "voice": "exampleA", "input": LONG, "seed": 7, **fields}


async def test_a_streamed_answer_sends_the_first_piece_before_the_others_are_done(start: SidecarFactory) -> None:
    sidecar = await start()
    gate, held = hold_all_but_the_first_piece(sidecar)
    async with sidecar.client.post("/v1/audio/speech", json=speech(response_format="pcm", stream_format="audio"),
                                   timeout=ClientTimeout(total=10)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "audio/pcm"
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        first = await asyncio.wait_for(resp.content.readany(), 5)
        assert first and held  # audio came while the other pieces were still held
        first_text = [t for t in sidecar.texts() if LONG.startswith(t)]
        assert len(first_text) == 1 and len(first_text[0]) <= FANOUT["first_chars"]
        gate.set()
        rest = await resp.read()
    samples = np.frombuffer(first + rest, dtype="<i2")
    pieces = sorted(sidecar.texts(), key=LONG.index)
    overlap = round(FANOUT["crossfade_s"] * 24000)
    assert len(samples) == sum(int(24000 * SECONDS_PER_CHAR * len(p)) for p in pieces) - (len(pieces) - 1) * overlap
    assert segments(samples, pieces, 24000, overlap) == [level(p) for p in pieces]
    await sidecar.assert_idle()


async def test_a_streamed_wav_has_streaming_sizes_and_a_whole_one_exact_sizes(start: SidecarFactory) -> None:
    sidecar = await start()
    streamed_wav = speech(response_format="wav", stream_format="audio")
    async with sidecar.client.post("/v1/audio/speech", json=streamed_wav) as resp:
        streamed = await resp.read()
    assert streamed[4:8] == b"\xff\xff\xff\xff" and streamed[40:44] == b"\xff\xff\xff\xff"
    async with sidecar.client.post("/v1/audio/speech", json=speech(response_format="wav")) as resp:
        whole = await resp.read()
        assert resp.headers["Content-Length"] == str(len(whole))
    with wave.open(io.BytesIO(whole)) as w:
        assert w.getnframes() * 2 + 44 == len(whole)
    await sidecar.assert_idle()


async def test_sse_sends_delta_events_then_done_with_usage(start: SidecarFactory) -> None:
    sidecar = await start()
    async with sidecar.client.post("/v1/audio/speech", json=speech(response_format="pcm", stream_format="sse")) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    events = [json.loads(block[len("data: "):]) for block in text.split("\n\n") if block]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) > 2
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    seconds = len(audio) / 2 / 24000
    assert done["usage"] == {"input_tokens": len(LONG), "output_tokens": round(seconds * 25),
                             "total_tokens": len(LONG) + round(seconds * 25)}
    await sidecar.assert_idle()


async def test_a_disconnect_mid_stream_leaves_no_piece_queued(start: SidecarFactory) -> None:
    sidecar = await start(urls=URLS[:2], fanout={"max_chars": 40, "min_chars": 10})
    gate, held = hold_all_but_the_first_piece(sidecar)
    resp = await sidecar.client.post("/v1/audio/speech", json=speech(response_format="pcm", stream_format="audio"))
    assert resp.status == 200
    assert await asyncio.wait_for(resp.content.readany(), 5)  # the first piece streamed
    # Each lane makes its next piece only when its own is answered: two held, none queued or made.
    await until(lambda: len(held) == 2, "two pieces held on the backends")
    assert not any(j.parent for j in sidecar.runtime.scheduler.queue.jobs())
    reached = len(sidecar.texts()) + len(held)
    resp.close()  # the client goes away mid-stream
    await until(lambda: sidecar.gone() == 1, "the request to be over")
    assert not any(j.parent for j in sidecar.runtime.scheduler.queue.jobs())  # no piece queued
    gate.set()
    await sidecar.assert_idle()
    assert len(sidecar.texts()) == reached == 3 < int(resp.headers["X-Fanout-Pieces"])  # the rest never ran


def hold_all_but_the_first_piece(sidecar: Sidecar) -> tuple[asyncio.Event, list[str]]:
    """Every piece but the first (the one that starts the text) waits on the returned gate; the
    list holds the texts waiting there."""
    gate = asyncio.Event()
    waiting: list[str] = []

    async def hold(text: str) -> None:
        if not LONG.startswith(text):
            waiting.append(text)
            await gate.wait()
            waiting.remove(text)

    on_arrival(sidecar, hold)
    return gate, waiting


async def test_a_failure_before_the_first_audio_is_a_whole_error_answer(start: SidecarFactory) -> None:
    sidecar = await start(retries={"max_attempts": 1})
    for backend in sidecar.backends:
        backend.answer = FakeAnswer(status=500, body=b'{"detail":"Inference failed: boom"}')
    streamed_mp3 = speech(response_format="mp3", stream_format="audio")
    async with sidecar.client.post("/v1/audio/speech", json=streamed_mp3) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "server_error"
    await sidecar.assert_idle()


# --- the official client ---------------------------------------------------------------------------------


async def test_the_openai_client_reads_a_streamed_answer_and_an_sse_answer(start: SidecarFactory) -> None:
    sidecar = await start()
    client = openai.OpenAI(api_key="sk-anything", base_url=str(sidecar.client.make_url("/v1")), max_retries=0,
                           timeout=30.0)

    def stream(fmt: str) -> bytes:
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="exampleA", input=LONG, response_format="pcm",
                stream_format=fmt) as response:  # type: ignore[arg-type]
            assert response.status_code == 200
            return b"".join(response.iter_bytes(4096))

    audio = await asyncio.to_thread(stream, "audio")
    sse = (await asyncio.to_thread(stream, "sse")).decode()
    deltas = [json.loads(b[6:]) for b in sse.split("\n\n") if b.startswith("data: ")]
    assert deltas[-1]["type"] == "speech.audio.done"
    assert b"".join(base64.b64decode(d["audio"]) for d in deltas[:-1]) == audio  # the same audio either way
    assert len(audio) > 2 * 24000 * SECONDS_PER_CHAR * 100
    await sidecar.assert_idle()


async def test_a_pool_that_turned_requests_away_lately_runs_long_texts_whole(start: SidecarFactory) -> None:
    """Free slots right after an overload are not split over: the next arrivals would need them."""
    sidecar = await start(urls=URLS[:2], queue={"max_size": 1})
    gate = sidecar.gate()
    medium = "A text of medium length, too long for the short class's extra slot"  # no express slot
    first = [asyncio.create_task(sidecar.tts(f"{medium} {i}.", **{"X-Fanout": "off"})) for i in range(3)]
    await until(lambda: sum(b.busy for b in sidecar.backends) == 2 and len(sidecar.runtime.scheduler.queue) == 1,
                "both backends busy and one request queued")
    status, _, _ = await sidecar.tts(f"{medium}: one too many.", **{"X-Fanout": "off"})
    assert status == 429
    gate.set()
    assert [(await t)[0] for t in first] == [200, 200, 200]
    await sidecar.assert_idle()
    status, headers, _ = await sidecar.tts()
    assert status == 200 and "X-Fanout-Pieces" not in headers and LONG in sidecar.texts()
    metrics = generate_latest(sidecar.runtime.metrics.registry).decode()
    assert 'glmtts_sidecar_fanout_declined_total{reason="pressure"} 1.0' in metrics
    await sidecar.assert_idle()
