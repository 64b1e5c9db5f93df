"""What every configuration section shares: the error that lists every problem, the base model,
and the helpers validators use to say where a problem is.

It lives in the lowest layer that has configuration (the backends section) so that the sections
above it (scheduler.config) build on the same base instead of the backend layer reaching up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

__all__ = ["ENV_NAME", "ConfigError", "ConfigSection", "Key", "Problems", "int_to_str", "key_path", "raise_if"]

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

Key = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one `key.path: problem` line each."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(self.problems) == 1:  # one line: what journald and a terminal show whole
            super().__init__(f"invalid configuration in {source}: {self.problems[0]}")
            return
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


class Problems(ValueError):
    """Raised by validators: problems keyed *relative to the value being validated*."""

    def __init__(self, problems: list[tuple[Key, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def raise_if(problems: list[tuple[Key, str]]) -> None:
    if problems:
        raise Problems(problems)


class ConfigSection(BaseModel):
    """Base of every config model: unknown keys are errors and values never change after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def key_path(loc: Key) -> str:
    """`backends.external[0]`, `tenants.list[1].keys`, `env['a.b']`: how a problem names its key."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            path += f".{part}" if path else part
        else:
            path += f"[{part!r}]"
    return path or "(top level)"


def int_to_str(value: object) -> object:
    """A whole number as text (`OMP_NUM_THREADS: 4`, `gpus: [0, 1]`); anything else unchanged."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value
