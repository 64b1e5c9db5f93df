"""Hostile multipart bodies on POST /api/v1/tts against a real sidecar: each gets the right 4xx
(upstream's wording where upstream refuses it too; docs/contract.md lists where the sidecar is
stricter) in bounded time and memory, and none reaches the backend (a recorder)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.reliability.hostile import MIB, Target, recorded_sidecar, run_case

# One worker runs the whole module, so its module-scoped sidecar starts once.
pytestmark = pytest.mark.xdist_group("test_multipart_abuse")

MAX_BODY = 8 * MIB
BODY_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 2.0
LIMITS = (f"limits: {{max_body_bytes: {MAX_BODY}, body_timeout_s: {BODY_TIMEOUT_S}, "
          f"idle_timeout_s: {IDLE_TIMEOUT_S}}}")
B = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={B}"
END = f"--{B}--\r\n".encode()
GB = 1 << 30


def part(name: str | bytes, value: bytes, headers: bytes = b"") -> bytes:
    quoted = name if isinstance(name, bytes) else name.encode()
    return (f"--{B}\r\n".encode() + b'Content-Disposition: form-data; name="' + quoted + b'"\r\n' + headers
            + b"\r\n" + value + b"\r\n")


def file_part(name: str, filename: bytes, value: bytes) -> bytes:
    return (f'--{B}\r\nContent-Disposition: form-data; name="{name}"; filename="'.encode() + filename
            + b'"\r\nContent-Type: audio/wav\r\n\r\n' + value + b"\r\n")


GOOD = part("input_text", b"hello there") + part("index", b"exampleA")


def post(body: bytes, content_type: str = CONTENT_TYPE, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return (f"POST /api/v1/tts HTTP/1.1\r\nHost: sidecar\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {size}\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with recorded_sidecar(tmp_path_factory.mktemp("multipart"), extra=LIMITS) as (service, recorder):
        yield Target(service, recorder, MAX_BODY)


NESTED = (b"--inner\r\nContent-Disposition: form-data; name=\"input_text\"\r\n\r\nhello\r\n"
          b"--inner\r\nContent-Disposition: form-data; name=\"index\"\r\n\r\nexampleA\r\n--inner--")
LONG = "x" * 71

# case: (request bytes, status, a phrase of the answer's detail)
CASES = {
    "boundary missing from Content-Type": (post(GOOD + END, "multipart/form-data"), 400,
                                           "Missing boundary in multipart."),
    "boundary never present in the body": (post(b"hello world, no delimiter anywhere"), 400,
                                           "Invalid multipart data."),
    "boundary over 70 characters": (post((GOOD + END).replace(B.encode(), LONG.encode()),
                                         f"multipart/form-data; boundary={LONG}"), 400,
                                    "Invalid multipart boundary: must be 1 to 70 characters."),
    "no closing delimiter": (post(GOOD), 400, "the body ends before the closing boundary"),
    "100k empty fields": (post(part("f", b"") * 100_000 + END), 400,
                          "Too many fields. Maximum number of fields is 1000."),
    "10k header lines in one part": (
        post(f"--{B}\r\n".encode() + b"".join(f"X-H{i}: v\r\n".encode() for i in range(10_000))
             + b'Content-Disposition: form-data; name="input_text"\r\n\r\nhi\r\n' + part("index", b"exampleA") + END),
        400, "Part headers exceed 16KB."),
    "non-UTF-8 field name": (post(GOOD + part(b"f\xff", b"x") + END), 400, "Invalid utf-8 in a form field name."),
    "non-UTF-8 filename": (post(GOOD + file_part("prompt_audio", b"a\xff\xfe.wav", b"RIFF") + END), 400,
                           "Invalid utf-8 in the filename of 'prompt_audio'."),
    "CR in a field name": (post(GOOD + part(b"a\rb", b"x") + END), 400, "Invalid multipart data."),
    # Nested multipart is not flattened: its fields stay inside one part, so input_text is missing.
    "nested multipart/mixed inside a part": (
        post(part("payload", NESTED, b"Content-Type: multipart/mixed; boundary=inner\r\n") + END), 422,
        '"loc":["body","input_text"]'),
    "duplicate field": (post(GOOD + part("input_text", b"other text") + END), 400,
                        "Duplicate form field 'input_text'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_multipart_is_refused(target: Target, case: str) -> None:
    data, status, detail = CASES[case]
    run_case(target, f"multipart: {case}", data, status=status, detail=detail, until=1, timeout=15)


# A part header's value runs to its CR, for python-multipart as for us: a bare LF or a NUL inside
# a quoted name is part of that name. An unknown field is ignored, as FastAPI ignores it, and a
# prompt_audio file on /api/v1/tts is not read: upstream serves these, so the sidecar does too.
SERVED = {
    "LF in a field name": GOOD + part(b"a\nb", b"x") + END,
    "NUL in a field name": GOOD + part(b"a\0b", b"x") + END,
    "NUL in a filename": GOOD + file_part("prompt_audio", b"a\0.wav", b"RIFF") + END,
}


@pytest.mark.parametrize("case", list(SERVED))
def test_what_upstream_reads_as_a_valid_form_is_served_once(target: Target, case: str) -> None:
    run_case(target, f"multipart: {case}", post(SERVED[case]), status=200, forwarded=1, until=1, timeout=15)


def test_crlf_in_a_filename_ends_the_header_line_as_upstream_reads_it(target: Target) -> None:
    # CRLF ends a part's header line, for python-multipart as for us: the filename is '"a' and
    # 'X-Injected: 1"' is one more part header. Both read the same form, so it is served.
    body = GOOD + file_part("prompt_audio", b"a\r\nX-Injected: 1", b"RIFF") + END
    run_case(target, "multipart: CR/LF in a filename", post(body), status=200, forwarded=1, until=1, timeout=15)


def test_megabytes_of_crlf_preamble_are_served(target: Target) -> None:
    # python-multipart skips blank lines before the first delimiter; so do we, off the event loop.
    run_case(target, "multipart: 4 MiB of CRLF preamble", post(b"\r\n" * (2 * MIB) + GOOD + END), status=200,
             forwarded=1, until=1, timeout=15)


def _one_gb_field(chunked: bool) -> Iterator[bytes]:
    block = b"a" * (256 * 1024)
    if chunked:
        yield (f"POST /api/v1/tts HTTP/1.1\r\nHost: sidecar\r\nContent-Type: {CONTENT_TYPE}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode()
        frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        yield from itertools.repeat(frame, GB // len(block))
    else:
        yield post(part("input_text", b"")[:-2], length=GB)  # the field's value follows, never ending
        yield from itertools.repeat(block, GB // len(block))


@pytest.mark.parametrize("chunked", [False, True], ids=["Content-Length", "chunked"])
def test_a_one_gigabyte_field_is_refused_long_before_it_is_sent(target: Target, chunked: bool) -> None:
    name = f"multipart: 1 GB field without filename ({'chunked' if chunked else 'Content-Length'})"
    got = run_case(target, name, _one_gb_field(chunked), status=413, detail="larger than the limit of 8388608 bytes",
                   until=1, timeout=60)
    assert got.sent < 8 * MAX_BODY  # the answer came while we were still sending, not after a gigabyte


def _trickle_headers(length: int) -> bytes:
    return (f"POST /api/v1/tts HTTP/1.1\r\nHost: sidecar\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_a_body_at_one_byte_per_second_times_out(target: Target) -> None:
    body = GOOD + END
    pieces = itertools.chain([_trickle_headers(len(body))], (body[i:i + 1] for i in range(len(body))))
    got = run_case(target, "multipart: body at 1 byte/s", pieces, status=408, detail="did not arrive within 2 s",
                   pause_s=1.0, until=1, timeout=15)
    assert got.seconds < BODY_TIMEOUT_S + 5
    assert got.sent - len(_trickle_headers(len(body))) < 10  # bytes of the body sent before the answer


def test_headers_then_a_stall_times_out(target: Target) -> None:
    got = run_case(target, "multipart: headers, then no body", _trickle_headers(1000), status=408,
                   detail="did not arrive within 2 s", until=1, timeout=15)
    assert got.seconds < BODY_TIMEOUT_S + 5


def test_a_stall_inside_the_headers_is_cut_off(target: Target) -> None:
    got = run_case(target, "multipart: request head never finished", b"POST /api/v1/tts HTTP/1.1\r\nHost: s\r\n",
                   status=None, answers=0, closed=True, timeout=15)
    assert got.seconds < IDLE_TIMEOUT_S + 5


def test_a_valid_form_is_still_served(target: Target) -> None:
    run_case(target, "multipart: valid form (control)", post(GOOD + END), status=200, forwarded=1, until=1)
