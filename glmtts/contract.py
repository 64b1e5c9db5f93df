"""Upstream's request contract: which fields each endpoint takes and how it rejects bad ones.

Two stages, in upstream's order:
1. FastAPI validation (``parse_*``): every declared field, in declaration order, is read from the
   form (an empty string counts as absent), coerced with pydantic's lax rules, and all failures
   come back together as one 422.
2. The handler's own checks (``check_tts``): 400/404 ``{"detail": ...}``, first failure wins.

Both the emulator and the sidecar use this module, so an invalid request gets the same bytes from
either, and the sidecar rejects it without touching a backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import TypeAdapter, ValidationError

from glmtts.errors import HTTPDetailError, ValidationFailed
from glmtts.form import FormData, FormValue, PartValue, UploadedFile, parse_form

SAMPLE_RATES = (24000, 32000)
LONG_TEXT_THRESHOLD = 200  # upstream's TEXT_LENGTH_THRESHOLD: longer texts are "long_text"
SAMPLE_METHODS = ("ras", "topk")
SAMPLING_RANGE = (1, 100)
BEAM_SIZE_RANGE = (1, 5)


class Kind(Enum):
    STR = "str"
    INT = "int"
    BOOL = "bool"
    FILE = "file"


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    required: bool = False
    default: Any = None


# Declaration order of upstream's handlers: FastAPI reports errors in this order.
TTS_FIELDS = (
    Field("input_text", Kind.STR, required=True),
    Field("index", Kind.STR),
    Field("prompt_text", Kind.STR),
    Field("prompt_audio", Kind.FILE),
    Field("seed", Kind.INT, default=42),
    Field("sample_rate", Kind.INT, default=24000),
    Field("use_cache", Kind.BOOL, default=True),
    Field("use_phoneme", Kind.BOOL, default=False),
    Field("sample_method", Kind.STR, default="ras"),
    Field("sampling", Kind.INT, default=25),
    Field("beam_size", Kind.INT, default=1),
)
PROMPT_ADD_FIELDS = (
    Field("index", Kind.STR, required=True),
    Field("prompt_audio_path", Kind.STR, required=True),
    Field("prompt_text", Kind.STR, required=True),
)
PROMPT_UPDATE_FIELDS = PROMPT_ADD_FIELDS[1:]

_ADAPTERS: dict[Kind, TypeAdapter[Any]] = {
    Kind.STR: TypeAdapter(str),
    Kind.INT: TypeAdapter(int),
    Kind.BOOL: TypeAdapter(bool),
}


@dataclass(frozen=True, kw_only=True)
class PromptConfig:
    prompt_audio_path: str
    prompt_text: str

    def as_dict(self) -> dict[str, str]:
        return {"prompt_audio_path": self.prompt_audio_path, "prompt_text": self.prompt_text}


@dataclass(frozen=True, kw_only=True)
class TTSRequest:
    """A TTS request that passed FastAPI's validation (not yet the handler's checks)."""

    input_text: str
    index: str | None = None
    prompt_text: str | None = None
    prompt_audio: UploadedFile | None = None
    seed: int = 42
    sample_rate: int = 24000
    use_cache: bool = True
    use_phoneme: bool = False
    sample_method: str = "ras"
    sampling: int = 25
    beam_size: int = 1

    @property
    def chars(self) -> int:
        """``len(input_text)``: what upstream's length thresholds use."""
        return len(self.input_text)

    @property
    def model_key(self) -> tuple[int, bool]:
        """The loaded-model configuration this request needs (a change reloads the model)."""
        return (self.sample_rate, self.use_phoneme)


@dataclass(frozen=True, kw_only=True)
class PromptAddForm:
    index: str
    prompt_audio_path: str
    prompt_text: str


@dataclass(frozen=True, kw_only=True)
class PromptUpdateForm:
    prompt_audio_path: str
    prompt_text: str


class DuplicateField(HTTPDetailError):
    def __init__(self, name: str) -> None:
        super().__init__(400, f"Duplicate form field '{name}'")


def validate_fields(form: FormData, fields: tuple[Field, ...]) -> dict[str, Any]:
    """FastAPI's form validation: values by name, or ValidationFailed with every field error."""
    for spec in fields:
        if len(form.getlist(spec.name)) > 1:
            raise DuplicateField(spec.name)
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for spec in fields:
        raw = form.get(spec.name)
        if raw is None or raw == "":
            if spec.required:
                errors.append(_error("missing", spec.name, "Field required", None))
            else:
                values[spec.name] = spec.default
            continue
        try:
            values[spec.name] = _coerce(spec, raw)
        except _FieldError as exc:
            errors.append(exc.error)
    if errors:
        raise ValidationFailed(errors)
    return values


def parse_tts_form(form: FormData) -> TTSRequest:
    return TTSRequest(**validate_fields(form, TTS_FIELDS))


def tts_fields(request: TTSRequest, *, input_text: str | None = None) -> list[tuple[str, PartValue]]:
    """The form fields that make ``request`` again, every field spelled out (``parse_tts_form``
    reads them back equal), with ``input_text`` in place of its text when given: what each piece
    of a split request sends, so every piece speaks with the same prompt, seed and sampling."""
    fields: list[tuple[str, PartValue]] = [("input_text", request.input_text if input_text is None else input_text)]
    if request.index is not None:
        fields.append(("index", request.index))
    if request.prompt_text is not None:
        fields.append(("prompt_text", request.prompt_text))
    if request.prompt_audio is not None:
        fields.append(("prompt_audio", request.prompt_audio))
    fields += [("seed", str(request.seed)), ("sample_rate", str(request.sample_rate)),
               ("use_cache", "true" if request.use_cache else "false"),
               ("use_phoneme", "true" if request.use_phoneme else "false"),
               ("sample_method", request.sample_method), ("sampling", str(request.sampling)),
               ("beam_size", str(request.beam_size))]
    return fields


def check_tts(request: TTSRequest, *, prompts: Mapping[str, PromptConfig] | None = None) -> None:
    """The handler's checks, in upstream's order; ``prompts=None`` skips the index lookup.

    The prompt audio file's existence is checked by the backend that owns the file.
    """
    if not request.input_text.strip():
        raise HTTPDetailError(400, "input_text is required")
    if request.sample_rate not in SAMPLE_RATES:
        raise HTTPDetailError(400, "sample_rate must be 24000 or 32000")
    if request.sample_method not in SAMPLE_METHODS:
        raise HTTPDetailError(400, "sample_method must be 'ras' or 'topk'")
    if not SAMPLING_RANGE[0] <= request.sampling <= SAMPLING_RANGE[1]:
        raise HTTPDetailError(400, "sampling must be between 1 and 100")
    if not BEAM_SIZE_RANGE[0] <= request.beam_size <= BEAM_SIZE_RANGE[1]:
        raise HTTPDetailError(400, "beam_size must be between 1 and 5")
    if request.index:
        if prompts is not None and request.index not in prompts:
            raise prompt_not_found(request.index)
    elif request.prompt_audio is not None and request.prompt_text:
        if not request.prompt_text.strip():
            raise HTTPDetailError(400, "prompt_text cannot be empty")
    else:
        raise HTTPDetailError(
            400, "Either 'index' or both 'prompt_audio' and 'prompt_text' must be provided"
        )


def parse_tts(
    content_type: str | None, body: bytes, *, prompts: Mapping[str, PromptConfig] | None = None
) -> TTSRequest:
    """Body bytes to a checked TTSRequest, or the HTTPDetailError upstream would answer."""
    request = parse_tts_form(parse_form(content_type, body))
    check_tts(request, prompts=prompts)
    return request


def parse_prompt_add(content_type: str | None, body: bytes) -> PromptAddForm:
    return PromptAddForm(**validate_fields(parse_form(content_type, body), PROMPT_ADD_FIELDS))


def parse_prompt_update(content_type: str | None, body: bytes) -> PromptUpdateForm:
    return PromptUpdateForm(**validate_fields(parse_form(content_type, body), PROMPT_UPDATE_FIELDS))


def upstream_length_class(chars: int) -> str:
    """Upstream's split of texts for its semaphores and /api/v1/stats/concurrency."""
    return "long_text" if chars > LONG_TEXT_THRESHOLD else "short_text"


def prompt_not_found(index: str) -> HTTPDetailError:
    return HTTPDetailError(404, f"Prompt index '{index}' not found")


class _FieldError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error


def _error(kind: str, name: str, msg: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", name], "msg": msg, "input": value, **extra}


def _coerce(spec: Field, raw: FormValue) -> Any:
    if spec.kind is Kind.FILE:
        if isinstance(raw, UploadedFile):
            return raw
        raise _FieldError(_error("value_error", spec.name,
                                 f"Value error, Expected UploadFile, received: {type(raw)}", raw,
                                 ctx={"error": {}}))
    if isinstance(raw, UploadedFile):
        # FastAPI echoes the UploadFile's attributes as "input"; its internals are not reproducible.
        described = {"filename": raw.filename, "size": raw.size, "headers": dict(raw.headers)}
        raise _FieldError(_error("string_type" if spec.kind is Kind.STR else f"{spec.kind.value}_type",
                                 spec.name, _TYPE_MESSAGES[spec.kind], described))
    try:
        return _ADAPTERS[spec.kind].validate_python(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        extra = {"ctx": first["ctx"]} if "ctx" in first else {}
        raise _FieldError(_error(first["type"], spec.name, first["msg"], raw, **extra)) from None


_TYPE_MESSAGES = {
    Kind.STR: "Input should be a valid string",
    Kind.INT: "Input should be a valid integer",
    Kind.BOOL: "Input should be a valid boolean",
}
