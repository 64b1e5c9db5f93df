"""Streamed speech: ``POST /v1/audio/speech`` with ``stream_format`` ``audio`` or ``sse``.

The request's audio is sent as it is made: split into pieces (scheduler.runtime.fanout; the first
one short, so audio starts early), each piece joined to the one before (glmtts.audio's joiner:
the same crossfade or pause as a whole answer) and encoded incrementally (glmtts.audio_stream) as
soon as it and every piece before it are answered. ``audio``: the encoded bytes in a chunked
answer (WAV with its size fields 0xFFFFFFFF, as streaming servers send it; its exact sizes are in
a whole answer only). ``sse``: OpenAI's ``speech.audio.delta`` events (base64 audio), then
``speech.audio.done`` with usage. A format that cannot be streamed (flac, aac) is encoded whole:
one body, or one delta event.

Nothing is sent until the first piece's audio is ready, so a request refused or failed before it
gets a whole error answer with its status. After that, the status is sent: a later failure ends an
``sse`` stream with an ``error`` event, and cuts an ``audio`` stream short (the client sees an
unterminated chunked body, never a clean end). A client leaving stops the pieces not yet started
(``SplitRun.close``).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from glmtts.audio import FORMATS, Pcm, PcmJoiner, encode
from glmtts.audio_stream import STREAMABLE, StreamEncoder, stream_encoder
from scheduler.errors import SidecarError
from scheduler.http.middleware import REQUEST_ID, openai_error_body
from scheduler.http.tts import PIECES_HEADER
from scheduler.runtime.context import Runtime
from scheduler.runtime.exchange import Outcome

__all__ = ["SPEECH_TOKENS_PER_S", "SpeechStream"]

SPEECH_TOKENS_PER_S = 25  # GLM-TTS's speech tokens per second of audio: the usage's output tokens
SSE_CONTENT_TYPE = "text/event-stream"
FIRST_CHUNK_S = 0.25  # the first audio sent: encoded on its own, so it leaves without waiting for its piece's rest


class SpeechStream:
    """One streamed answer: ``send`` it from the request's pieces of audio, in order."""

    def __init__(self, runtime: Runtime, request: web.Request, *, fmt: str, sse: bool, input_chars: int,
                 arrived: float, record: Outcome, pieces: int) -> None:
        self.runtime = runtime
        self.request = request
        self.fmt = fmt
        self.sse = sse
        self.input_chars = input_chars
        self.arrived = arrived
        self.record = record
        self.pieces = pieces
        self._out: web.StreamResponse | None = None
        self._seconds = 0.0  # audio sent, for the usage
        self._sent_any = False  # audio bytes went out (time to first audio observed)

    async def send(self, audio: AsyncIterator[Pcm]) -> web.StreamResponse:
        """Stream ``audio`` (the request's pieces, in order). Raises what fails before anything was
        sent (the caller answers it); after that, ends the stream as the module says."""
        config = self.runtime.config.fanout
        joiner: PcmJoiner | None = None
        encoder: StreamEncoder | None = None
        whole: list[Pcm] = []
        try:
            async for pcm in audio:
                if joiner is None:
                    joiner = PcmJoiner(pcm.rate, crossfade_s=config.crossfade_s, pause_s=config.pause_s)
                    if self.fmt in STREAMABLE:  # opening an encoder may take a moment: off the loop
                        encoder = await asyncio.to_thread(stream_encoder, self.fmt, pcm.rate)
                ready = await asyncio.to_thread(joiner.push, pcm)
                if encoder is None:
                    whole.append(ready)
                    continue
                # The first audio goes out after its first FIRST_CHUNK_S are encoded, not the whole piece.
                parts = [ready] if self._sent_any else _first_chunk(ready)
                for part in parts:
                    await self._write(await asyncio.to_thread(_feed, encoder, part))
            if joiner is None:
                raise RuntimeError("no audio to stream")  # a split request has 2 pieces or more; whole has 1
            if encoder is None:
                whole.append(joiner.close())
                await self._write(await asyncio.to_thread(_encode_whole, whole, self.fmt))
            else:
                await self._write(await asyncio.to_thread(_finish, encoder, joiner), last=True)
            return await self._end()
        except (aiohttp.ClientError, ConnectionResetError, asyncio.CancelledError):
            self.record.outcome = "client_gone"
            raise
        except Exception as exc:
            if self._out is None:
                raise  # nothing sent: answered whole by the caller (the middleware renders it)
            return await self._fail(exc)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": SSE_CONTENT_TYPE if self.sse else FORMATS[self.fmt].content_type,
                   REQUEST_ID: self.record.request_id, "Cache-Control": "no-cache"}
        if self.pieces > 1:
            headers[PIECES_HEADER] = str(self.pieces)
        return headers

    async def _write(self, data: bytes | tuple[bytes, float], *, last: bool = False) -> None:
        chunk, seconds = data if isinstance(data, tuple) else (data, 0.0)
        self._seconds += seconds
        if self._out is None:
            self._out = web.StreamResponse(status=200, headers=self._headers())
            self._out.enable_chunked_encoding()
            await self._out.prepare(self.request)
            self.record.status = 200
        if not chunk:
            return
        if self.sse:
            chunk = _event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode("ascii")})
        first = not self._sent_any
        await self._out.write(chunk)
        if first:
            self._sent_any = True
            self.runtime.metrics.first_audio.labels("sse" if self.sse else "audio").observe(
                max(0.0, self.runtime.dispatcher.clock() - self.arrived))

    async def _end(self) -> web.StreamResponse:
        assert self._out is not None
        if self.sse:
            output = round(self._seconds * SPEECH_TOKENS_PER_S)
            await self._out.write(_event({"type": "speech.audio.done", "usage": {
                "input_tokens": self.input_chars, "output_tokens": output,
                "total_tokens": self.input_chars + output}}))
        await self._out.write_eof()
        return self._out

    async def _fail(self, exc: Exception) -> web.StreamResponse:
        """A failure after the answer began: its status is sent, so the stream ends as a failure."""
        assert self._out is not None
        error = exc if isinstance(exc, SidecarError) else None
        # Counted by the failure's own status (a 408 as a deadline, a 502 as a backend error).
        self.record.status = error.status if error is not None else 500
        self.record.outcome = "failed_midstream"
        self.record.reason = error.reason if error is not None else "internal"
        if self.sse:
            body: dict[str, Any] = (openai_error_body(error) if error is not None else
                                    {"error": {"message": "The server had an error while streaming the audio",
                                               "type": "server_error", "param": None, "code": None}})
            try:
                await self._out.write(_event({"type": "error", **body}))
                await self._out.write_eof()
            except (aiohttp.ClientError, ConnectionResetError):
                pass
        elif self.request.transport is not None:
            self.request.transport.close()  # an unterminated chunked body: the client knows it is cut
        return self._out


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _seconds(pcm: Pcm) -> float:
    return pcm.duration_s


def _feed(encoder: StreamEncoder, pcm: Pcm) -> tuple[bytes, float]:
    return encoder.feed(pcm), _seconds(pcm)


def _first_chunk(pcm: Pcm) -> list[Pcm]:
    """``pcm`` as its first FIRST_CHUNK_S and the rest (or whole, when that short)."""
    at = round(FIRST_CHUNK_S * pcm.rate) * 2
    if len(pcm.samples) <= 2 * at:
        return [pcm]
    return [Pcm(pcm.samples[:at], pcm.rate), Pcm(pcm.samples[at:], pcm.rate)]


def _finish(encoder: StreamEncoder, joiner: PcmJoiner) -> tuple[bytes, float]:
    rest = joiner.close()
    return encoder.feed(rest) + encoder.finish(), _seconds(rest)


def _encode_whole(parts: list[Pcm], fmt: str) -> tuple[bytes, float]:
    joined = Pcm(b"".join(p.samples for p in parts), parts[0].rate)
    return encode(joined, fmt), _seconds(joined)

