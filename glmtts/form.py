"""Decode an HTTP form body the way upstream's stack (Starlette + python-multipart) does.

Upstream reads a form for every endpoint that declares form fields:
- ``multipart/form-data`` and ``application/x-www-form-urlencoded`` are parsed (media type
  matched case-insensitively, parameters ignored except the multipart ``boundary``/``charset``);
- any other or no ``Content-Type`` gives an *empty* form, so the endpoint reports its required
  fields as missing (422), never 415;
- a parse failure is ``400 {"detail": ...}`` with Starlette's wording where it has one.

Where upstream silently accepts something ambiguous we answer 400 instead (see docs/contract.md,
"Stricter than upstream"): duplicate declared fields are checked by the caller, text that is not
valid in its charset, and a multipart body cut off before its closing boundary.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from glmtts.errors import HTTPDetailError

MAX_FIELDS = 1000  # Starlette's default max_fields / max_files
MAX_FILES = 1000
MAX_FIELD_BYTES = 1024 * 1024  # Starlette's max_part_size for non-file parts and urlencoded fields
MAX_PART_HEADER_BYTES = 16 * 1024  # one part's header block (python-multipart 0.0.34 allows 4224 bytes)
MAX_BOUNDARY_LENGTH = 70  # RFC 2046 section 5.1.1

INVALID_MULTIPART = "Invalid multipart data."


class FormError(HTTPDetailError):
    """The body is not a well-formed form (400)."""

    def __init__(self, detail: str) -> None:
        super().__init__(400, detail)


@dataclass(frozen=True, kw_only=True)
class UploadedFile:
    """A multipart part sent with a ``filename``."""

    filename: str
    content_type: str | None
    data: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def size(self) -> int:
        return len(self.data)


FormValue = str | UploadedFile


@dataclass(frozen=True)
class FormData:
    """The ordered (name, value) items of a form; duplicates are kept for the caller to judge."""

    items: tuple[tuple[str, FormValue], ...] = ()
    _by_name: dict[str, list[FormValue]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value in self.items:
            self._by_name.setdefault(name, []).append(value)

    def getlist(self, name: str) -> list[FormValue]:
        return list(self._by_name.get(name, ()))

    def get(self, name: str) -> FormValue | None:
        """The last value under ``name`` (Starlette's choice), or None."""
        values = self._by_name.get(name)
        return values[-1] if values else None

    def names(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self.items)


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """Split a Content-Type into its lower-cased media type and its parameters."""
    if not content_type:
        return "", {}
    head, *segments = _split_params(content_type)
    return head.strip(" \t").lower(), _parse_params(segments)


def parse_form(content_type: str | None, body: bytes) -> FormData:
    """Parse a request body into FormData, or raise FormError (400)."""
    kind, params = media_type(content_type)
    if kind == "multipart/form-data":
        boundary = params.get("boundary")
        if boundary is None:
            raise FormError("Missing boundary in multipart.")
        return _parse_multipart(body, boundary, params.get("charset", "utf-8"))
    if kind == "application/x-www-form-urlencoded":
        return _parse_urlencoded(body)
    return FormData()


# --- urlencoded -----------------------------------------------------------------------------


def _parse_urlencoded(body: bytes) -> FormData:
    items: list[tuple[str, FormValue]] = []
    for chunk in body.split(b"&"):
        if not chunk:
            continue
        if len(items) >= MAX_FIELDS:
            raise FormError(f"Too many fields. Maximum number of fields is {MAX_FIELDS}.")
        raw_name, _, raw_value = chunk.partition(b"=")
        if len(raw_value) > MAX_FIELD_BYTES:
            raise FormError(f"Field exceeded maximum size of {MAX_FIELD_BYTES // 1024}KB.")
        name = _percent_decode(raw_name, what="field name")
        items.append((name, _percent_decode(raw_value, what=f"form field '{name}'")))
    return FormData(tuple(items))


def _percent_decode(raw: bytes, *, what: str) -> str:
    try:
        return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(f"Invalid UTF-8 in {what}.") from None


# --- multipart ------------------------------------------------------------------------------

# A ";" separates parameters unless it is inside double quotes (a quote after a backslash does not
# count), as in python-multipart's _parseparam (vendored from the email package).
_PARAM_SPLIT = re.compile(r'\\"|"|;')
# Codecs that decode bytes to text but can yield lone surrogates or are not charsets at all.
_NOT_CHARSETS = frozenset({"utf-7", "unicode-escape", "raw-unicode-escape", "punycode", "idna"})


def _split_params(text: str) -> list[str]:
    """A header value's ";"-separated segments, quote-aware (in linear time, unlike _parseparam)."""
    segments: list[str] = []
    start, quoted = 0, False
    for match in _PARAM_SPLIT.finditer(text):
        token = match.group()
        if token == '"':
            quoted = not quoted
        elif token == ";" and not quoted:
            segments.append(text[start:match.start()])
            start = match.end()
    segments.append(text[start:])
    return segments


def _parse_params(segments: list[str]) -> dict[str, str]:
    """Parameters as python-multipart's parse_options_header reads them: "key=value" (key folded to
    lower case, both sides stripped of blanks), or a bare "key" with an empty value; RFC 2231 ``key*`` forms
    are ignored (RFC 7578 forbids them); a repeated key: the last wins."""
    params: dict[str, str] = {}
    for segment in segments:
        key, equals, value = segment.partition("=")
        key, value = (key.strip(" \t").lower(), value.strip(" \t")) if equals else (segment.strip(" \t"), "")
        if "*" in key:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace("\\\\", "\\").replace('\\"', '"')
        if key == "filename" and (value[1:3] == ":\\" or value[:2] == "\\\\"):
            value = value.rsplit("\\", 1)[-1]  # a full Windows path, as old browsers sent
        params[key] = value
    return params


def _check_charset(charset: str) -> None:
    try:
        info = codecs.lookup(charset)
    except (LookupError, ValueError, UnicodeError):
        raise FormError(f"Unknown charset {charset!r} in Content-Type.") from None
    if not getattr(info, "_is_text_encoding", True) or info.name.replace("_", "-") in _NOT_CHARSETS:
        raise FormError(f"Unknown charset {charset!r} in Content-Type.")


def _parse_multipart(body: bytes, boundary_text: str, charset: str) -> FormData:
    if not boundary_text or len(boundary_text) > MAX_BOUNDARY_LENGTH:
        raise FormError(f"Invalid multipart boundary: must be 1 to {MAX_BOUNDARY_LENGTH} characters.")
    _check_charset(charset)
    delimiter = b"--" + boundary_text.encode("latin-1", "replace")
    # python-multipart (0.0.34) rejects text before the first delimiter, unless the body starts with
    # CR or LF: then it skips everything up to the first "-".
    pos = 0
    if body[:1] in (b"\r", b"\n"):
        pos = body.find(b"-")
        if pos < 0:
            return FormData()
    if not body.startswith(delimiter, pos):
        if not body[pos:]:
            return FormData()
        # A body that stops inside the first delimiter was cut, not malformed.
        raise FormError(_UNTERMINATED if delimiter.startswith(body[pos:]) else INVALID_MULTIPART)
    pos += len(delimiter)
    separator = b"\r\n" + delimiter
    items: list[tuple[str, FormValue]] = []
    files = fields = 0
    while True:
        if body.startswith(b"--", pos):
            return FormData(tuple(items))  # closing delimiter; the epilogue is ignored
        while body[pos : pos + 1] in (b" ", b"\t"):
            pos += 1  # RFC 2046 transport padding
        if not body.startswith(b"\r\n", pos):
            # "-" or CR alone at the very end: cut inside the closing "--" or the CRLF.
            raise FormError(_UNTERMINATED if body[pos:] in (b"", b"-", b"\r") else INVALID_MULTIPART)
        # A part may have no header line at all (then upstream reports its missing name).
        headers_end = pos if body.startswith(b"\r\n", pos + 2) else body.find(b"\r\n\r\n", pos + 2)
        if headers_end < 0 or headers_end - pos > MAX_PART_HEADER_BYTES:
            if headers_end < 0 and len(body) - pos <= MAX_PART_HEADER_BYTES:
                raise FormError(_UNTERMINATED)
            raise FormError(f"Part headers exceed {MAX_PART_HEADER_BYTES // 1024}KB.")
        headers = _part_headers(body[pos + 2 : headers_end]) if headers_end > pos else []
        data_start = headers_end + 4
        data_end = _find_delimiter(body, separator, data_start)
        if data_end < 0:
            raise FormError(_UNTERMINATED)
        name, filename = _disposition(headers, charset)
        data = body[data_start:data_end]
        pos = data_end + len(separator)
        if filename is None:
            fields += 1
            if fields > MAX_FIELDS:
                raise FormError(f"Too many fields. Maximum number of fields is {MAX_FIELDS}.")
            if len(data) > MAX_FIELD_BYTES:
                raise FormError(f"Part exceeded maximum size of {MAX_FIELD_BYTES // 1024}KB.")
            items.append((name, _decode(data, charset, f"form field '{name}'")))
            continue
        files += 1
        if files > MAX_FILES:
            raise FormError(f"Too many files. Maximum number of files is {MAX_FILES}.")
        if filename == "":
            continue  # what a browser sends for an empty file input; upstream sees no file
        content_type = next((v for k, v in reversed(headers) if k == "content-type"), None)
        items.append((name, UploadedFile(filename=filename, content_type=content_type, data=data,
                                         headers=tuple(headers))))


def _find_delimiter(body: bytes, separator: bytes, start: int) -> int:
    """The next CRLF--boundary that really is a delimiter: followed by "--", padding or CRLF, or
    by the end of the body (cut there).

    Anything else after it (a CR without LF too) is part data, as python-multipart reads it.
    """
    while True:
        found = body.find(separator, start)
        if found < 0:
            return -1
        after = found + len(separator)
        rest = body[after : after + 2]
        if rest in (b"--", b"\r\n", b"", b"-", b"\r") or rest.startswith((b" ", b"\t")):
            return found
        start = found + 1


_UNTERMINATED = "Invalid multipart data: the body ends before the closing boundary."


# A part header's name is an RFC 7230 token, as python-multipart insists; its value runs to the CR.
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _part_headers(block: bytes) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name) or b"\r" in value:
            raise FormError(INVALID_MULTIPART)
        # Leading spaces are skipped, nothing else: a trailing LF stays, so 'name="a"\n' is not quoted.
        headers.append((name.decode("ascii").lower(), value.lstrip(b" ").decode("latin-1")))
    return headers


def _disposition(headers: list[tuple[str, str]], charset: str) -> tuple[str, str | None]:
    # A repeated header: the last one wins, as in python-multipart.
    raw = next((v for k, v in reversed(headers) if k == "content-disposition"), "")
    params = _parse_params(_split_params(raw)[1:])
    if "name" not in params:
        raise FormError('The Content-Disposition header field "name" must be provided.')
    # Header bytes were read as latin-1; names and filenames may be UTF-8 (RFC 7578 section 5.1).
    name = _decode(params["name"].encode("latin-1", "replace"), charset, "a form field name")
    filename = params.get("filename")
    if filename is not None:
        filename = _decode(filename.encode("latin-1", "replace"), charset, f"the filename of '{name}'")
    return name, filename


def _decode(data: bytes, charset: str, what: str) -> str:
    try:
        text = data.decode(charset)
        text.encode("utf-8")  # no lone surrogates: the value must be text we can echo back
    except UnicodeError:
        raise FormError(f"Invalid {charset} in {what}.") from None
    return text


# --- encoding --------------------------------------------------------------------------------

# What a multipart part may carry: text (encoded in the form's charset), bytes as they are, or a
# file: an UploadedFile, or (filename, data) for the API's one kind of upload, a WAV.
PartValue = str | bytes | UploadedFile | tuple[str, bytes]
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def multipart_content_type(boundary: str, charset: str | None = None) -> str:
    """The Content-Type of a body from `encode_multipart` (the boundary quoted when it must be)."""
    shown = boundary if _TOKEN.fullmatch(boundary) else _quote(boundary)
    return f"multipart/form-data; boundary={shown}" + (f"; charset={charset}" if charset else "")


def encode_multipart(fields: Iterable[tuple[str, PartValue]], *, boundary: str, charset: str = "utf-8") -> bytes:
    """A multipart/form-data body that `parse_form` and python-multipart read back as `fields`.

    Names and filenames are quoted (backslash and double quote escaped) and encoded in `charset`,
    as are text values. Raises ValueError for what could not be read back: a boundary that is not
    1 to 70 ASCII characters, a name or filename with CR or LF or ending in a backslash (upstream
    reads its escaped backslash and the closing quote as an escaped quote), or a value holding the
    delimiter (choose another boundary).
    """
    if not 0 < len(boundary) <= MAX_BOUNDARY_LENGTH or "\r" in boundary or "\n" in boundary:
        raise ValueError(f"a multipart boundary is 1 to {MAX_BOUNDARY_LENGTH} characters on one line")
    delimiter = b"--" + boundary.encode("ascii")
    out: list[bytes] = []
    for name, value in fields:
        head = f"Content-Disposition: form-data; name={_header_param(name)}"
        if isinstance(value, tuple):
            value = UploadedFile(filename=value[0], content_type="audio/wav", data=value[1])
        if isinstance(value, UploadedFile):
            head += f"; filename={_header_param(value.filename)}"
            if value.content_type is not None:
                head += f"\r\nContent-Type: {_header_param(value.content_type, quoted=False)}"
            data = value.data
        else:
            data = value.encode(charset) if isinstance(value, str) else value
        if b"\r\n" + delimiter in data:
            raise ValueError(f"the value of {name!r} holds the delimiter of boundary {boundary!r}")
        out += [delimiter, b"\r\n", head.encode(charset), b"\r\n\r\n", data, b"\r\n"]
    out += [delimiter, b"--\r\n"]
    return b"".join(out)


def _header_param(text: str, *, quoted: bool = True) -> str:
    if "\r" in text or "\n" in text:
        raise ValueError(f"a multipart header value cannot hold CR or LF: {text!r}")
    if quoted and text.endswith("\\"):
        raise ValueError(f"a quoted multipart parameter cannot end in a backslash: {text!r}")
    return _quote(text) if quoted else text


def _quote(text: str) -> str:
    """An RFC 7230 quoted-string, as python-multipart unquotes it."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
