"""OpenAI's speech API on the sidecar's port: ``POST /v1/audio/speech``, ``GET /v1/models``, ``GET /v1/audio/voices``.

A speech request's JSON is checked field by field (a bad one is a 400 naming it in ``param``),
its voice and model resolved through the ``openai`` config section (read at use, so a reload
applies at once), and turned into upstream's multipart form; from there it is an /api/v1/tts
request like any other (scheduler.http.intake: the same admission, fair queueing, deadlines,
tenant attribution, limits and metrics). The backend's JSON answer is read whole, its WAV decoded
and encoded to the asked format off the event loop, after the backend slot is free again. With
``cache.enabled`` that JSON answer comes through the result cache (scheduler.http.cached), shared
with /api/v1/tts: encoding happens after the cache, so one entry serves every format.

Errors are raised, and rendered in OpenAI's shape by scheduler.http.middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from glmtts.audio import FORMATS, Pcm, available, encode
from glmtts.audio_stream import STREAMABLE
from glmtts.contract import BEAM_SIZE_RANGE, SAMPLE_METHODS, SAMPLE_RATES, SAMPLING_RANGE
from glmtts.form import PartValue, encode_multipart, multipart_content_type
from glmtts.responses import succeeded
from scheduler.config import OpenAIConfig
from scheduler.core.tenants import TenantError
from scheduler.errors import (
    BackendFailed,
    InvalidField,
    NotAttributed,
    PayloadTooLarge,
    UnknownModel,
    UnknownVoice,
)
from scheduler.http.cached import CachedTTS
from scheduler.http.intake import INLINE_PARSE_BYTES, read_intake
from scheduler.http.middleware import REQUEST_ID
from scheduler.http.speech_stream import SpeechStream
from scheduler.http.tts import PIECES_HEADER, timing
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import Exchange, Intake, Outcome, Whole
from scheduler.runtime.fanout import PieceFailed, SplitRun, answer_pcm, decide, synthesize

__all__ = ["OWNER", "OpenAIHandler", "Speech", "parse_speech"]

OWNER = "glmtts-sidecar"  # the models' owned_by
SPEED_RANGE = (0.25, 4.0)
SEED_RANGE = (-(2**63), 2**63 - 1)  # what a backend's integer parsing surely holds
MAX_NAME_CHARS = 200  # model and voice names, and instructions' bound is MAX_INSTRUCTIONS_CHARS
MAX_INSTRUCTIONS_CHARS = 4096
DEFAULT_SAMPLE_RATE = 24000
STREAM_FORMATS = ("audio", "sse")
# The fields OpenAI's API defines, then GLM-TTS's own (the official client's extra_body).
FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions", "stream_format",
          "seed", "sample_rate", "use_phoneme", "sampling", "beam_size", "sample_method")


@dataclass(frozen=True, kw_only=True)
class Speech:
    """A checked speech request: what upstream's form gets, and the format to answer in."""

    input: str
    voice: str  # the name the client sent
    index: str  # the prompt index it speaks with
    response_format: str
    sample_rate: int
    seed: int | None = None
    use_phoneme: bool | None = None
    sampling: int | None = None
    beam_size: int | None = None
    sample_method: str | None = None
    stream_format: str | None = None  # "audio" or "sse": streamed (scheduler.http.speech_stream); None: whole

    def form(self) -> tuple[bytes, str]:
        """Upstream's multipart form for this request, and its Content-Type."""
        fields: list[tuple[str, PartValue]] = [("input_text", self.input), ("index", self.index),
                                               ("sample_rate", str(self.sample_rate))]
        optional = {"seed": self.seed, "use_phoneme": self.use_phoneme, "sampling": self.sampling,
                    "beam_size": self.beam_size, "sample_method": self.sample_method}
        for name, value in optional.items():
            if value is not None:
                fields.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
        boundary = uuid.uuid4().hex
        return encode_multipart(fields, boundary=boundary), multipart_content_type(boundary)


def parse_speech(body: bytes, config: OpenAIConfig, *, max_chars: int) -> tuple[Speech, str | None]:
    """The checked request, and the voice's name when it is not configured (then a prompt index,
    which the caller checks exists); or the SidecarError refusing it, naming the field."""
    fields = _json_object(body)
    for name in fields:
        if name not in FIELDS:
            raise InvalidField(f"Unrecognized request argument supplied: {_shown(name)}", param=_shown(name))
    model = _name(fields, "model")
    if model not in config.models:
        raise UnknownModel(f"The model {model!r} does not exist; known models: {', '.join(config.models)}")
    text = _text(fields, "input", required=True, limit=None)
    if not text.strip():
        raise InvalidField("input must not be empty", param="input")
    if len(text) > max_chars:
        raise PayloadTooLarge(f"input is {len(text)} characters; the limit is {max_chars}", limit=max_chars,
                              param="input")
    voice = _voice(fields)
    configured = config.voices.get(voice)
    fmt = _text(fields, "response_format", limit=MAX_NAME_CHARS) or "mp3"
    if (why := available(fmt)) is not None:
        raise InvalidField(why, param="response_format")
    _check_speed(fields.get("speed"))
    _text(fields, "instructions", limit=MAX_INSTRUCTIONS_CHARS)  # accepted, and ignored: GLM-TTS takes none
    stream = _text(fields, "stream_format", limit=MAX_NAME_CHARS, choices=STREAM_FORMATS) or None
    rate = (_choice(fields, "sample_rate", SAMPLE_RATES) or config.models[model].sample_rate
            or (configured.sample_rate if configured is not None else None) or DEFAULT_SAMPLE_RATE)
    speech = Speech(
        input=text, voice=voice, index=configured.index if configured is not None else voice,
        response_format=fmt, sample_rate=rate, seed=_integer(fields, "seed", SEED_RANGE),
        use_phoneme=_flag(fields, "use_phoneme"), sampling=_integer(fields, "sampling", SAMPLING_RANGE),
        beam_size=_integer(fields, "beam_size", BEAM_SIZE_RANGE),
        sample_method=_text(fields, "sample_method", limit=MAX_NAME_CHARS, choices=SAMPLE_METHODS),
        stream_format=stream)
    return speech, None if configured is not None else voice


def _json_object(body: bytes) -> Mapping[str, Any]:
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidField("The body must be a JSON object (Content-Type: application/json)", param=None) from None
    if not isinstance(fields, dict):
        raise InvalidField(f"The body must be a JSON object, not {_json_type(fields)}", param=None)
    return fields


def _shown(text: str) -> str:
    """A client's string as an answer may quote it: bounded, and only what can be encoded."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= 60 else text[:60] + "..."


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _text(fields: Mapping[str, Any], name: str, *, required: bool = False, limit: int | None,
          choices: tuple[str, ...] | None = None) -> str:
    """A string field ("" when absent or null and not required)."""
    value = fields.get(name)
    if value is None:
        if required:
            raise InvalidField(f"Missing required parameter: {name!r}", param=name)
        return ""
    if not isinstance(value, str):
        raise InvalidField(f"{name} must be a string, not {_json_type(value)}", param=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField(f"{name} is not valid Unicode text (a lone surrogate)", param=name) from None
    if limit is not None and len(value) > limit:
        raise InvalidField(f"{name} is {len(value)} characters; the limit is {limit}", param=name)
    if choices is not None and value not in choices:
        raise InvalidField(f"{name} must be one of {', '.join(choices)}; got {_shown(value)!r}", param=name)
    return value


def _name(fields: Mapping[str, Any], name: str) -> str:
    value = _text(fields, name, required=True, limit=MAX_NAME_CHARS)
    if not value.strip():
        raise InvalidField(f"{name} must not be empty", param=name)
    return value


def _voice(fields: Mapping[str, Any]) -> str:
    """A voice's name: a string, or OpenAI's custom-voice object ``{"id": "..."}``."""
    value = fields.get("voice")
    if isinstance(value, dict):
        if set(value) != {"id"}:
            raise InvalidField('voice as an object must be {"id": "<voice>"}', param="voice")
        return _name(value, "id")
    if value is not None and not isinstance(value, str):
        raise InvalidField(f"voice must be a string or an object with an id, not {_json_type(value)}",
                           param="voice")
    return _name(fields, "voice")


def _check_speed(value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidField(f"speed must be a number, not {_json_type(value)}", param="speed")
    if not SPEED_RANGE[0] <= value <= SPEED_RANGE[1]:
        raise InvalidField(f"speed must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}; got {value}", param="speed")
    if value != 1.0:
        raise InvalidField("speed other than 1.0 is not supported: this server has no pitch-preserving time "
                           "stretch; send 1.0 or leave it out", param="speed")


def _integer(fields: Mapping[str, Any], name: str, bounds: tuple[int, int]) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(f"{name} must be an integer, not {_json_type(value)}", param=name)
    if not bounds[0] <= value <= bounds[1]:
        raise InvalidField(f"{name} must be between {bounds[0]} and {bounds[1]}", param=name)
    return value


def _choice(fields: Mapping[str, Any], name: str, choices: tuple[int, ...]) -> int | None:
    value = _integer(fields, name, (-(2**63), 2**63 - 1))
    if value is not None and value not in choices:
        raise InvalidField(f"{name} must be one of {', '.join(map(str, choices))}; got {value}", param=name)
    return value


def _flag(fields: Mapping[str, Any], name: str) -> bool | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidField(f"{name} must be true or false, not {_json_type(value)}", param=name)
    return value


def _encoded(answer: bytes, fmt: str) -> bytes:
    return encode(answer_pcm(answer), fmt)


class OpenAIHandler:
    def __init__(self, runtime: Runtime, exchange: Exchange) -> None:
        self.runtime = runtime
        self.exchange = exchange
        self.cached = CachedTTS(runtime, exchange)

    async def speech(self, request: web.Request) -> web.StreamResponse:
        parsed: list[Speech] = []

        async def translate(body: bytes) -> tuple[bytes, str]:
            config = self.runtime.config
            args = (body, config.openai)
            # A big body is parsed off the event loop, as intake does with forms.
            speech, unconfigured = (parse_speech(*args, max_chars=config.limits.max_text_chars)
                                    if len(body) <= INLINE_PARSE_BYTES else
                                    await asyncio.to_thread(parse_speech, *args,
                                                            max_chars=config.limits.max_text_chars))
            if unconfigured is not None and not await self.runtime.prompts.has(unconfigured):
                raise UnknownVoice(f"The voice {_shown(unconfigured)!r} is neither a configured voice nor a "
                                   f"prompt index; see GET /v1/audio/voices")
            parsed.append(speech)
            try:
                return speech.form()
            except ValueError as exc:  # a value holding the (random) multipart delimiter: never in practice
                raise InvalidField(f"The request cannot be sent to the backend: {exc}", param=None) from None

        intake = await read_intake(self.runtime, request, translate=translate, unknown_key_is_default=True)
        speech = parsed[0]
        if speech.stream_format is not None:
            return await self._stream(request, speech, intake)
        if self.runtime.config.cache.enabled:
            return await self._through_cache(speech, intake)
        job, rid = intake.job, intake.request_id
        record = Outcome(request_id=rid)
        with self.exchange.reporting(job, record, intake.arrived):
            plan = decide(self.runtime, intake, choice=intake.fanout)
            whole = await synthesize(self.runtime, self.exchange, intake, record, {REQUEST_ID: rid}, plan)
            answer = _checked(whole.status, whole.body)
            # The slot is free again: encoding takes CPU here, never a backend.
            audio = await asyncio.to_thread(_encoded, answer, speech.response_format)
        return web.Response(body=audio, headers=_made_by(whole, speech.response_format))

    async def _through_cache(self, speech: Speech, intake: Intake) -> web.Response:
        """The backend's JSON answer through the result cache (scheduler.http.cached), encoded after."""
        whole, how = await self.cached.answer(intake)
        answer = _checked(whole.status, whole.body)
        audio = await asyncio.to_thread(_encoded, answer, speech.response_format)
        return web.Response(body=audio, headers={**_made_by(whole, speech.response_format), "X-Cache": how})

    async def _stream(self, request: web.Request, speech: Speech, intake: Intake) -> web.StreamResponse:
        """A streamed answer (scheduler.http.speech_stream): split so the first audio comes early."""
        runtime, job = self.runtime, intake.job
        record = Outcome(request_id=intake.request_id)
        stream = SpeechStream(runtime, request, fmt=speech.response_format, sse=speech.stream_format == "sse",
                              input_chars=len(speech.input), arrived=intake.arrived, record=record, pieces=1)
        if runtime.config.cache.enabled:  # the cache reports the request itself
            whole, _ = await self.cached.answer(intake)
            return await stream.send(_one(whole))
        run: SplitRun | None = None
        with self.exchange.reporting(job, record, intake.arrived):
            try:
                plan = decide(runtime, intake, choice=intake.fanout, stream=speech.response_format in STREAMABLE)
                if plan is None:
                    whole = await synthesize(runtime, self.exchange, intake, record, {REQUEST_ID: intake.request_id},
                                             None)
                    return await stream.send(_one(whole))
                run = SplitRun(runtime, self.exchange, intake, plan, record, {REQUEST_ID: intake.request_id})
                stream.pieces = run.pieces
                run.start()
                async with contextlib.aclosing(_pieces(run)) as audio:
                    return await stream.send(audio)
            finally:
                if run is not None:
                    record.service_s = run.service_s
                    await run.close()

    async def models(self, request: web.Request) -> web.Response:
        self._check_key(request)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": OWNER,
                 "sample_rate": model.sample_rate} for name, model in self.runtime.config.openai.models.items()]
        return web.json_response({"object": "list", "data": data})

    async def voices(self, request: web.Request) -> web.Response:
        """The configured voices, then every prompt index the backends know that is not one."""
        self._check_key(request)
        voices = self.runtime.config.openai.voices
        listed = [{"id": name, "name": name, "index": voice.index, "sample_rate": voice.sample_rate}
                  for name, voice in voices.items()]
        indexes = sorted(self.runtime.prompts.indexes or ())
        listed += [{"id": index, "name": index, "index": index, "sample_rate": None}
                   for index in indexes if index not in voices]
        return web.json_response({"object": "list", "voices": listed})

    def _check_key(self, request: web.Request) -> None:
        """The listings answer whom the speech route would: a 401 where keys are required."""
        try:
            self.runtime.tenants.attribute(authorization=request.headers.get("Authorization"), tenant_header=None,
                                           priority_header=None, unknown_key_is_default=True)
        except TenantError as exc:
            raise NotAttributed(exc.status, exc.reason, exc.detail) from None


def _made_by(whole: Whole, fmt: str) -> dict[str, str]:
    """A whole answer's headers: its format, and the backend(s) and times that made it."""
    headers = {"Content-Type": FORMATS[fmt].content_type}
    if whole.backend is not None:
        headers.update({"X-Backend": whole.backend, "X-Queue-Wait": f"{whole.queue_s:.3f}",
                        "Server-Timing": timing(whole.queue_s, whole.service_s)})
    if whole.pieces > 1:
        headers[PIECES_HEADER] = str(whole.pieces)
    return headers


async def _one(whole: Whole) -> AsyncIterator[Pcm]:
    """A whole answer's audio, as a stream of one piece; its failure as the error to answer."""
    yield await asyncio.to_thread(answer_pcm, _checked(whole.status, whole.body))


async def _pieces(run: SplitRun) -> AsyncGenerator[Pcm, None]:
    """A split request's pieces of audio in order; a failed piece's answer as the error to answer."""
    try:
        async for pcm in run.audio():
            yield pcm
    except PieceFailed as failed:
        _checked(failed.whole.status, failed.whole.body)
        raise BackendFailed("A piece of the request failed on the backend") from None


def _checked(status: int, answer: bytes) -> bytes:
    """A backend's successful answer; its failure as the error to answer (502, or what the
    client's request caused: a prompt gone since it was checked is an unknown voice)."""
    if succeeded(status, answer):
        return answer
    detail = _backend_detail(answer)
    if status == 404:
        raise UnknownVoice(f"The backend does not know this voice's prompt: {detail}")
    if 400 <= status < 500:
        raise InvalidField(f"The backend refused the request: {detail}", param=None)
    raise BackendFailed(f"Speech synthesis failed on the backend: {detail}")


def _backend_detail(answer: bytes) -> str:
    try:
        payload = json.loads(answer)
    except ValueError:
        return "an answer that is not JSON"
    if isinstance(payload, dict):
        for key in ("error", "detail", "message"):
            if isinstance(payload.get(key), str):
                return _shown(payload[key])
    return "no reason given"
