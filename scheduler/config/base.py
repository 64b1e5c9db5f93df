"""What the scheduler's sections share, on top of backend.settings.base: API keys and secrets read
at load (never echoed), ladders of `max_chars` bounds, the label pattern of class and band names."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from pydantic import SecretStr

from backend.settings.base import ENV_NAME, Key, Problems

__all__ = ["LABEL", "MIN_KEY_CHARS", "ladder_problems", "resolve_key", "resolve_secret"]

LABEL = r"^[a-z][a-z0-9_]*$"  # class and band names: metric label values
MIN_KEY_CHARS = 16
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it travels in a header
_ENV_PREFIX = "env:"


def resolve_key(item: object) -> tuple[str, str | None]:
    """(the API key, None) or (whatever, why it is unusable); the message never contains the key."""
    if not isinstance(item, str):
        return "", "must be a string"
    key, source = item, "must"
    if item.startswith(_ENV_PREFIX):
        name = item[len(_ENV_PREFIX):]
        if not ENV_NAME.fullmatch(name):
            return "", f"{name!r} after {_ENV_PREFIX} is not a valid environment variable name"
        if name not in os.environ:
            return "", f"environment variable {name} is not set"
        key, source = os.environ[name], f"environment variable {name} must"
    if len(key) < MIN_KEY_CHARS:
        return key, f"{source} hold at least {MIN_KEY_CHARS} characters"
    if not _KEY_CHARS.fullmatch(key):
        return key, f"{source} hold printable ASCII only, without spaces"
    return key, None


def resolve_secret(value: object) -> SecretStr | None:
    """A field validator's body for a token or secret written inline or as ``env:NAME``: None stays
    None; an unusable one is a problem of the field itself, whose message never contains it."""
    if value is None:
        return None
    key, problem = resolve_key(value)
    if problem is not None:
        raise Problems([((), problem)])
    return SecretStr(key)


def ladder_problems(bounds: Sequence[int | None], item: str) -> list[tuple[Key, str]]:
    """Problems of `max_chars` bounds that must ascend and end with the one null (no upper bound)."""
    if not bounds:
        return [((), f"must list at least one {item}")]
    problems: list[tuple[Key, str]] = []
    last = len(bounds) - 1
    for i, bound in enumerate(bounds):
        if bound is None and i != last:
            problems.append(((i, "max_chars"), f"only the last {item} may have max_chars: null (no upper bound)"))
        elif bound is not None and i == last:
            problems.append(((i, "max_chars"), f"the last {item} must have max_chars: null, so every length has one"))
        if i and bound is not None and (previous := bounds[i - 1]) is not None and bound <= previous:
            problems.append(((i, "max_chars"), f"must be greater than the previous {item}'s max_chars ({previous})"))
    return problems
