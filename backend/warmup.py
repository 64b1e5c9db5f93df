"""The warm-up synthesis a backend runs before it gets traffic.

A fresh GLM-TTS process loads its model lazily and runs its first long request ~3x slower than a
warm one (measurements/h200-calibration.md); one short synthesis at start-up pays both costs, so
real users never do, and leaves the backend with a known model configuration loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from backend.settings import WarmupConfig
from backend.transport import BackendTimeout, BackendUnavailable, Transport
from glmtts.form import encode_multipart, multipart_content_type
from glmtts.responses import succeeded

__all__ = ["TTS_PATH", "WarmupRun", "warm_up", "warmup_error", "warmup_request"]

TTS_PATH = "/api/v1/tts"
_BOUNDARY = "glmtts-sidecar-warmup-7d3f2a"  # never inside the fields: they are short config strings


@dataclass(frozen=True, kw_only=True, eq=False)
class WarmupRun:
    """A warm-up synthesis that succeeded: what it asked for and how long it took (one object per
    run, so a reader can tell a new run from one it has seen). It ran cold, maybe after loading
    the model: an upper bound on what the same text takes a warm backend."""

    seconds: float
    text: str
    model_key: tuple[int, bool]


def warmup_request(config: WarmupConfig) -> tuple[str, bytes]:
    """(Content-Type, body) of the warm-up: a multipart form as a browser or curl would send it."""
    fields = {
        "input_text": config.text,
        "index": config.index,
        "sample_rate": str(config.sample_rate),
        "use_phoneme": "true" if config.use_phoneme else "false",
    }
    return multipart_content_type(_BOUNDARY), encode_multipart(fields.items(), boundary=_BOUNDARY)


def warmup_error(status: int, body: bytes) -> str | None:
    """None when the answer is upstream's success, else why the warm-up failed."""
    if succeeded(status, body):
        return None
    detail = _detail(body)
    if status == 200:
        return f"warm-up synthesis failed: {detail}"
    return f"warm-up answered HTTP {status}: {detail}"


async def warm_up(transport: Transport, base_url: str, config: WarmupConfig, *, request_id: str) -> str | None:
    """POST the warm-up within `config.timeout_s`; None on success, else why not. Never raises
    for network or protocol failures."""
    content_type, body = warmup_request(config)
    headers = {"Content-Type": content_type, "X-Request-ID": request_id}
    try:
        reply = await transport.open("POST", base_url + TTS_PATH, body=body, headers=headers,
                                     timeout=config.timeout_s, fresh=True)
        try:
            return warmup_error(reply.status, await reply.read())
        finally:
            reply.release()
    except BackendTimeout:
        return f"warm-up timed out after {config.timeout_s:g} s"
    except BackendUnavailable as exc:
        cause = exc.__cause__ or exc
        text = str(cause)
        return f"warm-up failed: {type(cause).__name__}" + (f": {text}" if text else "")


def _detail(body: bytes) -> str:
    """The error upstream put in its answer (`error` or `detail`), else the start of the body."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            if data.get(key):
                return str(data[key])[:200]
    text = body[:200].decode("utf-8", errors="replace")
    return repr(text) if text else "empty answer"
