"""Upstream's answers: JSON serialised byte for byte as its FastAPI writes it (glmtts.errors.dump_json),
and the one check of whether a TTS answer is a success."""

from __future__ import annotations

import base64
from collections.abc import Iterable

from aiohttp import web

from glmtts.audio import Pcm, PcmJoiner
from glmtts.errors import dump_json
from glmtts.wav import wav_header


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dump_json(payload), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})

# FastAPI serialises TTSResponse in field order, so a success starts with exactly this.
SUCCESS_PREFIX = b'{"success":true'
SUCCESS_MESSAGE = "TTS generation successful"


def success_json(wav: bytes, *, sample_rate: int | None, generation_time: float) -> bytes:
    """Upstream's TTS success answer, byte for byte what ``dump_json`` writes for it, with the WAV's
    base64 spliced in instead of passed through the JSON encoder: base64 needs no escaping, and the
    encoder's scan of a long text's ~7 MB string took ~27 ms, on the path to the caller."""
    return _success((base64.b64encode(wav),), sample_rate=sample_rate, generation_time=generation_time)


def _success(audio_base64: Iterable[bytes], *, sample_rate: int | None, generation_time: float) -> bytes:
    head = dump_json({"success": True, "message": SUCCESS_MESSAGE, "audio_base64": ""})
    tail = dump_json({"sample_rate": sample_rate, "generation_time": generation_time, "error": None})
    return b"".join((head[:-3], b'"', *audio_base64, b'",', tail[1:]))


# The WAV header's 44 bytes and the first data byte are 15 whole base64 groups, so the samples
# after that byte can be encoded as they come, 3 bytes at a time, before the header is known.
_HEAD_DATA = 1


class JoinedSuccess:
    """Upstream's success answer for pieces joined as ``join_pcm`` joins them, assembled as they
    come: ``push`` the pieces in order (each one is joined and base64-encoded at once), then
    ``finish``. Its answer is ``success_json(encode(join_pcm(pieces, ...), "wav"), ...)`` byte for
    byte; only the pieces pushed last are left for ``finish`` to do, so the answer is ready soon
    after the last piece. CPU-bound: off the event loop, one caller at a time. Raises ValueError as
    ``join_pcm`` does (pieces of different rates, bad seconds) and for ``finish`` with no piece."""

    def __init__(self, *, crossfade_s: float = 0.0, pause_s: float = 0.0) -> None:
        self._crossfade_s, self._pause_s = crossfade_s, pause_s
        self._joiner: PcmJoiner | None = None
        self._head = b""  # the first data byte, encoded with the header at the end
        self._carry = b""  # up to 2 bytes not yet encoded (base64 takes 3 at a time)
        self._encoded: list[bytes] = []
        self._size = 0  # data bytes so far

    def push(self, piece: Pcm) -> None:
        if self._joiner is None:
            if not isinstance(piece, Pcm):
                raise ValueError(f"a piece must be Pcm, got {type(piece).__name__}")
            self._joiner = PcmJoiner(piece.rate, crossfade_s=self._crossfade_s, pause_s=self._pause_s)
        self._add(self._joiner.push(piece).samples)

    def finish(self, *, generation_time: float) -> bytes:
        if self._joiner is None:
            raise ValueError("no pieces to join")
        self._add(self._joiner.close().samples)
        header = wav_header(self._joiner.rate, self._size)
        return _success((base64.b64encode(header + self._head), *self._encoded, base64.b64encode(self._carry)),
                        sample_rate=self._joiner.rate, generation_time=generation_time)

    def _add(self, data: bytes) -> None:
        self._size += len(data)
        view = memoryview(data)
        if len(self._head) < _HEAD_DATA:
            taken = _HEAD_DATA - len(self._head)
            self._head += bytes(view[:taken])
            view = view[taken:]
        if self._carry:
            needed = 3 - len(self._carry)
            if len(view) < needed:
                self._carry += bytes(view)
                return
            self._encoded.append(base64.b64encode(self._carry + bytes(view[:needed])))
            view = view[needed:]
        whole = len(view) - len(view) % 3
        if whole:
            self._encoded.append(base64.b64encode(view[:whole]))
        self._carry = bytes(view[whole:])


def succeeded(status: int, head: bytes) -> bool:
    """Whether a TTS answer is upstream's success, judged by its status and first bytes: the one
    check for warm-ups, forwarded requests, async tasks and the metrics they count."""
    return status == 200 and head.startswith(SUCCESS_PREFIX)
