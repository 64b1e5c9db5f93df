"""The warm-up synthesis a backend runs before it gets traffic.

A fresh GLM-TTS process loads its model lazily and runs its first long request ~3x slower than a
warm one (measurements/h200-calibration.md); one short synthesis at start-up pays both costs, so
real users never do, and leaves the backend with a known model configuration loaded.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from scheduler.config import WarmupConfig

__all__ = ["SUCCESS_PREFIX", "TTS_PATH", "WarmupRun", "warm_up", "warmup_error", "warmup_request"]

TTS_PATH = "/api/v1/tts"
# FastAPI serialises TTSResponse in field order, so a success starts with exactly this.
SUCCESS_PREFIX = b'{"success":true'
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
    parts = [
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    body = ("".join(parts) + f"--{_BOUNDARY}--\r\n").encode("utf-8")
    return f"multipart/form-data; boundary={_BOUNDARY}", body


def warmup_error(status: int, body: bytes) -> str | None:
    """None when the answer is upstream's success, else why the warm-up failed."""
    if status == 200 and body.startswith(SUCCESS_PREFIX):
        return None
    detail = _detail(body)
    if status == 200:
        return f"warm-up synthesis failed: {detail}"
    return f"warm-up answered HTTP {status}: {detail}"


async def warm_up(session: aiohttp.ClientSession, base_url: str, config: WarmupConfig, *,
                  request_id: str) -> str | None:
    """POST the warm-up within `config.timeout_s`; None on success, else why not. Never raises
    for network or protocol failures."""
    content_type, body = warmup_request(config)
    headers = {"Content-Type": content_type, "X-Request-ID": request_id}
    try:
        async with session.post(base_url + TTS_PATH, data=body, headers=headers, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=config.timeout_s)) as resp:
            return warmup_error(resp.status, await resp.read())
    except asyncio.TimeoutError:
        return f"warm-up timed out after {config.timeout_s:g} s"
    except aiohttp.ClientError as exc:
        text = str(exc)
        return f"warm-up failed: {type(exc).__name__}" + (f": {text}" if text else "")


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
