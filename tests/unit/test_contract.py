"""glmtts.contract: FastAPI-style field validation and the TTS handler's checks.

The HTTP-level cases live in tests/contract_cases.py; these pin the functions underneath.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from glmtts.contract import (
    PROMPT_ADD_FIELDS,
    PROMPT_UPDATE_FIELDS,
    TTS_FIELDS,
    DuplicateField,
    Field,
    Kind,
    PromptAddForm,
    PromptConfig,
    PromptUpdateForm,
    TTSRequest,
    check_tts,
    parse_prompt_add,
    parse_prompt_update,
    parse_tts,
    parse_tts_form,
    prompt_not_found,
    validate_fields,
)
from glmtts.errors import HTTPDetailError, ValidationFailed
from glmtts.form import FormData, FormValue, UploadedFile, encode_multipart

B = "contract-unit-boundary"
MP = f"multipart/form-data; boundary={B}"
URLENC = "application/x-www-form-urlencoded"
PROMPTS = {"exampleA": PromptConfig(prompt_audio_path="/p/a.wav", prompt_text="参考文本")}
AUDIO = UploadedFile(filename="voice.wav", content_type="audio/wav", data=b"RIFF....",
                     headers=(("content-disposition", 'form-data; name="prompt_audio"; filename="voice.wav"'),
                              ("content-type", "audio/wav")))

INT_MSG = "Input should be a valid integer, unable to parse string as an integer"
BOOL_MSG = "Input should be a valid boolean, unable to interpret input"
EITHER = "Either 'index' or both 'prompt_audio' and 'prompt_text' must be provided"

SETTINGS = settings(max_examples=300, deadline=None)


def form(*items: tuple[str, FormValue]) -> FormData:
    return FormData(tuple(items))


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def multipart(*parts: tuple[str, Any], boundary: str = B) -> bytes:
    """Encode parts; a value of (filename, bytes) makes a file part."""
    return encode_multipart(parts, boundary=boundary)


def one(kind: Kind, raw: FormValue, *, required: bool = False, default: Any = None) -> Any:
    """Validate a single field named 'f'; the value, or the error list."""
    spec = (Field("f", kind, required=required, default=default),)
    try:
        return validate_fields(form(("f", raw)), spec)["f"]
    except ValidationFailed as exc:
        return exc.errors


def missing(name: str) -> dict[str, Any]:
    return {"type": "missing", "loc": ["body", name], "msg": "Field required", "input": None}


def int_error(name: str, value: str) -> dict[str, Any]:
    return {"type": "int_parsing", "loc": ["body", name], "msg": INT_MSG, "input": value}


def bool_error(name: str, value: str) -> dict[str, Any]:
    return {"type": "bool_parsing", "loc": ["body", name], "msg": BOOL_MSG, "input": value}


def detail_error(call: Any) -> tuple[int, Any]:
    with pytest.raises(HTTPDetailError) as info:
        call()
    return info.value.status, info.value.detail


# --- TTSRequest ----------------------------------------------------------------------------------


def test_tts_request_defaults() -> None:
    request = TTSRequest(input_text="hi")
    assert (request.index, request.prompt_text, request.prompt_audio) == (None, None, None)
    assert (request.seed, request.sample_rate, request.use_cache, request.use_phoneme) == (42, 24000, True, False)
    assert (request.sample_method, request.sampling, request.beam_size) == ("ras", 25, 1)
    assert request.model_key == (24000, False)


def test_field_defaults_match_the_request_defaults() -> None:
    defaults = TTSRequest(input_text="x")
    for spec in TTS_FIELDS:
        if not spec.required:
            assert getattr(defaults, spec.name) == spec.default, spec.name
    assert [spec.name for spec in TTS_FIELDS] == [
        "input_text", "index", "prompt_text", "prompt_audio", "seed", "sample_rate", "use_cache",
        "use_phoneme", "sample_method", "sampling", "beam_size"]
    assert [spec.name for spec in PROMPT_ADD_FIELDS] == ["index", "prompt_audio_path", "prompt_text"]
    assert [spec.name for spec in PROMPT_UPDATE_FIELDS] == ["prompt_audio_path", "prompt_text"]


@pytest.mark.parametrize(("text", "chars"), [("", 0), ("hello", 5), ("你好，世界。", 6), ("😀👍🏽", 3),
                                             ("e\u0301", 2), (" \n", 2)])
def test_chars_counts_code_points(text: str, chars: int) -> None:
    assert TTSRequest(input_text=text).chars == chars


@pytest.mark.parametrize(("sample_rate", "use_phoneme"), [(24000, False), (32000, True), (32000, False)])
def test_model_key(sample_rate: int, use_phoneme: bool) -> None:
    request = TTSRequest(input_text="x", sample_rate=sample_rate, use_phoneme=use_phoneme, use_cache=False,
                         seed=7)
    assert request.model_key == (sample_rate, use_phoneme)


# --- validate_fields: coercion -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [("42", 42), (" 42 ", 42), ("\t7\n", 7), ("+4", 4), ("-4", -4), ("-0", 0), ("007", 7), ("1_000", 1000),
     ("4.0", 4), ("-3.000", -3), ("99999999999999999999", 99999999999999999999)],
)
def test_int_accepts(raw: str, value: int) -> None:
    assert one(Kind.INT, raw) == value


@pytest.mark.parametrize(
    "raw",
    ["4.5", "0x10", "0b1", "1e3", "１２", "٣", "4.", ".5", "1__0", "_1", "1_", " ", "+", "--1", "1 2", "inf",
     "nan", "abc", "24k", "\x00"],
)
def test_int_rejects(raw: str) -> None:
    assert one(Kind.INT, raw) == [int_error("f", raw)]


def test_int_too_long() -> None:
    raw = "9" * 5000
    assert one(Kind.INT, raw) == [{"type": "int_parsing_size", "loc": ["body", "f"],
                                   "msg": "Unable to parse input string as an integer, exceeded maximum size",
                                   "input": raw}]


@pytest.mark.parametrize(
    ("raw", "value"),
    [(word, True) for word in ("true", "TRUE", "True", "tRuE", "yes", "YES", "Yes", "on", "ON", "1", "t", "T",
                               "y", "Y")]
    + [(word, False) for word in ("false", "FALSE", "no", "No", "off", "OFF", "Off", "0", "f", "F", "n", "N")],
)
def test_bool_accepts(raw: str, value: bool) -> None:
    assert one(Kind.BOOL, raw) is value


@pytest.mark.parametrize("raw", [" yes", "yes ", "2", "-1", "0.0", "1.0", "maybe", "tru", "nope", "是", "１"])
def test_bool_rejects(raw: str) -> None:
    assert one(Kind.BOOL, raw) == [bool_error("f", raw)]


@pytest.mark.parametrize("raw", [" ", "  padded  ", "0", "\x00", "你好", "a" * 1000])
def test_str_takes_any_non_empty_text_as_is(raw: str) -> None:
    assert one(Kind.STR, raw) == raw


@pytest.mark.parametrize(
    ("kind", "error_type", "msg"),
    [(Kind.STR, "string_type", "Input should be a valid string"),
     (Kind.INT, "int_type", "Input should be a valid integer"),
     (Kind.BOOL, "bool_type", "Input should be a valid boolean")],
)
def test_file_sent_for_a_text_field(kind: Kind, error_type: str, msg: str) -> None:
    assert one(kind, AUDIO) == [{
        "type": error_type, "loc": ["body", "f"], "msg": msg,
        "input": {"filename": "voice.wav", "size": 8, "headers": {
            "content-disposition": 'form-data; name="prompt_audio"; filename="voice.wav"',
            "content-type": "audio/wav"}},
    }]


def test_file_field() -> None:
    assert one(Kind.FILE, AUDIO) is AUDIO
    assert one(Kind.FILE, "voice.wav") == [{
        "type": "value_error", "loc": ["body", "f"],
        "msg": "Value error, Expected UploadFile, received: <class 'str'>", "input": "voice.wav",
        "ctx": {"error": {}}}]


@pytest.mark.parametrize("kind", list(Kind))
def test_empty_string_counts_as_absent(kind: Kind) -> None:
    sentinel = object()
    assert one(kind, "", default=sentinel) is sentinel
    assert one(kind, "", required=True) == [missing("f")]
    spec = (Field("f", kind, default=sentinel),)
    assert validate_fields(FormData(), spec) == {"f": sentinel}
    assert validate_fields(form(("other", "x")), spec) == {"f": sentinel}


# --- validate_fields: the whole form -------------------------------------------------------------


def test_empty_tts_form() -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_tts_form(FormData())
    assert info.value.status == 422
    assert info.value.errors == [missing("input_text")]
    assert info.value.body_bytes() == (b'{"detail":[{"type":"missing","loc":["body","input_text"],'
                                       b'"msg":"Field required","input":null}]}')
    assert str(info.value) == "body.input_text: Field required"


def test_every_field_set() -> None:
    request = parse_tts_form(form(
        ("beam_size", "5"), ("sampling", "100"), ("sample_method", "topk"), ("use_phoneme", "on"),
        ("use_cache", "no"), ("sample_rate", "32000"), ("seed", "-1"), ("prompt_audio", AUDIO),
        ("prompt_text", "参考"), ("index", "exampleA"), ("input_text", "你好"), ("unknown", "ignored"),
        ("unknown", "twice"),
    ))
    assert request == TTSRequest(input_text="你好", index="exampleA", prompt_text="参考", prompt_audio=AUDIO,
                                 seed=-1, sample_rate=32000, use_cache=False, use_phoneme=True,
                                 sample_method="topk", sampling=100, beam_size=5)


def test_errors_come_in_declaration_order_whatever_the_form_order() -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_tts_form(form(("beam_size", "x"), ("prompt_audio", "text"), ("use_phoneme", "2"),
                            ("input_text", AUDIO), ("seed", "1.5"), ("sample_rate", "")))
    assert [e["loc"][1] for e in info.value.errors] == ["input_text", "prompt_audio", "seed", "use_phoneme",
                                                       "beam_size"]
    assert [e["type"] for e in info.value.errors] == ["string_type", "value_error", "int_parsing",
                                                     "bool_parsing", "int_parsing"]


@given(st.permutations(TTS_FIELDS), st.data())
@SETTINGS
def test_error_order_property(order: list[Field], data: st.DataObject) -> None:
    bad: dict[Kind, FormValue] = {Kind.STR: AUDIO, Kind.INT: "x", Kind.BOOL: "maybe", Kind.FILE: "text"}
    chosen = [spec for spec in order if data.draw(st.booleans())]
    items = tuple((spec.name, bad[spec.kind]) for spec in chosen)
    with pytest.raises(ValidationFailed) as info:
        parse_tts_form(FormData(items))
    expected = [spec.name for spec in TTS_FIELDS if spec in chosen or spec.name == "input_text"]
    assert [e["loc"] for e in info.value.errors] == [["body", name] for name in expected]


@pytest.mark.parametrize(
    ("items", "name"),
    [
        ((("input_text", "a"), ("input_text", "b")), "input_text"),
        ((("input_text", "a"), ("input_text", "")), "input_text"),  # even when one of them is empty
        ((("seed", "1"), ("input_text", "a"), ("seed", "1")), "seed"),
        ((("prompt_audio", AUDIO), ("prompt_audio", AUDIO), ("input_text", "a")), "prompt_audio"),
        ((("prompt_audio", AUDIO), ("prompt_audio", "x"), ("input_text", "a")), "prompt_audio"),
        # The first duplicate in declaration order is named, not the first in the form.
        ((("beam_size", "1"), ("beam_size", "1"), ("index", "a"), ("index", "b")), "index"),
        # Duplicates win over every 422.
        ((("sample_rate", "x"), ("sample_rate", "y")), "sample_rate"),
    ],
)
def test_duplicate_declared_fields(items: tuple[tuple[str, FormValue], ...], name: str) -> None:
    with pytest.raises(DuplicateField) as info:
        parse_tts_form(FormData(items))
    assert (info.value.status, info.value.detail) == (400, f"Duplicate form field '{name}'")


def test_duplicate_undeclared_fields_are_ignored() -> None:
    request = parse_tts_form(form(("input_text", "a"), ("x", "1"), ("x", "2"), ("", "3"), ("", "4")))
    assert request == TTSRequest(input_text="a")


# --- check_tts -----------------------------------------------------------------------------------

GOOD = TTSRequest(input_text="你好", index="exampleA")

# Each handler check with a value that fails it, in upstream's order.
CHECKS: list[tuple[str, dict[str, Any], int, str]] = [
    ("blank text", {"input_text": " \t\n\u3000"}, 400, "input_text is required"),
    ("sample rate", {"sample_rate": 16000}, 400, "sample_rate must be 24000 or 32000"),
    ("sample method", {"sample_method": "greedy"}, 400, "sample_method must be 'ras' or 'topk'"),
    ("sampling", {"sampling": 0}, 400, "sampling must be between 1 and 100"),
    ("beam size", {"beam_size": 6}, 400, "beam_size must be between 1 and 5"),
]
LAST_CHECKS: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown index", {"index": "nope"}, 404, "Prompt index 'nope' not found"),
    ("neither mode", {"index": None}, 400, EITHER),
    ("blank prompt text", {"index": None, "prompt_audio": AUDIO, "prompt_text": "  "}, 400,
     "prompt_text cannot be empty"),
]


@pytest.mark.parametrize("last", LAST_CHECKS, ids=[c[0] for c in LAST_CHECKS])
@pytest.mark.parametrize("first", range(len(CHECKS) + 1), ids=[c[0] for c in CHECKS] + ["mode"])
def test_check_order(first: int, last: tuple[str, dict[str, Any], int, str]) -> None:
    """Break check `first` and every later one: check `first` is the one reported."""
    table = [*CHECKS, last]
    request = GOOD
    for _, change, _, _ in table[first:]:
        request = replace(request, **change)
    _, _, status, detail = table[first]
    assert detail_error(lambda: check_tts(request, prompts=PROMPTS)) == (status, detail)


@pytest.mark.parametrize(
    "change",
    [{}, {"sample_rate": 32000}, {"sample_method": "topk"}, {"sampling": 1}, {"sampling": 100},
     {"beam_size": 1}, {"beam_size": 5}, {"input_text": "\u200b"}, {"seed": -(10**30)},
     {"prompt_audio": AUDIO, "prompt_text": ""}],
)
def test_check_passes(change: dict[str, Any]) -> None:
    check_tts(replace(GOOD, **change), prompts=PROMPTS)


@pytest.mark.parametrize(
    ("change", "detail"),
    [({"sample_rate": 0}, "sample_rate must be 24000 or 32000"),
     ({"sample_rate": 24001}, "sample_rate must be 24000 or 32000"),
     ({"sample_rate": 48000}, "sample_rate must be 24000 or 32000"),
     ({"sample_method": "RAS"}, "sample_method must be 'ras' or 'topk'"),
     ({"sample_method": " ras"}, "sample_method must be 'ras' or 'topk'"),
     ({"sampling": 101}, "sampling must be between 1 and 100"),
     ({"sampling": -1}, "sampling must be between 1 and 100"),
     ({"beam_size": 0}, "beam_size must be between 1 and 5"),
     ({"input_text": ""}, "input_text is required")],
)
def test_check_bounds(change: dict[str, Any], detail: str) -> None:
    assert detail_error(lambda: check_tts(replace(GOOD, **change), prompts=PROMPTS)) == (400, detail)


def test_prompts_none_skips_the_index_lookup() -> None:
    request = replace(GOOD, index="anything-at-all")
    check_tts(request)
    check_tts(request, prompts=None)
    assert detail_error(lambda: check_tts(request, prompts={})) == (404, "Prompt index 'anything-at-all' not found")
    assert detail_error(lambda: check_tts(request, prompts=PROMPTS))[0] == 404
    # The other checks still run.
    assert detail_error(lambda: check_tts(replace(request, beam_size=9)))[0] == 400


@pytest.mark.parametrize("prompts", [None, PROMPTS, {}])
def test_upload_mode(prompts: dict[str, PromptConfig] | None) -> None:
    upload = TTSRequest(input_text="hi", prompt_audio=AUDIO, prompt_text="参考")
    check_tts(upload, prompts=prompts)
    assert detail_error(lambda: check_tts(replace(upload, prompt_text=None), prompts=prompts)) == (400, EITHER)
    assert detail_error(lambda: check_tts(replace(upload, prompt_audio=None), prompts=prompts)) == (400, EITHER)
    # With an index, the index decides: the upload is not looked at.
    if prompts is not None:
        assert detail_error(lambda: check_tts(replace(upload, index="nope"), prompts=prompts))[0] == 404
    check_tts(replace(upload, index="exampleA", prompt_text="  "), prompts=None)


def test_prompt_not_found() -> None:
    error = prompt_not_found("x'y")
    assert (error.status, error.detail) == (404, "Prompt index 'x'y' not found")
    assert error.body_bytes() == b'{"detail":"Prompt index \'x\'y\' not found"}'


# --- parse_tts ------------------------------------------------------------------------------------


def test_parse_tts_index_mode() -> None:
    request = parse_tts(MP, multipart(("input_text", "你好"), ("index", "exampleA"), ("seed", " 7 ")),
                        prompts=PROMPTS)
    assert request == TTSRequest(input_text="你好", index="exampleA", seed=7)


def test_parse_tts_upload_mode() -> None:
    request = parse_tts(MP, multipart(("input_text", "hi"), ("prompt_audio", ("v.wav", b"RIFF")),
                                      ("prompt_text", "参考")))
    assert isinstance(request.prompt_audio, UploadedFile)
    assert (request.prompt_audio.filename, request.prompt_audio.data) == ("v.wav", b"RIFF")


def test_parse_tts_urlencoded() -> None:
    body = urlencode({"input_text": "今天 天气+", "index": "exampleA", "use_phoneme": "yes"}).encode()
    assert parse_tts(URLENC, body) == TTSRequest(input_text="今天 天气+", index="exampleA", use_phoneme=True)


def test_parse_tts_file_for_a_text_field() -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_tts(MP, multipart(("input_text", ("t.txt", b"hello")), ("index", "exampleA")))
    assert info.value.errors == [{
        "type": "string_type", "loc": ["body", "input_text"], "msg": "Input should be a valid string",
        "input": {"filename": "t.txt", "size": 5, "headers": {
            "content-disposition": 'form-data; name="input_text"; filename="t.txt"',
            "content-type": "audio/wav"}}}]


def test_parse_tts_stage_order() -> None:
    # Form errors (400) before validation (422) before the handler's checks (400/404).
    bad_form = b"--" + B.encode() + b"\r\nbroken\r\n\r\nx\r\n--" + B.encode() + b"--"
    assert detail_error(lambda: parse_tts(MP, bad_form)) == (400, "Invalid multipart data.")
    assert detail_error(lambda: parse_tts(MP, multipart(("input_text", " "), ("seed", "x"))))[0] == 422
    assert detail_error(lambda: parse_tts(MP, multipart(("input_text", " ")))) == (400, "input_text is required")


# --- prompt forms ---------------------------------------------------------------------------------


def test_parse_prompt_add() -> None:
    body = urlencode({"prompt_text": "文本", "prompt_audio_path": "/a.wav", "index": "new", "x": "y"}).encode()
    assert parse_prompt_add(URLENC, body) == PromptAddForm(index="new", prompt_audio_path="/a.wav",
                                                           prompt_text="文本")
    multi = multipart(("index", "new"), ("prompt_audio_path", "/a.wav"), ("prompt_text", "  "))
    assert parse_prompt_add(MP, multi) == PromptAddForm(index="new", prompt_audio_path="/a.wav", prompt_text="  ")


@pytest.mark.parametrize(
    ("body", "missing_names"),
    [(b"", ["index", "prompt_audio_path", "prompt_text"]),
     (b"prompt_text=x", ["index", "prompt_audio_path"]),
     (b"index=&prompt_audio_path=p&prompt_text=", ["index", "prompt_text"])],
)
def test_parse_prompt_add_missing(body: bytes, missing_names: list[str]) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_prompt_add(URLENC, body)
    assert info.value.errors == [missing(n) for n in missing_names]


def test_parse_prompt_add_other_failures() -> None:
    assert detail_error(lambda: parse_prompt_add(None, b"index=a"))[0] == 422  # no content type: empty form
    assert detail_error(lambda: parse_prompt_add(URLENC, b"index=a&index=b&prompt_audio_path=p&prompt_text=t")) == (
        400, "Duplicate form field 'index'")
    with pytest.raises(ValidationFailed) as info:
        parse_prompt_add(MP, multipart(("index", "a"), ("prompt_audio_path", ("p.wav", b"x")), ("prompt_text", "t")))
    assert info.value.errors[0]["type"] == "string_type"


def test_parse_prompt_update() -> None:
    body = b"index=ignored&index=twice&prompt_audio_path=%2Fb.wav&prompt_text=t"
    assert parse_prompt_update(URLENC, body) == PromptUpdateForm(prompt_audio_path="/b.wav", prompt_text="t")
    with pytest.raises(ValidationFailed) as info:
        parse_prompt_update(URLENC, b"index=x")
    assert info.value.errors == [missing("prompt_audio_path"), missing("prompt_text")]


def test_prompt_config_as_dict() -> None:
    assert PROMPTS["exampleA"].as_dict() == {"prompt_audio_path": "/p/a.wav", "prompt_text": "参考文本"}


# --- properties: parse_tts is total ---------------------------------------------------------------

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
boundaries = st.text(alphabet=BCHARS, min_size=1, max_size=70).filter(lambda b: not b.endswith(" "))
other_content_types = st.sampled_from([None, "", "text/plain", "application/json", "multipart/form-data",
                                       "multipart/mixed; boundary=x", f"{MP}; charset=latin-1",
                                       f"{MP}; charset=utf-16", f"{MP}; charset=ascii"])
prompt_maps = st.sampled_from([None, PROMPTS, {}])


def assert_answer(content_type: str | None, body: bytes, prompts: dict[str, PromptConfig] | None,
                  *, in_hypothesis: bool = True) -> None:
    """A TTSRequest, or an error upstream could answer: 4xx and a JSON body that encodes."""
    try:
        request = parse_tts(content_type, body, prompts=prompts)
    except HTTPDetailError as exc:
        assert 400 <= exc.status < 500
        assert json.loads(exc.body_bytes()) == exc.body()
        if in_hypothesis:
            event(f"answer {exc.status}")
        return
    if in_hypothesis:
        event("answer: a request")
    assert isinstance(request, TTSRequest)
    assert request.input_text.strip()
    request.input_text.encode("utf-8")


@SETTINGS
@given(st.binary(max_size=400), prompt_maps)
def test_arbitrary_multipart_bodies(body: bytes, prompts: dict[str, PromptConfig] | None) -> None:
    assert_answer(MP, body, prompts)


@SETTINGS
@given(boundaries, st.lists(st.one_of(st.binary(max_size=30), st.sampled_from(
    [b"\r\n", b"--", b"\r\n\r\n", b'Content-Disposition: form-data; name="input_text"', b"; filename=a",
     b'name="index"', b"exampleA", b"Content-Type: a/b", b"\x00", b":"])), max_size=16), prompt_maps)
def test_arbitrary_boundaries_and_bodies(boundary: str, chunks: list[bytes],
                                         prompts: dict[str, PromptConfig] | None) -> None:
    delimiter = f"--{boundary}".encode()
    body = delimiter.join(chunks)
    assert_answer(f"multipart/form-data; boundary={quote(boundary)}", body, prompts)


@SETTINGS
@given(st.binary(max_size=300), prompt_maps)
def test_arbitrary_urlencoded_bodies(body: bytes, prompts: dict[str, PromptConfig] | None) -> None:
    assert_answer(URLENC, body, prompts)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([f.name for f in TTS_FIELDS] + ["x", ""]),
                          st.text(alphabet="abc 0123456789+-._%&=yesnoru\u3000", max_size=8)), max_size=8))
def test_arbitrary_urlencoded_forms(pairs: list[tuple[str, str]]) -> None:
    assert_answer(URLENC, urlencode(pairs).encode(), PROMPTS)
    assert_answer(URLENC, "&".join(f"{k}={v}" for k, v in pairs).encode(), None)


@SETTINGS
@given(other_content_types, st.binary(max_size=300))
def test_arbitrary_bodies_other_content_types(content_type: str | None, body: bytes) -> None:
    assert_answer(content_type, body, PROMPTS)


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "input_text": st.one_of(st.text(max_size=20), st.sampled_from(["你好", " ", ""])),
    "index": st.sampled_from(["exampleA", "nope", "", "exampleA "]),
    "prompt_text": st.sampled_from(["参考", " ", ""]),
    "prompt_audio": st.one_of(st.tuples(st.sampled_from(["v.wav", ""]), st.binary(max_size=20)), st.just("x")),
    "seed": st.sampled_from(["42", " -1 ", "1_0", "4.0", "4.5", "x", ""]),
    "sample_rate": st.sampled_from(["24000", "32000", "16000", "24_000", "abc", ""]),
    "use_cache": st.sampled_from(["true", "OFF", "1", "maybe", " yes", ""]),
    "use_phoneme": st.sampled_from(["false", "On", "0", "2", ""]),
    "sample_method": st.sampled_from(["ras", "topk", "greedy", ""]),
    "sampling": st.sampled_from(["1", "100", "0", "101", "x", ""]),
    "beam_size": st.sampled_from(["1", "5", "0", "6", ""]),
    "extra": st.text(max_size=5),
}


@st.composite
def tts_multipart(draw: st.DrawFn) -> bytes:
    """Often a valid request, with some fields replaced by edge values, sometimes a duplicate."""
    fields: dict[str, Any] = {"input_text": "你好", "index": "exampleA"} if draw(st.booleans()) else {}
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True, max_size=6)):
        fields[name] = draw(FIELD_VALUES[name])
    parts = list(fields.items())
    if parts and draw(st.integers(0, 9)) == 0:
        parts.append(draw(st.sampled_from(parts)))
    return multipart(*draw(st.permutations(parts)))


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    body = bytearray(draw(bodies))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(body)))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate"]))
        if op == "flip" and at < len(body):
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del body[at:]
        elif op == "insert":
            body[at:at] = draw(st.sampled_from([b"\r\n", b"--", b"\r", b"\n", b"\x00", b'"', b";", b"\xff",
                                                f"\r\n--{B}".encode(), f"--{B}--".encode()]))
        elif op == "delete":
            del body[at:at + draw(st.integers(1, 8))]
        elif op == "duplicate":
            body[at:at] = body[at:at + draw(st.integers(1, 64))]
    return bytes(body)


@SETTINGS
@given(tts_multipart(), prompt_maps)
def test_generated_tts_forms(body: bytes, prompts: dict[str, PromptConfig] | None) -> None:
    assert_answer(MP, body, prompts)


@SETTINGS
@given(mutated(tts_multipart()), prompt_maps)
def test_mutated_tts_forms(body: bytes, prompts: dict[str, PromptConfig] | None) -> None:
    assert_answer(MP, body, prompts)


@pytest.mark.parametrize(
    ("charset", "field", "value"),
    [("no-such-charset", "input_text", b"hi"), ("punycode", "input_text", b"-z"),
     ("utf-7", "sample_rate", b"+2AA-"), ("utf-7", "input_text", b"+2AA-")],
)
def test_exotic_charsets(charset: str, field: str, value: bytes) -> None:
    body = multipart(("input_text", "hi"), ("index", "exampleA"), (field, value)) if field != "input_text" \
        else multipart((field, value), ("index", "exampleA"))
    assert_answer(f"{MP}; charset={charset}", body, PROMPTS, in_hypothesis=False)
