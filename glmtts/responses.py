"""Upstream's answers: JSON serialised byte for byte as its FastAPI writes it (glmtts.errors.dump_json),
and the one check of whether a TTS answer is a success."""

from __future__ import annotations

import base64

from aiohttp import web

from glmtts.errors import dump_json


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
    head = dump_json({"success": True, "message": SUCCESS_MESSAGE, "audio_base64": ""})
    tail = dump_json({"sample_rate": sample_rate, "generation_time": generation_time, "error": None})
    return b"".join((head[:-3], b'"', base64.b64encode(wav), b'",', tail[1:]))


def succeeded(status: int, head: bytes) -> bool:
    """Whether a TTS answer is upstream's success, judged by its status and first bytes: the one
    check for warm-ups, forwarded requests, async tasks and the metrics they count."""
    return status == 200 and head.startswith(SUCCESS_PREFIX)
