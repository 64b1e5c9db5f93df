"""JSON answers serialised byte for byte as upstream's FastAPI writes them (glmtts.errors.dump_json)."""

from __future__ import annotations

from aiohttp import web

from glmtts.errors import dump_json


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dump_json(payload), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})
