"""OpenAI's speech API driven by the official ``openai`` client, against the sidecar's app served
in-process over emulator backends (served in the same process, configured as ``backends.external``).

Every format decodes with a real decoder to audio of the expected rate and duration; the SDK's
exception classes come back with the message and param; 429 carries Retry-After; the SDK does not
retry what ``x-should-retry: false`` marks; keys select tenants; and /v1/audio/speech gives the
same samples as /api/v1/tts for the same inputs and seed. Sync client calls run in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf  # type: ignore[import-untyped]
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler
from prometheus_client import generate_latest

from glmtts.audio import FORMATS, available
from glmtts.emulator.app import Emulator, EmulatorOptions
from glmtts.emulator.prompts import PromptStore
from glmtts.emulator.synthetic import SyntheticEngine
from glmtts.emulator.timing import ServiceModel
from scheduler.config import load_config
from scheduler.http.app import RUNTIME, build_app
from tests.contract_cases import multipart
from tests.inprocess.support import UPSTREAM_TIMEOUT_SCALE

TEXT = "Hello from the sidecar. 你好，世界。"
KEYS = {"acme": "acme-key-0123456789abcdef", "bulk": "bulk-key-0123456789abcdef"}
TENANTS = ("tenants:\n  list:\n"
           + "".join(f"    - {{name: {name}, keys: [{key}]}}\n" for name, key in KEYS.items()))

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@dataclass
class Sidecar:
    client: TestClient[web.Request, web.Application]
    base_url: str  # for the openai client: http://host:port/v1
    emulators: list[Emulator]
    backend_urls: list[str]
    attempts: list[str]  # the path of every request the sidecar received, the SDK's retries included

    def make(self, key: str = "sk-anything", *, max_retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=30.0)

    def make_async(self, key: str = "sk-anything", *, max_retries: int = 0) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=30.0)


def emulator(time_scale: float) -> Emulator:
    store = PromptStore(None)
    store.load()
    engine = SyntheticEngine(ServiceModel(time_scale=time_scale))
    return Emulator(engine, store, EmulatorOptions(time_scale=max(time_scale, UPSTREAM_TIMEOUT_SCALE)))


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def start_sidecar(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path) -> SidecarFactory:
    async def start(extra: str = "", *, time_scale: float = 0.01, slots: int = 2) -> Sidecar:
        emulators = [emulator(time_scale)]
        servers = [await aiohttp_server(e.make_app()) for e in emulators]
        urls = [str(s.make_url("")).rstrip("/") for s in servers]
        path = tmp_path / "sidecar.yaml"
        path.write_text(f"backends:\n  gpus: []\n  external: {json.dumps(urls)}\n  slots: {slots}\n"
                        "  health: {interval_s: 0.05, timeout_s: 2.0, start_timeout_s: 30.0}\n"
                        "  warmup: {enabled: false}\n"
                        f"tasks: {{state_dir: {json.dumps(str(tmp_path / 'state'))}}}\n{extra}")
        app = build_app(load_config(path), config_path=str(path))
        attempts: list[str] = []

        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            attempts.append(request.path)
            return await handler(request)

        app.middlewares.insert(0, count)
        client = await aiohttp_client(app)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await (await client.get("/readyz")).json())["ready_backends"] < 1:
            assert loop.time() < deadline, "the backend never became ready"
            await asyncio.sleep(0.02)
        return Sidecar(client=client, base_url=str(client.make_url("/v1")), emulators=emulators,
                       backend_urls=urls, attempts=attempts)

    return start


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory) -> Sidecar:
    return await start_sidecar()


async def speak(sidecar: Sidecar, **kwargs: Any) -> bytes:
    client = sidecar.make(max_retries=0)
    args = {"model": "tts-1", "voice": "alloy", "input": TEXT, **kwargs}
    return await asyncio.to_thread(lambda: client.audio.speech.create(**args).read())


def decoded(data: bytes, fmt: str) -> tuple[np.ndarray[Any, Any], int]:
    """Samples (float, mono) and rate, by a real decoder for each format."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float64) / 32768, 24000
    if fmt == "wav":
        with wave.open(io.BytesIO(data)) as w:
            assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2") / 32768, w.getframerate()
    if fmt == "aac":
        av = pytest.importorskip("av")
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
            return np.concatenate(frames), container.streams.audio[0].codec_context.sample_rate
    samples, rate = sf.read(io.BytesIO(data), dtype="float64")
    return samples, rate


async def reference_wav(sidecar: Sidecar, **fields: str) -> bytes:
    """What /api/v1/tts answers for the same text, prompt and fields."""
    content_type, body = multipart(*{"input_text": TEXT, "index": "exampleA", **fields}.items())
    async with sidecar.client.post("/api/v1/tts", data=body, headers={"Content-Type": content_type}) as resp:
        assert resp.status == 200
        return base64.b64decode((await resp.json())["audio_base64"])


# --- audio ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_every_available_format_decodes_to_the_expected_rate_and_duration(sidecar: Sidecar, fmt: str) -> None:
    why = available(fmt)
    if why is not None:  # not encodable here: the clear 400 names why (aac: the extra)
        with pytest.raises(openai.BadRequestError) as info:
            await speak(sidecar, response_format=fmt)
        assert info.value.body["message"] == why and info.value.body["param"] == "response_format"  # type: ignore[index]
        return
    # tts-1-hd is configured as 32 kHz: wav keeps it, pcm is OpenAI's 24 kHz.
    reference = await reference_wav(sidecar, sample_rate="32000", seed="7")
    with wave.open(io.BytesIO(reference)) as w:
        seconds = w.getnframes() / w.getframerate()
    data = await speak(sidecar, model="tts-1-hd", response_format=fmt, extra_body={"seed": 7})
    samples, rate = decoded(data, fmt)
    assert rate == (24000 if fmt == "pcm" else 32000 if fmt in ("wav", "flac", "mp3") else rate)
    if fmt in ("opus", "aac"):
        assert rate in (24000, 32000, 48000)
    assert seconds > 0.5
    # Lossy codecs add an encoder delay and pad to whole frames: within 0.1 s.
    assert abs(len(samples) / rate - seconds) < (0.001 if fmt in ("wav", "flac", "pcm") else 0.1)
    assert np.abs(samples).max() > 0.01  # sound, not silence


async def test_speech_and_upstream_give_the_same_samples(sidecar: Sidecar) -> None:
    for rate in ("24000", "32000"):
        reference = await reference_wav(sidecar, sample_rate=rate, seed="1234", sampling="10")
        data = await speak(sidecar, model="glm-tts", voice="alloy", response_format="wav",
                           extra_body={"seed": 1234, "sample_rate": int(rate), "sampling": 10})
        assert data == reference
    pcm = await speak(sidecar, model="glm-tts", response_format="pcm", extra_body={"seed": 1234, "sampling": 10})
    with wave.open(io.BytesIO(await reference_wav(sidecar, seed="1234", sampling="10"))) as w:
        assert pcm == w.readframes(w.getnframes())


async def test_another_seed_gives_other_samples(sidecar: Sidecar) -> None:
    one = await speak(sidecar, response_format="wav", extra_body={"seed": 1})
    two = await speak(sidecar, response_format="wav", extra_body={"seed": 2})
    assert one != two


async def test_streaming_response_and_the_async_client(sidecar: Sidecar) -> None:
    client = sidecar.make()

    def stream() -> tuple[str, bytes]:
        with client.audio.speech.with_streaming_response.create(model="tts-1", voice="echo", input=TEXT,
                                                                response_format="flac") as response:
            return response.headers["content-type"], b"".join(response.iter_bytes(4096))

    content_type, data = await asyncio.to_thread(stream)
    assert content_type == "audio/flac"
    assert sf.info(io.BytesIO(data)).samplerate == 24000
    async_client = sidecar.make_async()
    answer = await async_client.audio.speech.create(model="tts-1", voice={"id": "nova"}, input=TEXT,
                                                    response_format="wav")
    assert answer.response.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(answer.read())) as w:
        assert w.getframerate() == 24000
    async with async_client.audio.speech.with_streaming_response.create(
            model="glm-tts", voice="exampleB", input=TEXT, response_format="mp3") as response:
        data = b"".join([chunk async for chunk in response.iter_bytes()])
    assert response.headers["content-type"] == "audio/mpeg" and sf.info(io.BytesIO(data)).samplerate == 24000
    await async_client.close()


async def test_models_and_voices_are_listed(sidecar: Sidecar) -> None:
    client = sidecar.make()
    models = await asyncio.to_thread(lambda: [m.id for m in client.models.list()])
    assert models == ["glm-tts", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    async with sidecar.client.get("/v1/audio/voices") as resp:
        voices = {v["id"]: v["index"] for v in (await resp.json())["voices"]}
    assert voices["alloy"] == "exampleA" and voices["shimmer"] == "exampleB"
    assert voices["exampleA"] == "exampleA"  # a prompt index is a voice too


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"speed": 1.5}, "speed", "speed other than 1.0 is not supported"),
    ({"speed": 9.0}, "speed", "speed must be between 0.25 and 4.0"),
    ({"response_format": "ogg"}, "response_format", "unknown response_format 'ogg'"),
    ({"input": "   "}, "input", "input must not be empty"),
    ({"extra_body": {"seed": "x"}}, "seed", "seed must be an integer"),
    ({"extra_body": {"sample_rate": 44100}}, "sample_rate", "sample_rate must be one of 24000, 32000"),
    ({"extra_body": {"sampling": 0}}, "sampling", "sampling must be between 1 and 100"),
    ({"extra_body": {"use_phoneme": "yes"}}, "use_phoneme", "use_phoneme must be true or false"),
    ({"extra_body": {"sample_method": "greedy"}}, "sample_method", "sample_method must be one of ras, topk"),
    ({"extra_body": {"stream_format": "chunks"}}, "stream_format", "stream_format must be one of audio, sse"),
    ({"extra_body": {"pitch": 2}}, "pitch", "Unrecognized request argument supplied: pitch"),
])
async def test_a_bad_field_is_a_bad_request_naming_it(sidecar: Sidecar, fields: dict[str, Any], param: str,
                                                      message: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await speak(sidecar, **fields)
    error = info.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error"
    assert isinstance(error.body, dict) and error.body["message"].startswith(message)
    assert message in error.message
    assert error.response.headers["x-should-retry"] == "false"


async def test_unknown_voice_and_model_are_not_found(sidecar: Sidecar) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await speak(sidecar, voice="nobody")
    assert info.value.param == "voice" and "'nobody' is neither a configured voice" in str(info.value.message)
    with pytest.raises(openai.NotFoundError) as info:
        await speak(sidecar, model="tts-9")
    assert (info.value.param, info.value.code) == ("model", "model_not_found")


async def test_raw_errors_have_openais_shape_on_v1_routes_only(sidecar: Sidecar) -> None:
    client = sidecar.client
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/audio/speech", 405)):
        async with client.request(method, path) as resp:
            body = await resp.json()
            assert resp.status == status and set(body["error"]) == {"message", "type", "param", "code"}
    async with client.post("/v1/audio/speech", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
    limit = client.app[RUNTIME].config.limits.max_body_bytes
    async with client.post("/v1/audio/speech", data=b"x" * (limit + 1)) as resp:
        assert resp.status == 413 and (await resp.json())["error"]["type"] == "invalid_request_error"
        assert resp.headers["x-should-retry"] == "false"
    async with client.get("/api/v1/nope") as resp:
        assert await resp.json() == {"detail": "Not Found"}  # upstream's shape stays upstream's


async def test_a_failed_synthesis_is_a_server_error_in_openais_shape(sidecar: Sidecar) -> None:
    # The next synthesis fails as upstream's does: 200 with success: false.
    async with sidecar.client.session.post(f"{sidecar.backend_urls[0]}/emulator/faults",
                                           json={"fail_status": 200, "fail_count": 1}) as resp:
        assert resp.status == 200
    with pytest.raises(openai.InternalServerError) as info:
        await speak(sidecar)
    assert info.value.status_code == 502 and info.value.code == "backend_failed"
    assert info.value.type == "server_error" and "Speech synthesis failed on the backend" in info.value.message
    assert (await speak(sidecar, response_format="wav")).startswith(b"RIFF")  # the next one is served


async def test_a_large_hostile_body_is_a_clear_400(sidecar: Sidecar) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000  # deep nesting, parsed off the event loop
    for body, message in ((nested, "must be a JSON object"), (b'"text"', "not a string"),
                          (json.dumps({"model": "tts-1", "voice": "alloy", "input": "\ud800"}).encode(),
                           "input is not valid Unicode text")):
        async with sidecar.client.post("/v1/audio/speech", data=body,
                                       headers={"Content-Type": "application/json"}) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 400 and message in error["message"], error


async def test_a_text_over_the_limit_is_413_not_retried(start_sidecar: SidecarFactory) -> None:
    sidecar = await start_sidecar("limits: {max_text_chars: 20}\n")
    client = sidecar.make(max_retries=3)
    with pytest.raises(openai.APIStatusError) as info:
        await asyncio.to_thread(lambda: client.audio.speech.create(model="tts-1", voice="alloy", input="x" * 21))
    assert info.value.status_code == 413 and info.value.code == "string_above_max_length"
    assert info.value.param == "input" and sidecar.attempts.count("/v1/audio/speech") == 1


async def test_keys_select_tenants_and_a_required_key_is_checked(start_sidecar: SidecarFactory) -> None:
    sidecar = await start_sidecar(TENANTS + "  require_key: true\n")
    for key in ("wrong-key-0123456789", ""):
        client = sidecar.make(key or "x")
        with pytest.raises(openai.AuthenticationError) as info:
            await asyncio.to_thread(client.audio.speech.create, model="tts-1", voice="alloy", input=TEXT)
        assert info.value.code == "invalid_api_key" and info.value.status_code == 401
    metrics = sidecar.client.app[RUNTIME].metrics
    await speak_as(sidecar, KEYS["acme"])
    await speak_as(sidecar, KEYS["bulk"])
    await speak_as(sidecar, KEYS["bulk"])
    text = metrics_text(metrics)
    assert served(text, "acme") == 1 and served(text, "bulk") == 2


async def test_an_unknown_key_is_the_default_tenant_when_keys_are_optional(start_sidecar: SidecarFactory) -> None:
    sidecar = await start_sidecar(TENANTS)
    await speak_as(sidecar, "not-a-configured-key")
    await speak_as(sidecar, KEYS["acme"])
    text = metrics_text(sidecar.client.app[RUNTIME].metrics)
    assert served(text, "default") == 1 and served(text, "acme") == 1
    async with sidecar.client.post("/api/v1/tts", headers={"Authorization": "Bearer not-a-configured-key"},
                                   data={"input_text": TEXT, "index": "exampleA"}) as resp:
        assert resp.status == 401  # the upstream route keeps its behaviour


async def speak_as(sidecar: Sidecar, key: str) -> None:
    client = sidecar.make(key)
    data = await asyncio.to_thread(lambda: client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                                                      response_format="wav").read())
    assert data.startswith(b"RIFF")


def metrics_text(metrics: Any) -> str:
    return generate_latest(metrics.registry).decode()


def served(metrics_text: str, tenant: str) -> float:
    """Requests of ``tenant`` that finished ok, from the Prometheus text."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("glmtts_sidecar_requests_total{") and f'tenant="{tenant}"' in line \
                and 'outcome="ok"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_full_queue_is_429_with_retry_after(start_sidecar: SidecarFactory) -> None:
    sidecar = await start_sidecar("queue: {max_size: 1}\n", time_scale=0.15, slots=1)
    # Short texts may take a backend's extra slot (classes' extra_slots): enough to fill the queue too.
    running = [asyncio.ensure_future(speak(sidecar, response_format="wav")) for _ in range(3)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not await queue_full(sidecar):  # at the backend, and one queued
        assert loop.time() < deadline, "the queue never filled"
        await asyncio.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as info:
        await speak(sidecar)
    headers = info.value.response.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
    assert info.value.code == "rate_limit_exceeded" and "x-should-retry" not in headers
    done = await asyncio.gather(*running, return_exceptions=True)
    assert all(isinstance(d, bytes) and d.startswith(b"RIFF") for d in done)


async def queue_full(sidecar: Sidecar) -> bool:
    async with sidecar.client.get("/api/v1/queue") as resp:
        queue = await resp.json()
    return bool(queue["depth"] >= queue["max_size"])


async def test_a_deadline_it_cannot_meet_is_not_retried_by_the_sdk(start_sidecar: SidecarFactory) -> None:
    sidecar = await start_sidecar(time_scale=0.3, slots=1)
    client = sidecar.make(max_retries=3)
    with pytest.raises(openai.APIStatusError) as info:
        await asyncio.to_thread(lambda: client.audio.speech.create(
            model="tts-1", voice="alloy", input=TEXT, extra_headers={"X-Request-Timeout": "0.05"}))
    assert info.value.status_code in (408, 429)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert sidecar.attempts.count("/v1/audio/speech") == 1


# --- streamed answers (docs/fanout.md) ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp3", "opus", "wav", "pcm"])
async def test_a_streamed_answer_of_the_emulator_s_speech_decodes_in_every_streamable_format(
        start_sidecar: SidecarFactory, fmt: str) -> None:
    sidecar = await start_sidecar("fanout: {min_text_chars: 20, min_chars: 5, max_chars: 40, first_chars: 12}\n")
    text = "今天天气很好。我们去公园散步吧！你觉得怎么样？" * 2
    client = sidecar.make()

    def streamed() -> tuple[str | None, bytes]:
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input=text, response_format=fmt,  # type: ignore[arg-type]
                stream_format="audio", extra_headers={"X-Fanout": "on"}) as response:
            assert response.headers["content-type"] == FORMATS[fmt].content_type
            return response.headers.get("x-fanout-pieces"), response.read()

    pieces, data = await asyncio.to_thread(streamed)
    assert pieces is not None and int(pieces) >= 3  # the short first piece, then the rest
    samples, rate = decoded(data, fmt) if fmt != "wav" else _streamed_wav(data)
    whole, whole_rate = decoded(await speak(sidecar, input=text, response_format="pcm"), "pcm")
    assert rate == whole_rate == 24000  # the backend's rate (Opus takes 24 kHz as it is)
    # The pieces' speech lasts about as long as the whole text's (each piece's own pauses differ a little).
    assert abs(len(samples) / rate - len(whole) / whole_rate) < 0.15 * len(whole) / whole_rate
    assert np.abs(samples).max() > 0.05  # speech, not silence


def _streamed_wav(data: bytes) -> tuple[np.ndarray[Any, Any], int]:
    """A streamed WAV: its size fields are 0xFFFFFFFF, so the samples are whatever follows the header."""
    assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff" and data[36:44] == b"data\xff\xff\xff\xff"
    rate = int.from_bytes(data[24:28], "little")
    return np.frombuffer(data[44:], dtype="<i2").astype(np.float64) / 32768, rate
