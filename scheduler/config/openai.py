"""The `openai` section: OpenAI's speech API on the sidecar's port, its voices and its models.

A voice names a prompt index (any prompt index the backends know works as a voice too); a model
names settings (a sample rate). Both are read at use, so a reload applies at once. The defaults
map OpenAI's own voice and model names to the packaged prompts, so an unconfigured client works.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator

from backend.settings.base import ConfigSection, Key, raise_if

__all__ = ["DEFAULT_MODELS", "DEFAULT_VOICES", "ModelConfig", "OpenAIConfig", "VoiceConfig"]

SAMPLE_RATES = (24000, 32000)  # what the backend synthesises
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


class VoiceConfig(ConfigSection):
    """A voice: the prompt index it speaks with, and a sample rate (used when neither the request
    nor the model names one; None: 24000)."""

    index: StrictStr = Field(min_length=1, max_length=200)
    sample_rate: StrictInt | None = None

    @field_validator("sample_rate")
    @classmethod
    def _rate(cls, rate: int | None) -> int | None:
        return _check_rate(rate)


class ModelConfig(ConfigSection):
    """A model name clients may send, and the sample rate it asks for: it wins over the voice's, a
    request's own ``sample_rate`` over both (None: the voice's, else 24000)."""

    sample_rate: StrictInt | None = None

    @field_validator("sample_rate")
    @classmethod
    def _rate(cls, rate: int | None) -> int | None:
        return _check_rate(rate)


def _check_rate(rate: int | None) -> int | None:
    if rate is not None and rate not in SAMPLE_RATES:
        raise ValueError(f"must be one of {', '.join(map(str, SAMPLE_RATES))}")
    return rate


def _voices(*pairs: tuple[str, str]) -> dict[str, VoiceConfig]:
    return {name: VoiceConfig(index=index) for name, index in pairs}


# OpenAI's voice names over the two packaged prompts, alternating so both are heard.
DEFAULT_VOICES = _voices(
    ("alloy", "exampleA"), ("ash", "exampleB"), ("ballad", "exampleA"), ("coral", "exampleB"),
    ("echo", "exampleA"), ("fable", "exampleB"), ("onyx", "exampleA"), ("nova", "exampleB"),
    ("sage", "exampleA"), ("shimmer", "exampleB"), ("verse", "exampleA"),
)
DEFAULT_MODELS = {
    "glm-tts": ModelConfig(),
    "tts-1": ModelConfig(sample_rate=24000),
    "tts-1-hd": ModelConfig(sample_rate=32000),
    "gpt-4o-mini-tts": ModelConfig(),
}


class OpenAIConfig(ConfigSection):
    """`enabled`: serve /v1/audio/speech, /v1/audio/voices and /v1/models (added at start)."""

    enabled: StrictBool = True
    # Mappings, as pydantic keeps them (dicts): read them, never change them.
    voices: dict[StrictStr, VoiceConfig] = Field(default_factory=lambda: dict(DEFAULT_VOICES))
    models: dict[StrictStr, ModelConfig] = Field(default_factory=lambda: dict(DEFAULT_MODELS), min_length=1)

    @field_validator("voices", "models")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems: list[tuple[Key, str]] = [
            ((name,), "a name is 1 to 64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit")
            for name in value if not re.fullmatch(_NAME, name)]
        raise_if(problems)
        return value
