"""The fuzzing targets: raw Content-Type + body bytes to a validated request or an error answer.

``tts`` is the sidecar's request parsing path (scheduler.http.intake): ``parse_form``, then
``parse_tts_form``, then ``check_tts`` without the prompt lookup, then the text's cost units.
``prompt_add`` and ``prompt_update`` are the emulator's admin forms (glmtts.contract).

A target returns an ``Answer``; anything it raises other than ``HTTPDetailError`` (the package's
documented error answers) is a bug. ``check`` runs a target twice on the same bytes and asserts
what must hold for every input: the same answer both times, an error is a 4xx with a JSON body
``{"detail": ...}``, and an accepted request is well-typed and within upstream's bounds.

tests/reliability/fuzz_atheris.py runs the same targets under atheris (libFuzzer); an input's first
byte picks the target and the Content-Type (``split_input``).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from glmtts.contract import (
    BEAM_SIZE_RANGE,
    SAMPLE_METHODS,
    SAMPLE_RATES,
    SAMPLING_RANGE,
    PromptAddForm,
    PromptUpdateForm,
    TTSRequest,
    check_tts,
    parse_prompt_add,
    parse_prompt_update,
    parse_tts_form,
)
from glmtts.errors import HTTPDetailError
from glmtts.form import UploadedFile, encode_multipart, parse_form
from glmtts.text import units

FUZZ_BOUNDARY = "fuzz-boundary"
# Content-Types an input's first byte picks from; past the end, the Content-Type is read from the
# input itself (up to its first newline), as aiohttp would decode a header: UTF-8, surrogateescape.
CONTENT_TYPES: tuple[str | None, ...] = (
    f"multipart/form-data; boundary={FUZZ_BOUNDARY}",
    "application/x-www-form-urlencoded",
    f"multipart/form-data; boundary={FUZZ_BOUNDARY}; charset=latin-1",
    f"multipart/form-data; boundary={FUZZ_BOUNDARY}; charset=utf-16",
    f'Multipart/Form-Data; boundary="{FUZZ_BOUNDARY}"; charset=shift_jis',
    "multipart/form-data",
    None,
)
# A CPU-time bound on one call, generous for the inputs fuzzing makes (a few KB): parsing is linear,
# a few microseconds per byte at worst.
CPU_BOUND_S = 0.25
CPU_PER_BYTE_S = 2e-6


@dataclass(frozen=True)
class Answer:
    """What the caller would answer: ``status`` 200 and the parsed value, or an error status and body."""

    status: int
    value: Any = None  # the accepted request (a frozen dataclass) and, for tts, its cost units
    body: bytes = b""  # the error answer's JSON body


def _error(exc: HTTPDetailError) -> Answer:
    return Answer(exc.status, body=exc.body_bytes())


def tts(content_type: str | None, body: bytes) -> Answer:
    """scheduler.http.intake up to the job: parse, validate, check, cost units."""
    try:
        request = parse_tts_form(parse_form(content_type, body))
        check_tts(request, prompts=None)
    except HTTPDetailError as exc:
        return _error(exc)
    return Answer(200, (request, units(request.input_text)))


def prompt_add(content_type: str | None, body: bytes) -> Answer:
    try:
        return Answer(200, parse_prompt_add(content_type, body))
    except HTTPDetailError as exc:
        return _error(exc)


def prompt_update(content_type: str | None, body: bytes) -> Answer:
    try:
        return Answer(200, parse_prompt_update(content_type, body))
    except HTTPDetailError as exc:
        return _error(exc)


TARGETS: dict[str, Callable[[str | None, bytes], Answer]] = {
    "tts": tts, "prompt_add": prompt_add, "prompt_update": prompt_update,
}


def _text(value: object) -> None:
    assert isinstance(value, str), value
    value.encode("utf-8")  # no lone surrogates: the value can be echoed and forwarded


def check_answer(answer: Answer) -> None:
    """What every answer must satisfy, accepted or not."""
    if answer.status != 200:
        assert 400 <= answer.status < 500, answer
        payload = json.loads(answer.body.decode("utf-8"))
        assert isinstance(payload, dict) and set(payload) == {"detail"}, payload
        return
    value = answer.value
    if isinstance(value, tuple):
        request, cost = value
        assert isinstance(request, TTSRequest)
        _text(request.input_text)
        assert request.input_text.strip()
        assert request.sample_rate in SAMPLE_RATES and request.sample_method in SAMPLE_METHODS
        assert SAMPLING_RANGE[0] <= request.sampling <= SAMPLING_RANGE[1]
        assert BEAM_SIZE_RANGE[0] <= request.beam_size <= BEAM_SIZE_RANGE[1]
        assert isinstance(request.seed, int) and isinstance(request.use_cache, bool)
        assert isinstance(request.use_phoneme, bool)
        for optional in (request.index, request.prompt_text):
            if optional is not None:
                _text(optional)
        assert request.index or (isinstance(request.prompt_audio, UploadedFile) and request.prompt_text)
        assert isinstance(cost, float) and 0.0 <= cost <= 2 * len(request.input_text)
    else:
        assert isinstance(value, PromptAddForm | PromptUpdateForm), value
        for name in ("index", "prompt_audio_path", "prompt_text"):
            if hasattr(value, name):
                _text(getattr(value, name))


def check(target: str, content_type: str | None, body: bytes) -> tuple[Answer, float]:
    """Run ``target`` twice on the same bytes; assert the invariants; the answer and the most CPU
    seconds one call took.

    The work is deterministic, so the lesser of the two CPU times is asserted under a bound linear
    in the input's size: a pause of the garbage collector or the machine in one call is not the
    parser's work (the collector is off while a call runs, too)."""
    call = TARGETS[target]
    answers, times = [], []
    collecting = gc.isenabled()
    try:
        for _ in range(2):
            gc.disable()
            started = time.process_time()
            answers.append(call(content_type, body))
            times.append(time.process_time() - started)
            if collecting:
                gc.enable()
    finally:
        if collecting:
            gc.enable()
    first, second = answers
    assert first == second, (first, second)
    check_answer(first)
    bound = CPU_BOUND_S + CPU_PER_BYTE_S * (len(body) + len(content_type or ""))
    assert min(times) <= bound, f"{target}: {min(times):.3f} s of CPU for {len(body)} bytes (bound {bound:.3f} s)"
    return first, max(times)


def split_input(data: bytes) -> tuple[str, str | None, bytes]:
    """An atheris input as (target, Content-Type, body): the first byte picks both."""
    if not data:
        return "tts", CONTENT_TYPES[0], b""
    names = list(TARGETS)
    target = names[data[0] % len(names)]
    choice = data[0] // len(names)
    rest = data[1:]
    if choice < len(CONTENT_TYPES):
        return target, CONTENT_TYPES[choice], rest
    head, _, body = rest.partition(b"\n")
    return target, head.decode("utf-8", "surrogateescape"), body


def join_input(target: str, content_type_index: int, body: bytes) -> bytes:
    """The inverse of ``split_input`` for a listed Content-Type: a seed for the corpus."""
    return bytes([content_type_index * len(TARGETS) + list(TARGETS).index(target)]) + body


def seed_corpus() -> list[bytes]:
    """Well-formed inputs for the fuzzer to start from: every target, both form encodings."""
    b = FUZZ_BOUNDARY

    def multipart(fields: Sequence[tuple[str, str | tuple[str, bytes]]]) -> bytes:
        return encode_multipart(fields, boundary=b)

    tts_fields: list[tuple[str, str | tuple[str, bytes]]] = [
        ("input_text", "你好，世界 hello 2024!"), ("index", "exampleA"), ("seed", "-7"), ("sample_rate", "32000"),
        ("use_cache", "off"), ("use_phoneme", "yes"), ("sample_method", "topk"), ("sampling", "100"),
        ("beam_size", "5")]
    upload: list[tuple[str, str | tuple[str, bytes]]] = [
        ("input_text", "hi"), ("prompt_text", "参考"), ("prompt_audio", ("v.wav", b"RIFF\x00\xff"))]
    prompt = [("index", "p1"), ("prompt_audio_path", "/tmp/a.wav"), ("prompt_text", "文本")]
    urlencoded = "&".join(f"{k}={v}" for k, v in tts_fields if isinstance(v, str)).encode()
    return [
        join_input("tts", 0, multipart(tts_fields)),
        join_input("tts", 0, multipart(upload)),
        join_input("tts", 1, urlencoded),
        join_input("tts", 1, b"input_text=%E4%BD%A0%E5%A5%BD&index=exampleA&seed=1_000"),
        join_input("tts", 2, multipart([("input_text", "caf\xe9"), ("index", "a")]).replace(b"\xc3\xa9", b"\xe9")),
        join_input("prompt_add", 0, multipart(prompt)),
        join_input("prompt_update", 1, b"prompt_audio_path=%2Fa.wav&prompt_text=x"),
    ]
