"""Upstream's answers: JSON serialised byte for byte as its FastAPI writes it (glmtts.errors.dump_json),
and the one check of whether a TTS answer is a success."""

from __future__ import annotations

from aiohttp import web

from glmtts.errors import dump_json


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dump_json(payload), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})

# FastAPI serialises TTSResponse in field order, so a success starts with exactly this.
SUCCESS_PREFIX = b'{"success":true'


def succeeded(status: int, head: bytes) -> bool:
    """Whether a TTS answer is upstream's success, judged by its status and first bytes: the one
    check for warm-ups, forwarded requests, async tasks and the metrics they count."""
    return status == 200 and head.startswith(SUCCESS_PREFIX)
