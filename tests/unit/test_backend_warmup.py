"""The warm-up request and how its answer is judged, without a backend."""

from __future__ import annotations

import json

import pytest

from backend.warmup import warmup_error, warmup_request
from glmtts.contract import parse_tts
from scheduler.config import WarmupConfig


@pytest.mark.parametrize("config", [
    WarmupConfig(),
    WarmupConfig(text="Hello, world.", index="my voice", sample_rate=32000, use_phoneme=True),
])
def test_the_request_is_a_multipart_form_upstream_accepts(config: WarmupConfig) -> None:
    content_type, body = warmup_request(config)
    assert content_type.startswith("multipart/form-data; boundary=")
    request = parse_tts(content_type, body, prompts=None)
    assert request.input_text == config.text
    assert request.index == config.index
    assert request.model_key == config.model_key == (config.sample_rate, config.use_phoneme)


def test_default_warm_up_fixes_the_default_model() -> None:
    assert WarmupConfig().model_key == (24000, False)


def success(**fields: object) -> bytes:
    return json.dumps({"success": True, "message": "TTS generation successful", **fields},
                      separators=(",", ":")).encode()


@pytest.mark.parametrize(("status", "body", "error"), [
    (200, success(audio_base64="UklGRg=="), None),
    (200, b'{"success":false,"message":"TTS generation failed","error":"CUDA out of memory"}',
     "warm-up synthesis failed: CUDA out of memory"),
    (500, b'{"detail":"Inference failed: emulated fault"}',
     "warm-up answered HTTP 500: Inference failed: emulated fault"),
    (404, b'{"detail":"Prompt index \'exampleA\' not found"}',
     "warm-up answered HTTP 404: Prompt index 'exampleA' not found"),
    (502, b"<html>bad gateway</html>", "warm-up answered HTTP 502: '<html>bad gateway</html>'"),
    (200, b"", "warm-up synthesis failed: empty answer"),
])
def test_only_upstreams_success_counts(status: int, body: bytes, error: str | None) -> None:
    assert warmup_error(status, body) == error
