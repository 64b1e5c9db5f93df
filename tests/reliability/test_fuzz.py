"""Fuzzing the request parsing path: raw Content-Type + body bytes to a request or an error answer.

The targets and the invariants every input must satisfy are in tests/reliability/fuzz_targets.py:
no exception but the package's own error answers (4xx with a JSON ``{"detail": ...}`` body), the
same bytes give the same answer, and a bounded amount of CPU per byte. On top of those:

- structure-aware inputs: valid forms mutated (random boundaries and charsets, injected headers,
  truncation, huge and negative numbers, bytes that are not UTF-8) and arbitrary bytes;
- round trips: a generated valid request, encoded either way, parses back to exactly itself;
- linear work: ten times the input costs at most fifteen times the CPU time, on inputs blown up
  to hundreds of KB by repeating a fragment;
- a differential against independent parsers, the stdlib's ``email`` package (multipart) and
  ``urllib.parse.parse_qsl`` (urlencoded);
- atheris, coverage-guided, in a subprocess (tests/reliability/fuzz_atheris.py).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from glmtts.contract import TTSRequest
from glmtts.form import FormError, UploadedFile, encode_multipart, parse_form
from tests.reliability.fuzz_targets import TARGETS, check, join_input, seed_corpus, split_input
from tests.reliability.support import record
from tests.support import ROOT

SCALE_ENV = "GLMTTS_FUZZ_SCALE"  # multiplies every hypothesis case's number of examples (default 1)


def fuzz_settings(examples: int) -> settings:
    # Time is bounded per call in CPU seconds by fuzz_targets.check, which a loaded machine does not
    # skew the way hypothesis's wall-clock deadline would.
    examples = max(1, round(examples * float(os.environ.get(SCALE_ENV) or 1)))
    return settings(max_examples=examples, deadline=None, suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
URLENC = "application/x-www-form-urlencoded"
IN_PROCESS = None  # lost: the parsing code is called in this process; no sidecar admits anything
DOC = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")


@dataclass
class Examples:
    """Examples run by one fuzz case and the worst CPU time one call took."""

    examples: int = 0
    worst_s: float = 0.0
    answers: Counter[int] = field(default_factory=Counter)

    def add(self, target: str, content_type: str | None, body: bytes) -> Any:
        answer, cpu_s = check(target, content_type, body)
        self.examples += 1
        self.worst_s = max(self.worst_s, cpu_s)
        self.answers[answer.status] += 1
        event(f"{target}: {answer.status}")
        return answer

    def record(self, case: str, **more: Any) -> None:
        record(f"fuzzing: {case}", examples=self.examples, exceptions=0,
               max_example_ms=round(self.worst_s * 1000, 2), answers=dict(sorted(self.answers.items())), **more,
               lost=IN_PROCESS)


# --- generators ----------------------------------------------------------------------------------

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
boundaries = st.text(alphabet=BCHARS, min_size=1, max_size=70).filter(lambda b: not b.endswith(" "))
# Charsets whose encoding leaves ASCII (the multipart structure, the field names) as it is.
ASCII_CHARSETS = ("utf-8", "UTF-8", "latin-1", "cp1252", "iso-8859-5", "gb18030", "shift_jis", "euc-kr", "koi8-r")
texts = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60)
BOOL_WORDS = {True: ("true", "TRUE", "1", "yes", "On", "t", "Y"), False: ("false", "False", "0", "no", "OFF", "f", "n")}


def quote_param(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def int_text(draw: st.DrawFn, value: int) -> str:
    """``value`` as upstream's lax int parsing reads it: padding, sign, zeros, a ".0" tail."""
    text = str(value)
    if draw(st.booleans()):
        text = draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " ", "\n"]))
    elif draw(st.booleans()):
        text += "." + "0" * draw(st.integers(1, 3))
    elif value >= 0 and draw(st.booleans()):
        text = "+" + "0" * draw(st.integers(0, 2)) + text
    return text


@dataclass(frozen=True)
class Encoded:
    content_type: str
    body: bytes
    expected: TTSRequest


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[TTSRequest, list[tuple[str, str | tuple[str, bytes]]]]:
    """A valid TTS request and its form fields (texts as sent; a file as (filename, data))."""
    fields: list[tuple[str, str | tuple[str, bytes]]] = []
    values: dict[str, Any] = {}
    text = draw(texts.filter(lambda t: t.strip()))
    fields.append(("input_text", text))
    values["input_text"] = text
    if draw(st.booleans()):
        index = draw(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12))
        fields.append(("index", index))
        values["index"] = index
    else:
        prompt_text = draw(texts.filter(lambda t: t.strip()))
        audio = UploadedFile(filename=draw(st.sampled_from(["v.wav", "声音.wav", "a b.WAV"])),
                             content_type="audio/wav", data=draw(st.binary(max_size=64)))
        fields += [("prompt_text", prompt_text), ("prompt_audio", (audio.filename, audio.data))]
        values.update(prompt_text=prompt_text, prompt_audio=audio)
    for name, strategy in (("seed", st.integers(-(10**40), 10**40)), ("sample_rate", st.sampled_from([24000, 32000])),
                           ("sampling", st.integers(1, 100)), ("beam_size", st.integers(1, 5))):
        if draw(st.booleans()):
            values[name] = draw(strategy)
            fields.append((name, draw(int_text(values[name]))))
    for name in ("use_cache", "use_phoneme"):
        if draw(st.booleans()):
            values[name] = draw(st.booleans())
            fields.append((name, draw(st.sampled_from(BOOL_WORDS[values[name]]))))
    if draw(st.booleans()):
        values["sample_method"] = draw(st.sampled_from(["ras", "topk"]))
        fields.append(("sample_method", values["sample_method"]))
    fields += draw(st.lists(st.tuples(st.sampled_from(["extra", "x-y", "名前"]), st.text(max_size=8)), max_size=2))
    return TTSRequest(**values), draw(st.permutations(fields))


def clean_split(value: bytes, boundary: str) -> bool:
    """True when ``value`` holds no delimiter of ``boundary`` (then it is one part's data)."""
    separator = f"\r\n--{boundary}".encode()
    return (value + separator).find(separator) == len(value)


@st.composite
def encoded_requests(draw: st.DrawFn) -> Encoded:
    """A valid request encoded as multipart (random boundary and charset) or urlencoded."""
    expected, fields = draw(valid_requests())
    has_file = any(isinstance(v, tuple) for _, v in fields)
    if has_file or draw(st.booleans()):
        boundary = draw(boundaries)
        charset = draw(st.sampled_from(ASCII_CHARSETS))
        for name, value in fields:
            data = value[1] if isinstance(value, tuple) else value.encode(charset, "strict") if _encodes(
                value, charset) else None
            assume(data is not None and clean_split(data, boundary))
            assume(_encodes(name, charset) and _encodes(value[0] if isinstance(value, tuple) else "", charset))
        param = "" if charset == "utf-8" and draw(st.booleans()) else f"; charset={charset}"
        content_type = f"multipart/form-data; boundary={quote_param(boundary)}{param}"
        return Encoded(content_type, encode_multipart(fields, boundary=boundary, charset=charset), expected)
    via = draw(st.sampled_from([quote_plus, quote]))
    pairs = [(n, v) for n, v in fields if isinstance(v, str)]
    body = urlencode(pairs, quote_via=via).encode() if draw(st.booleans()) else "&".join(
        f"{quote_plus(n)}={quote_plus(v, safe=draw(st.sampled_from(['', '/', '中'])))}" for n, v in pairs).encode()
    return Encoded(draw(st.sampled_from([URLENC, "Application/X-WWW-Form-URLEncoded; charset=utf-8"])), body, expected)


def _encodes(text: str, charset: str) -> bool:
    """``text`` survives a trip through ``charset`` (shift_jis, for one, turns "¥" into "\\")."""
    try:
        return text.encode(charset).decode(charset) == text
    except UnicodeError:
        return False


# Snippets that break a form in the ways a client (or an attacker) might.
INJECTIONS = (
    b"\r\n", b"\n", b"\r", b"\x00", b"--", b'"', b";", b"\\", b"=", b"&", b"%", b"%FF", b"%C3", b"+",
    b"\r\nContent-Disposition: form-data; name=\"input_text\"\r\n\r\ninjected",
    b"\r\nX-Injected: 1", b"\r\nContent-Type: text/plain; charset=utf-16", b"\r\nContent-Transfer-Encoding: base64",
    b"; filename=\"x.wav\"", b"; name=\"index\"", b"; name*=UTF-8''%E4%BD%A0", b"\r\n\r\n", b"\xff\xfe", b"\xc0\xaf",
    b"\xed\xa0\x80", b"\xe4\xbd", b"X-Long: " + b"h" * 20000, b"a" * 5000, b" " * 3000, b"\t=\t" * 200,
    b"input_text=x&input_text=y", b"&sample_rate=99999999999999999999999", b"&seed=-" + b"9" * 5000,
    b"&seed=1e309", b"&sampling=-1", b"&beam_size=%2B5", b"&use_cache=maybe", b"&seed=\xd9\xa3",
)
NUMBERS = (b"-1", b"0", b"-0", b"9" * 5000, b"-" + b"9" * 30, b"1e309", b"NaN", b"inf", b"1_000", b"+-1", b" ",
           b"4.5", b"\xd9\xa3", b"\xef\xbc\x91", b"18446744073709551616", b"-9223372036854775809")


@st.composite
def mutated_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid form with some of its bytes, numbers, boundary or charset changed."""
    encoded = draw(encoded_requests())
    body = bytearray(encoded.body)
    content_type = encoded.content_type
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate", "number", "content_type"]))
        at = draw(st.integers(0, len(body)))
        if op == "flip" and at < len(body):
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del body[at:]
        elif op == "insert":
            body[at:at] = draw(st.sampled_from(INJECTIONS))
        elif op == "delete":
            del body[at:at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            body[at:at] = body[at:at + draw(st.integers(1, 200))]
        elif op == "number":
            digits = list(re.finditer(rb"[+-]?\d+", bytes(body)))
            if digits:
                match = draw(st.sampled_from(digits))
                body[match.start():match.end()] = draw(st.sampled_from(NUMBERS))
        else:
            content_type = draw(st.one_of(
                st.just(re.sub(r"boundary=(\"[^\"]*\"|[^;]*)", lambda m: "boundary=" + draw(st.one_of(
                    boundaries.map(quote_param), st.text(max_size=80))), content_type)),
                st.just(content_type + "; charset=" + draw(st.one_of(
                    st.sampled_from(["utf-16", "utf-32", "utf-7", "base64", "rot13", "idna", "punycode", "zlib",
                                     "latin-1", "ascii", "x-unknown", ""]), st.text(max_size=12)))),
                st.just(content_type.upper()),
                st.just(content_type + "; boundary=other"),
                st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")),
            ))
    return content_type, bytes(body)


content_types = st.one_of(
    st.none(),
    st.sampled_from(["multipart/form-data; boundary=b", URLENC, "multipart/form-data", "text/plain",
                     "multipart/form-data; boundary=b; charset=utf-16"]),
    boundaries.map(lambda b: f"multipart/form-data; boundary={quote_param(b)}"),
    st.binary(max_size=120).map(lambda b: b.decode("utf-8", "surrogateescape")),
)


def arbitrary_body(boundary_hint: str = "b") -> st.SearchStrategy[bytes]:
    pieces = st.sampled_from([f"--{boundary_hint}".encode(), b"\r\n", b"\r\n\r\n", b"--",
                              b'Content-Disposition: form-data; name="input_text"', b'name="index"',
                              b"; filename=a", b"=", b"&"])
    return st.one_of(st.binary(max_size=2000), st.lists(st.one_of(pieces, st.binary(max_size=40)), max_size=40)
                     .map(b"".join))


# --- hypothesis: invariants --------------------------------------------------------------------


def test_fuzz_arbitrary_bytes() -> None:
    examples = Examples()

    @fuzz_settings(1000)
    @given(st.sampled_from(sorted(TARGETS)), content_types, arbitrary_body())
    def run(target: str, content_type: str | None, body: bytes) -> None:
        examples.add(target, content_type, body)

    run()
    examples.record("arbitrary bytes (hypothesis)")


def test_fuzz_mutated_forms() -> None:
    examples = Examples()

    @fuzz_settings(400)  # GLMTTS_FUZZ_SCALE multiplies it for a deeper run
    @given(st.sampled_from(sorted(TARGETS)), mutated_inputs())
    def run(target: str, case: tuple[str, bytes]) -> None:
        examples.add(target, *case)

    run()
    assert examples.answers[200] and examples.answers[400] and examples.answers[422], examples.answers
    examples.record("mutated valid forms (hypothesis)")


def test_fuzz_round_trip() -> None:
    """What a valid request encodes to parses back to exactly that request, either encoding."""
    examples = Examples()

    @fuzz_settings(400)
    @given(encoded_requests())
    def run(encoded: Encoded) -> None:
        answer = examples.add("tts", encoded.content_type, encoded.body)
        assert answer.status == 200, (answer, encoded)
        request, _ = answer.value
        if request.prompt_audio is not None:  # the headers it came with are the encoder's business
            request = replace(request, prompt_audio=replace(request.prompt_audio, headers=()))
        assert request == encoded.expected

    run()
    examples.record("round trip of valid requests (hypothesis)")


SMALL_BYTES = 20 * 1024  # the smaller input of each pair; the larger repeats its fragment GROWTH times as often
GROWTH = 10  # 20 KB and 200 KB: both parsed on the event loop (INLINE_PARSE_BYTES), both within a core's cache
MAX_COST_GROWTH = 15  # linear work, with room for cache effects; a quadratic corner costs ~GROWTH**2
TIMINGS = 7  # each input's CPU time is the least of this many runs


def least_cpu_s(target: str, *bodies: bytes, content_type: str | None) -> list[float]:
    """The least CPU time of TIMINGS runs of ``target`` on each body, the runs of the bodies taking
    turns and the collector off while each runs: the parser's own work, without the collector's or
    the machine's pauses, and each body timed under the same conditions."""
    call = TARGETS[target]
    least = [float("inf")] * len(bodies)
    collecting = gc.isenabled()
    try:
        for _ in range(TIMINGS):
            for i, body in enumerate(bodies):
                gc.disable()
                started = time.process_time()
                call(content_type, body)
                least[i] = min(least[i], time.process_time() - started)
                if collecting:
                    gc.enable()
    finally:
        if collecting:
            gc.enable()
    return least


def test_fuzz_work_is_linear() -> None:
    """A fragment of a mutated form repeated to ~25 KB, then ten times as often (~250 KB): the
    larger input costs at most fifteen times the CPU time of the smaller. A cost that grows with the
    square of the input (a rescan per part, a copy per chunk) would cost about a hundred times."""
    examples = Examples()
    growths: list[float] = []

    @fuzz_settings(25)
    @given(st.sampled_from(sorted(TARGETS)), mutated_inputs(), st.data())
    def run(target: str, case: tuple[str, bytes], data: st.DataObject) -> None:
        content_type, body = case
        start = data.draw(st.integers(0, len(body)))
        fragment = body[start:start + data.draw(st.integers(1, 300))] or b"\r\n"
        cut = data.draw(st.integers(0, start))
        repeats = max(1, SMALL_BYTES // len(fragment))
        small = body[:cut] + fragment * repeats + body[cut:]
        big = body[:cut] + fragment * (GROWTH * repeats) + body[cut:]
        examples.add(target, content_type, big)  # the invariants every input must keep
        small_s, big_s = least_cpu_s(target, small, big, content_type=content_type)
        growth = big_s / small_s
        growths.append(growth)
        event(f"cost growth x{min(round(growth), MAX_COST_GROWTH + 1)}")
        assert big_s <= MAX_COST_GROWTH * small_s, (
            f"{target}: {len(small)} bytes took {small_s * 1e3:.3f} ms of CPU, {len(big)} bytes "
            f"{big_s * 1e3:.3f} ms (x{growth:.1f}; bound x{MAX_COST_GROWTH}): {fragment[:80]!r} repeated")

    run()
    ordered = sorted(growths)
    examples.record(f"linear work, {SMALL_BYTES // 1024} KB vs {GROWTH * SMALL_BYTES // 1024} KB inputs (hypothesis)",
                    cost_growth_median=round(ordered[len(ordered) // 2], 2), cost_growth_max=round(ordered[-1], 2),
                    bound=MAX_COST_GROWTH)


# --- differential: the stdlib email parser and parse_qsl ------------------------------------------

# Names and filenames both parsers read alike: no quoting or RFC 2231 characters, no controls.
plain_names = st.text(st.characters(exclude_categories=("Cs", "Cc"), exclude_characters='\\"%*\x7f'),
                      min_size=1, max_size=12)


def email_items(content_type: str, body: bytes) -> tuple[list[tuple[str, Any]], list[str]]:
    """The parts of a multipart body as the stdlib email package reads them, and its defects."""
    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n"
                                                         + body)
    items: list[tuple[str, Any]] = []
    defects = [type(d).__name__ for d in message.defects]
    if not message.is_multipart():
        return items, [*defects, "NotMultipart"]
    for part in message.iter_parts():
        assert isinstance(part, Message)
        defects += [type(d).__name__ for d in part.defects]
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        filename = part.get_filename()
        if filename is None:
            items.append((str(name), data.decode("utf-8", "surrogateescape")))
        elif filename:
            # The raw header, not the email package's normalised rendering of it.
            raw = [str(v) for k, v in part.raw_items() if k.lower() == "content-type"]
            items.append((str(name), ("file", filename, raw[-1].strip() if raw else None, data)))
    return items, defects


def our_items(content_type: str, body: bytes) -> list[tuple[str, Any]]:
    return [(n, v if isinstance(v, str) else ("file", v.filename, v.content_type, v.data))
            for n, v in parse_form(content_type, body).items]


@st.composite
def plain_multipart(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(boundaries)
    fields: list[tuple[str, str | tuple[str, bytes]]] = []
    for name in draw(st.lists(plain_names, min_size=1, max_size=6)):  # the email package needs a part
        if draw(st.booleans()):
            data = draw(st.binary(max_size=60))
            # The email package strips a filename's blanks (Message.get_filename).
            fields.append((name, (draw(plain_names.filter(lambda f: f == f.strip())), data)))
        else:
            data = draw(st.text(max_size=60)).encode()
            fields.append((name, data.decode()))
        # The email package splits lines on CR or LF alone too, so no delimiter-like line at all.
        assume(f"--{boundary}".encode() not in data and not data.endswith(b"\r"))
    return f"multipart/form-data; boundary={quote_param(boundary)}", encode_multipart(fields, boundary=boundary)


def test_differential_multipart_well_formed() -> None:
    count = 0

    @fuzz_settings(300)
    @given(plain_multipart())
    def run(case: tuple[str, bytes]) -> None:
        nonlocal count
        content_type, body = case
        theirs, defects = email_items(content_type, body)
        assert not defects, defects
        assert our_items(content_type, body) == theirs
        count += 1

    run()
    record("fuzzing: differential multipart vs email (well-formed)", examples=count, exceptions=0, disagreements=0,
           lost=IN_PROCESS)


def test_differential_urlencoded_well_formed() -> None:
    count = 0

    @fuzz_settings(300)
    @given(st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=8),
           st.sampled_from([quote_plus, quote]))
    def run(pairs: list[tuple[str, str]], via: Callable[..., str]) -> None:
        nonlocal count
        body = urlencode(pairs, quote_via=via).encode()
        theirs = parse_qsl(body.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict")
        assert list(parse_form(URLENC, body).items) == theirs == pairs
        count += 1

    run()
    record("fuzzing: differential urlencoded vs parse_qsl (well-formed)", examples=count, exceptions=0,
           disagreements=0, lost=IN_PROCESS)


# A malformed body the email package reads differently from us is explained by one of these, or the
# test fails:
# - "as upstream": python-multipart, read as Starlette does, gives exactly our items; the email
#   package differs from both (it splits lines on bare CR or LF, unfolds indented header lines,
#   keeps a preamble, unquotes values followed by junk, lets a header without a colon pass ...);
# - "rejected by upstream too": we answer 400 and python-multipart fails or finds no name;
# - "stricter": we answer 400 where upstream guesses; each such answer is listed in docs/contract.md
#   ("Stricter than upstream").
UNTERMINATED = "Invalid multipart data: the body ends before the closing boundary."
STRICTER = {UNTERMINATED: "a multipart body cut before its closing",
            "Invalid utf-8 in": "text not valid in its charset"}


class UpstreamRejects(Exception):
    pass


def upstream_items(content_type: str, body: bytes) -> tuple[list[tuple[str, Any]], bool]:
    """The items python-multipart gives Starlette for a multipart body (last header wins, a part
    without a name rejected, an empty filename no file), and whether it reached the closing
    delimiter; UpstreamRejects when it fails."""
    pm = pytest.importorskip("python_multipart")
    from python_multipart.multipart import MultipartState, parse_options_header

    _, options = parse_options_header(content_type)
    parts: list[dict[str, Any]] = []
    field_name, header_value = bytearray(), bytearray()

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1]["headers"][bytes(field_name).lower()] = bytes(header_value)
        field_name.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].extend(data[start:end])

    try:
        parser = pm.MultipartParser(options[b"boundary"], {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_part_data": on_part_data})
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart's own errors are all it raises on bad input
        raise UpstreamRejects(repr(exc)) from None
    items: list[tuple[str, Any]] = []
    for part in parts:
        _, params = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if b"name" not in params:
            raise UpstreamRejects("no name")
        name = params[b"name"].decode("utf-8", "surrogateescape")
        data = bytes(part["data"])
        if b"filename" not in params:
            items.append((name, data.decode("utf-8", "surrogateescape")))
        elif params[b"filename"]:
            content_type_value = part["headers"].get(b"content-type")
            items.append((name, ("file", params[b"filename"].decode("utf-8", "surrogateescape"),
                                 None if content_type_value is None else content_type_value.decode("latin-1"), data)))
    return items, parser.state == MultipartState.END


def classify(content_type: str, body: bytes, error: str | None, ours: list[Any] | None,
             theirs: list[Any]) -> str | None:
    """Which known difference explains a disagreement with the email package (None: they agree)."""
    if error is None and ours == theirs:
        return None
    try:
        upstream, complete = upstream_items(content_type, body)
    except UpstreamRejects:
        return "unexplained" if error is None else "rejected by upstream too"
    if error is None:
        return "as upstream" if complete and ours == upstream else "unexplained"
    if error == UNTERMINATED:
        return "unexplained" if complete else "stricter: cut"
    return next((f"stricter: {error}" for start in STRICTER if error.startswith(start)), "unexplained")


def test_differential_multipart_malformed() -> None:
    """Mutated bodies: every disagreement with the email package is explained (see above), and
    each deliberate difference from upstream is listed in docs/contract.md."""
    found: Counter[str] = Counter()
    count = 0

    @fuzz_settings(600)
    @given(plain_multipart(), st.data())
    def run(case: tuple[str, bytes], data: st.DataObject) -> None:
        nonlocal count
        content_type, body = case
        mutable = bytearray(body)
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(mutable)))
            op = data.draw(st.sampled_from(["truncate", "insert", "delete"]))
            if op == "truncate":
                del mutable[at:]
            elif op == "insert":
                mutable[at:at] = data.draw(st.sampled_from(INJECTIONS[:24]))
            else:
                del mutable[at:at + data.draw(st.integers(1, 8))]
        raw = bytes(mutable)
        try:
            ours: list[Any] | None = our_items(content_type, raw)
            error = None
        except FormError as exc:
            ours, error = None, str(exc.detail)
        theirs, _ = email_items(content_type, raw)
        kind = classify(content_type, raw, error, ours, theirs)
        count += 1
        if kind is not None:
            found[kind.split(":")[0]] += 1
            event(f"difference: {kind}")
        assert kind != "unexplained", (error, ours, theirs)

    run()
    for detail, row in STRICTER.items():
        assert row in DOC, f"docs/contract.md does not list the deliberate difference {detail!r}"
    record("fuzzing: differential multipart vs email (malformed)", examples=count, exceptions=0,
           disagreements=dict(found), unexplained=0, lost=IN_PROCESS)


# --- atheris --------------------------------------------------------------------------------------

ATHERIS_MISSING = importlib.util.find_spec("atheris") is None
ARTIFACTS_ENV = "GLMTTS_FUZZ_ARTIFACTS"  # where a failing input is kept (default: the test's tmp dir)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)


def run_atheris(tmp_path: Path, *, runs: int, seconds: int) -> dict[str, Any]:
    """Fuzz every target under atheris in a subprocess; fail with the saved input on a crash."""
    seeds, corpus, artifacts = tmp_path / "seeds", tmp_path / "corpus", tmp_path / "artifacts"
    worst = tmp_path / "worst_ms"
    for directory in (seeds, corpus, artifacts):
        directory.mkdir()
    for i, seed in enumerate(seed_corpus()):
        (seeds / f"seed-{i}").write_bytes(seed)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.reliability.fuzz_atheris", f"--runs={runs}", f"--max-time={seconds}",
             f"--artifacts={artifacts}", f"--worst={worst}", str(corpus), str(seeds)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
            timeout=seconds + 120, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"atheris ran past {seconds + 120} s: {str(exc.stdout)[-3000:]}")
    output = done.stdout + done.stderr
    stats: dict[str, Any] = {k: int(v) for k, v in _STAT.findall(output)}
    stats["wall_s"] = round(time.monotonic() - started)
    failing = sorted(artifacts.iterdir())
    if done.returncode != 0 or failing:
        keep = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path / "kept")
        keep.mkdir(parents=True, exist_ok=True)
        kept = [shutil.copy(f, keep / f.name) for f in failing]
        shown = "; ".join(f"{f}: {Path(f).read_bytes()[:300]!r}" for f in kept)
        pytest.fail(f"atheris failed (exit {done.returncode}); reproducing inputs: {shown or 'none written'}\n"
                    f"(replay one with tests.reliability.fuzz_targets.check(*split_input(data)))\n{output[-4000:]}")
    assert stats.get("number_of_executed_units", 0) > 0, output[-2000:]
    stats["worst_ms"] = float(worst.read_text()) if worst.exists() else 0.0
    return stats


def _atheris_case(tmp_path: Path, runs: int, seconds: int, label: str) -> None:
    stats = run_atheris(tmp_path, runs=runs, seconds=seconds)
    record(f"fuzzing: request parsing (atheris, {label})", examples=stats["number_of_executed_units"],
           exceptions=0, max_example_ms=stats["worst_ms"],
           new_units=stats.get("new_units_added", 0), wall_s=stats["wall_s"], lost=IN_PROCESS)


# A fuzzer that keeps a core busy for 8 s: in the "serial" xdist group (tests/conftest.py). The
# 15-minute run below (slow) is the deep one.
@pytest.mark.xdist_group("serial")
@pytest.mark.skipif(ATHERIS_MISSING, reason="atheris is not installed (pip install atheris)")
def test_atheris_request_parsing(tmp_path: Path) -> None:
    _atheris_case(tmp_path, runs=80_000, seconds=8, label="8 s")


@pytest.mark.xdist_group("serial")
@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(ATHERIS_MISSING, reason="atheris is not installed (pip install atheris)")
def test_atheris_request_parsing_long(tmp_path: Path) -> None:
    _atheris_case(tmp_path, runs=20_000_000, seconds=900, label="15 min")


def test_atheris_seeds_are_valid_requests() -> None:
    """The corpus the fuzzer starts from is accepted: it starts inside the interesting region."""
    for seed in seed_corpus():
        target, content_type, body = split_input(seed)
        assert TARGETS[target](content_type, body).status == 200, seed[:200]
    assert join_input("tts", 1, b"x")[1:] == b"x"
