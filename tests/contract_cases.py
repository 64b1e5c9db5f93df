"""Every case of UPSTREAM_API.md as data: request bytes in, status and body out.

Run against the emulator directly (tests/integration/test_emulator_contract.py) and, unchanged,
against the sidecar in front of emulators: both must answer exactly as upstream does.
"""

from __future__ import annotations

import base64
import io
import json
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmtts.emulator.prompts import DEFAULT_PROMPTS
from glmtts.form import encode_multipart, multipart_content_type

EXAMPLE_A = DEFAULT_PROMPTS["exampleA"]
EXAMPLE_B = DEFAULT_PROMPTS["exampleB"]
BOUNDARY = "contract-boundary-7f3a"

Check = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Step:
    method: str
    path: str
    status: int
    content_type: str | None = None
    body: bytes = b""
    expect: Any = None  # the exact JSON body, when it is deterministic
    check: Check | None = None  # otherwise, a check of the parsed body
    subset: bool = False  # `expect` must be contained in the body (the sidecar may add detail)


@dataclass(frozen=True)
class Case:
    name: str
    steps: Sequence[Step] = field(default_factory=tuple)


def multipart(*parts: tuple[str, Any], boundary: str = BOUNDARY) -> tuple[str, bytes]:
    """(Content-Type, body) of the parts; a value of (filename, bytes) makes a WAV file part, and
    a value that is neither text nor bytes is sent as its str()."""
    fields = [(name, value if isinstance(value, (str, bytes, tuple)) else str(value)) for name, value in parts]
    return multipart_content_type(boundary), encode_multipart(fields, boundary=boundary)


URLENCODED = "application/x-www-form-urlencoded"


def tts(*parts: tuple[str, Any], status: int, expect: Any = None, check: Check | None = None) -> Step:
    content_type, body = multipart(*parts)
    return Step("POST", "/api/v1/tts", status, content_type, body, expect, check)


def raw_tts(content_type: str | None, body: bytes, status: int, expect: Any = None,
            check: Check | None = None) -> Step:
    return Step("POST", "/api/v1/tts", status, content_type, body, expect, check)


def detail(message: str) -> dict[str, str]:
    return {"detail": message}


def missing(*names: str) -> dict[str, Any]:
    return {"detail": [{"type": "missing", "loc": ["body", n], "msg": "Field required", "input": None}
                       for n in names]}


INT_MSG = "Input should be a valid integer, unable to parse string as an integer"
BOOL_MSG = "Input should be a valid boolean, unable to interpret input"


def int_error(name: str, value: str) -> dict[str, Any]:
    return {"type": "int_parsing", "loc": ["body", name], "msg": INT_MSG, "input": value}


def bool_error(name: str, value: str) -> dict[str, Any]:
    return {"type": "bool_parsing", "loc": ["body", name], "msg": BOOL_MSG, "input": value}


def wav_ok(sample_rate: int) -> Check:
    def check(body: dict[str, Any]) -> None:
        assert list(body) == ["success", "message", "audio_base64", "sample_rate", "generation_time", "error"]
        assert body["success"] is True
        assert body["message"] == "TTS generation successful"
        assert body["error"] is None
        assert body["sample_rate"] == sample_rate
        assert isinstance(body["generation_time"], float | int) and body["generation_time"] >= 0
        with wave.open(io.BytesIO(base64.b64decode(body["audio_base64"], validate=True))) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, sample_rate)
            assert wav.getnframes() > 0

    return check


def health_ok(body: dict[str, Any]) -> None:
    assert body["status"] == "healthy"
    assert isinstance(body["model_loaded"], bool)
    assert body["model_sample_rate"] in (None, 24000, 32000)
    assert body["model_use_phoneme"] in (None, True, False)
    assert isinstance(body["prompt_cache_count"], int)


def concurrency_ok(body: dict[str, Any]) -> None:
    # The shape clients rely on; the numbers are the server's own (upstream's semaphores, or the
    # sidecar's pool).
    assert body["success"] is True
    for name in ("short_text", "long_text"):
        stats = body["stats"][name]
        assert {"active", "total", "limit", "available"} <= set(stats)
        assert all(isinstance(stats[k], int) for k in ("active", "total", "limit", "available"))
        assert stats["available"] <= stats["limit"]
    assert set(body["config"]["concurrency"]) == {"short_text", "long_text", "threshold"}
    assert set(body["config"]["timeout"]) == {"short_text", "medium_text", "long_text"}
    assert {"queue", "workers"} <= set(body["config"])


PROMPT_AUDIO = ("voice.wav", open(EXAMPLE_A.prompt_audio_path, "rb").read())  # noqa: SIM115
EXAMPLE_A_JSON = {"index": "exampleA", "config": EXAMPLE_A.as_dict()}
EXAMPLE_B_JSON = {"index": "exampleB", "config": EXAMPLE_B.as_dict()}
NEW_CONFIG = {"prompt_audio_path": EXAMPLE_B.prompt_audio_path, "prompt_text": "一段新的提示文本。"}


def _form(**fields: str) -> bytes:
    from urllib.parse import urlencode

    return urlencode(fields).encode()


CASES: list[Case] = [
    # --- POST /api/v1/tts: FastAPI validation (422), all errors at once, declaration order ------
    Case("missing input_text", [tts(("index", "exampleA"), status=422, expect=missing("input_text"))]),
    Case("empty input_text counts as missing", [tts(("input_text", ""), ("index", "exampleA"),
                                                    status=422, expect=missing("input_text"))]),
    Case("empty urlencoded body", [raw_tts(URLENCODED, b"", 422, missing("input_text"))]),
    Case("no content type gives an empty form", [raw_tts(None, b"input_text=hi", 422, missing("input_text"))]),
    Case("json is not a form", [raw_tts("application/json", b'{"input_text": "hi", "index": "exampleA"}',
                                        422, missing("input_text"))]),
    Case("int_parsing", [tts(("input_text", "你好"), ("index", "exampleA"), ("sample_rate", "abc"),
                             status=422, expect={"detail": [int_error("sample_rate", "abc")]})]),
    Case("bool_parsing", [tts(("input_text", "你好"), ("index", "exampleA"), ("use_phoneme", "maybe"),
                              status=422, expect={"detail": [bool_error("use_phoneme", "maybe")]})]),
    Case("every field error in declaration order", [tts(
        ("beam_size", "x"), ("use_cache", "2"), ("sample_rate", "24k"), ("seed", "1.5"), ("index", "exampleA"),
        status=422, expect={"detail": [
            missing("input_text")["detail"][0], int_error("seed", "1.5"), int_error("sample_rate", "24k"),
            bool_error("use_cache", "2"), int_error("beam_size", "x")]})]),
    Case("prompt_audio sent as text", [tts(("input_text", "你好"), ("prompt_audio", "voice.wav"),
                                           ("prompt_text", "x"), status=422, expect={"detail": [{
        "type": "value_error", "loc": ["body", "prompt_audio"],
        "msg": "Value error, Expected UploadFile, received: <class 'str'>", "input": "voice.wav",
        "ctx": {"error": {}}}]})]),
    Case("422 before 400: a blank text with a bad int", [tts(("input_text", "  "), ("sampling", "many"),
                                                             status=422,
                                                             expect={"detail": [int_error("sampling", "many")]})]),
    # --- the handler's checks (400/404), first failure wins ---------------------------------------
    Case("blank input_text", [tts(("input_text", " \t\n"), ("index", "exampleA"), status=400,
                                  expect=detail("input_text is required"))]),
    Case("blank text is checked before the sample rate", [tts(
        ("input_text", "  "), ("sample_rate", "16000"), status=400, expect=detail("input_text is required"))]),
    Case("sample_rate", [tts(("input_text", "你好"), ("index", "exampleA"), ("sample_rate", "16000"),
                             status=400, expect=detail("sample_rate must be 24000 or 32000"))]),
    Case("sample_method", [tts(("input_text", "你好"), ("index", "exampleA"), ("sample_method", "greedy"),
                               status=400, expect=detail("sample_method must be 'ras' or 'topk'"))]),
    Case("sampling too low", [tts(("input_text", "你好"), ("index", "exampleA"), ("sampling", "0"),
                                  status=400, expect=detail("sampling must be between 1 and 100"))]),
    Case("sampling too high", [tts(("input_text", "你好"), ("index", "exampleA"), ("sampling", "101"),
                                   status=400, expect=detail("sampling must be between 1 and 100"))]),
    Case("beam_size", [tts(("input_text", "你好"), ("index", "exampleA"), ("beam_size", "6"),
                           status=400, expect=detail("beam_size must be between 1 and 5"))]),
    Case("sample rate is checked before the index", [tts(
        ("input_text", "你好"), ("index", "nope"), ("sample_rate", "8000"), status=400,
        expect=detail("sample_rate must be 24000 or 32000"))]),
    Case("unknown index", [tts(("input_text", "你好"), ("index", "nope"), status=404,
                               expect=detail("Prompt index 'nope' not found"))]),
    Case("neither index nor upload", [tts(("input_text", "你好"), status=400, expect=detail(
        "Either 'index' or both 'prompt_audio' and 'prompt_text' must be provided"))]),
    Case("prompt_text without audio", [tts(("input_text", "你好"), ("prompt_text", "x"), status=400, expect=detail(
        "Either 'index' or both 'prompt_audio' and 'prompt_text' must be provided"))]),
    Case("audio without prompt_text", [tts(("input_text", "你好"), ("prompt_audio", PROMPT_AUDIO), status=400,
                                           expect=detail("Either 'index' or both 'prompt_audio' and "
                                                         "'prompt_text' must be provided"))]),
    Case("blank prompt_text in upload mode", [tts(("input_text", "你好"), ("prompt_audio", PROMPT_AUDIO),
                                                  ("prompt_text", "   "), status=400,
                                                  expect=detail("prompt_text cannot be empty"))]),
    # --- bodies that are not well-formed forms (400) ----------------------------------------------
    Case("multipart without boundary", [raw_tts("multipart/form-data", b"--x\r\n", 400,
                                                detail("Missing boundary in multipart."))]),
    Case("text before the first boundary", [raw_tts(
        f"multipart/form-data; boundary={BOUNDARY}",
        b"junk\r\n" + multipart(("input_text", "hi"), ("index", "exampleA"))[1], 400,
        detail("Invalid multipart data."))]),
    Case("part without a name", [raw_tts(
        f"multipart/form-data; boundary={BOUNDARY}",
        f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nhi\r\n--{BOUNDARY}--\r\n".encode(), 400,
        detail('The Content-Disposition header field "name" must be provided.'))]),
    Case("body cut before the closing boundary", [raw_tts(
        f"multipart/form-data; boundary={BOUNDARY}",
        multipart(("input_text", "hi"), ("index", "exampleA"))[1][: -len(f"--{BOUNDARY}--\r\n") - 2], 400,
        detail("Invalid multipart data: the body ends before the closing boundary."))]),
    Case("duplicate field", [tts(("input_text", "a"), ("input_text", "b"), ("index", "exampleA"),
                                 status=400, expect=detail("Duplicate form field 'input_text'"))]),
    Case("text that is not UTF-8", [tts(("input_text", b"\xff\xfe caf\xe9"), ("index", "exampleA"),
                                        status=400, expect=detail("Invalid utf-8 in form field 'input_text'."))]),
    Case("urlencoded escapes that are not UTF-8", [raw_tts(URLENCODED, b"input_text=%FF%FE&index=exampleA", 400,
                                                           detail("Invalid UTF-8 in form field 'input_text'."))]),
    Case("field over 1 MiB", [tts(("input_text", "a" * (1024 * 1024 + 1)), ("index", "exampleA"), status=400,
                                  expect=detail("Part exceeded maximum size of 1024KB."))]),
    Case("too many fields", [raw_tts(URLENCODED, b"&".join(b"f%d=1" % i for i in range(1001)), 400,
                                     detail("Too many fields. Maximum number of fields is 1000."))]),
    # --- successful synthesis ---------------------------------------------------------------------
    Case("index mode, multipart", [tts(("input_text", "你好，世界。"), ("index", "exampleA"), status=200,
                                       check=wav_ok(24000))]),
    Case("index mode, urlencoded", [raw_tts(URLENCODED, _form(input_text="今天天气很好", index="exampleB"), 200,
                                            check=wav_ok(24000))]),
    Case("upload mode", [tts(("input_text", "Hello there, 你好。"), ("prompt_audio", PROMPT_AUDIO),
                             ("prompt_text", "参考音频的文本"), status=200, check=wav_ok(24000))]),
    Case("32 kHz, every option set", [tts(
        ("input_text", "测试一下"), ("index", "exampleA"), ("sample_rate", "32000"), ("seed", "+7"),
        ("sample_method", "topk"), ("sampling", "100"), ("beam_size", "5"), ("use_cache", "OFF"),
        ("use_phoneme", "no"), ("extra_field", "ignored"), status=200, check=wav_ok(32000))]),
    # --- prompts ----------------------------------------------------------------------------------
    Case("list prompts", [Step("GET", "/api/v1/prompts", 200, expect={
        "success": True, "prompts": [EXAMPLE_A_JSON, EXAMPLE_B_JSON]})]),
    Case("get prompt", [Step("GET", "/api/v1/prompts/exampleA", 200, expect=EXAMPLE_A_JSON)]),
    Case("get unknown prompt", [Step("GET", "/api/v1/prompts/nope", 404,
                                     expect=detail("Prompt index 'nope' not found"))]),
    Case("add prompt with fields missing", [Step("POST", "/api/v1/prompts", 422, URLENCODED,
                                                 _form(prompt_text="x"),
                                                 missing("index", "prompt_audio_path"))]),
    Case("add prompt that exists", [Step("POST", "/api/v1/prompts", 400, URLENCODED, _form(
        index="exampleA", prompt_audio_path=EXAMPLE_A.prompt_audio_path, prompt_text="x"),
        detail("Prompt index 'exampleA' already exists"))]),
    Case("add prompt whose audio does not exist", [Step("POST", "/api/v1/prompts", 400, URLENCODED, _form(
        index="ghost", prompt_audio_path="/nonexistent/voice.wav", prompt_text="x"),
        detail("Invalid prompt configuration"))]),
    Case("add prompt with blank text", [Step("POST", "/api/v1/prompts", 400, URLENCODED, _form(
        index="ghost", prompt_audio_path=EXAMPLE_A.prompt_audio_path, prompt_text="  "),
        detail("Invalid prompt configuration"))]),
    Case("update unknown prompt", [Step("PUT", "/api/v1/prompts/nope", 404, URLENCODED, _form(**NEW_CONFIG),
                                        detail("Prompt index 'nope' not found"))]),
    Case("update with fields missing is 422 before 404", [Step("PUT", "/api/v1/prompts/nope", 422, URLENCODED,
                                                               b"", missing("prompt_audio_path", "prompt_text"))]),
    Case("delete unknown prompt", [Step("DELETE", "/api/v1/prompts/nope", 404,
                                        expect=detail("Prompt index 'nope' not found"))]),
    Case("prompt lifecycle: add, use, update, delete", [
        Step("POST", "/api/v1/prompts", 200, URLENCODED, _form(index="case-new", **NEW_CONFIG), {
            "success": True, "message": "Prompt 'case-new' added successfully", "index": "case-new",
            "config": NEW_CONFIG}),
        Step("GET", "/api/v1/prompts/case-new", 200, expect={"index": "case-new", "config": NEW_CONFIG}),
        tts(("input_text", "用新的提示"), ("index", "case-new"), status=200, check=wav_ok(24000)),
        Step("PUT", "/api/v1/prompts/case-new", 200, *multipart(
            ("prompt_audio_path", EXAMPLE_A.prompt_audio_path), ("prompt_text", "改过的")), {
            "success": True, "message": "Prompt 'case-new' updated successfully", "index": "case-new",
            "config": {"prompt_audio_path": EXAMPLE_A.prompt_audio_path, "prompt_text": "改过的"}}),
        Step("DELETE", "/api/v1/prompts/case-new", 200,
             expect={"success": True, "message": "Prompt 'case-new' deleted successfully"}),
        Step("GET", "/api/v1/prompts/case-new", 404, expect=detail("Prompt index 'case-new' not found")),
        tts(("input_text", "你好"), ("index", "case-new"), status=404,
            expect=detail("Prompt index 'case-new' not found")),
    ]),
    # --- health, stats, cache, routing ------------------------------------------------------------
    Case("health", [Step("GET", "/api/v1/health", 200, check=health_ok)]),
    Case("concurrency stats", [Step("GET", "/api/v1/stats/concurrency", 200, check=concurrency_ok)]),
    Case("clear cache, then the next request loads again", [
        Step("POST", "/api/v1/clear_cache", 200, expect={
            "success": True, "message": "Memory cleared. Models will reload on next inference."}),
        Step("GET", "/api/v1/health", 200, expect={"status": "healthy", "model_loaded": False,
                                                   "model_sample_rate": None, "model_use_phoneme": None},
             subset=True),
        tts(("input_text", "再来一次"), ("index", "exampleA"), status=200, check=wav_ok(24000)),
    ]),
    Case("unknown path", [Step("GET", "/api/v2/tts", 404, expect=detail("Not Found"))]),
    Case("wrong method", [Step("GET", "/api/v1/tts", 405, expect=detail("Method Not Allowed"))]),
]


def run_step(base_url: str, step: Step, send: Callable[..., tuple[int, dict[str, str], bytes]]) -> None:
    headers = {"Content-Type": step.content_type} if step.content_type else {}
    status, _, raw = send(step.method, base_url + step.path, body=step.body if step.method != "GET" else None,
                          headers=headers)
    body = json.loads(raw) if raw else None
    assert status == step.status, (step.method, step.path, status, raw[:500])
    if step.expect is not None:
        if step.subset:
            assert {k: body[k] for k in step.expect} == step.expect, body
        else:
            assert body == step.expect
    if step.check is not None:
        step.check(body)
