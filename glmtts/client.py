"""An async client for GLM-TTS's HTTP API (upstream, the emulator or the sidecar alike)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from glmtts.contract import PromptConfig
from glmtts.errors import APIError, BadResponse, GenerationFailed, TransportError
from glmtts.wav import WavError, from_base64, read_wav

DEFAULT_URL = "http://127.0.0.1:8049"


@dataclass(frozen=True, kw_only=True)
class TTSResult:
    wav: bytes
    sample_rate: int
    duration: float  # seconds of audio
    generation_time: float | None  # as the server reported it
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def request_id(self) -> str | None:
        return self.headers.get("X-Request-ID")


class GLMTTSClient:
    """``async with GLMTTSClient(url) as client: result = await client.tts("你好", index="exampleA")``."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 900.0,
                 headers: Mapping[str, str] | None = None,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = dict(headers or {})
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> GLMTTSClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def request(self, method: str, path: str, *, data: Any = None,
                      headers: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP exchange; raises TransportError when there is no answer at all."""
        url = self.base_url + path
        try:
            async with self._get_session().request(method, url, data=data,
                                                   headers={**self._headers, **(headers or {})}) as resp:
                return resp.status, dict(resp.headers), await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"{method} {url}: {exc.__class__.__name__}: {exc}") from exc

    async def _json(self, method: str, path: str, *, data: Any = None,
                    headers: Mapping[str, str] | None = None) -> tuple[dict[str, Any], Mapping[str, str]]:
        status, resp_headers, body = await self.request(method, path, data=data, headers=headers)
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        if status >= 400:
            detail = payload.get("detail") if isinstance(payload, dict) else body.decode(errors="replace")
            raise APIError(status, detail, body=body)
        if not isinstance(payload, dict):
            raise BadResponse(f"{method} {path}: expected a JSON object, got {body[:200]!r}")
        return payload, resp_headers

    async def tts(self, text: str, *, index: str | None = None, prompt_audio: bytes | Path | None = None,
                  prompt_audio_filename: str = "prompt.wav", prompt_text: str | None = None,
                  sample_rate: int | None = None, seed: int | None = None, sample_method: str | None = None,
                  sampling: int | None = None, beam_size: int | None = None, use_cache: bool | None = None,
                  use_phoneme: bool | None = None, headers: Mapping[str, str] | None = None) -> TTSResult:
        """Synthesise ``text``; unset options take the server's defaults."""
        form = aiohttp.FormData()
        form.add_field("input_text", text)
        optional: dict[str, Any] = {
            "index": index, "prompt_text": prompt_text, "sample_rate": sample_rate, "seed": seed,
            "sample_method": sample_method, "sampling": sampling, "beam_size": beam_size,
            "use_cache": use_cache, "use_phoneme": use_phoneme,
        }
        for name, value in optional.items():
            if value is not None:
                form.add_field(name, str(value).lower() if isinstance(value, bool) else str(value))
        if prompt_audio is not None:
            audio = (await asyncio.to_thread(prompt_audio.read_bytes)
                     if isinstance(prompt_audio, Path) else prompt_audio)
            filename = prompt_audio.name if isinstance(prompt_audio, Path) else prompt_audio_filename
            form.add_field("prompt_audio", audio, filename=filename, content_type="audio/wav")
        payload, resp_headers = await self._json("POST", "/api/v1/tts", data=form, headers=headers)
        if payload.get("success") is not True:
            raise GenerationFailed(str(payload.get("message")), payload.get("error"),
                                   payload.get("generation_time"))
        try:
            wav = from_base64(str(payload["audio_base64"]))
            audio_info = read_wav(wav)
        except (KeyError, WavError) as exc:
            raise BadResponse(f"audio_base64 is not a valid WAV: {exc}") from exc
        return TTSResult(wav=wav, sample_rate=int(payload.get("sample_rate") or audio_info.sample_rate),
                         duration=audio_info.duration, generation_time=payload.get("generation_time"),
                         headers=resp_headers)

    async def list_prompts(self) -> dict[str, PromptConfig]:
        payload, _ = await self._json("GET", "/api/v1/prompts")
        return {item["index"]: PromptConfig(**item["config"]) for item in payload.get("prompts", [])}

    async def get_prompt(self, index: str) -> PromptConfig:
        payload, _ = await self._json("GET", f"/api/v1/prompts/{_quote(index)}")
        return PromptConfig(**payload["config"])

    async def add_prompt(self, index: str, prompt_audio_path: str, prompt_text: str) -> dict[str, Any]:
        data = {"index": index, "prompt_audio_path": prompt_audio_path, "prompt_text": prompt_text}
        payload, _ = await self._json("POST", "/api/v1/prompts", data=data)
        return payload

    async def update_prompt(self, index: str, prompt_audio_path: str, prompt_text: str) -> dict[str, Any]:
        data = {"prompt_audio_path": prompt_audio_path, "prompt_text": prompt_text}
        payload, _ = await self._json("PUT", f"/api/v1/prompts/{_quote(index)}", data=data)
        return payload

    async def delete_prompt(self, index: str) -> dict[str, Any]:
        payload, _ = await self._json("DELETE", f"/api/v1/prompts/{_quote(index)}")
        return payload

    async def health(self) -> dict[str, Any]:
        payload, _ = await self._json("GET", "/api/v1/health")
        return payload

    async def concurrency_stats(self) -> dict[str, Any]:
        payload, _ = await self._json("GET", "/api/v1/stats/concurrency")
        return payload

    async def clear_cache(self) -> str:
        payload, _ = await self._json("POST", "/api/v1/clear_cache")
        return str(payload.get("message"))


def _quote(segment: str) -> str:
    from urllib.parse import quote

    return quote(segment, safe="")
