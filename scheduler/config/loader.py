"""Reading a configuration: YAML in (strictly: no repeated keys, no arbitrary objects), a validated
SidecarConfig out, or one ConfigError whose lines name every problem by its key path."""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from backend.settings.base import ConfigError, Key, Problems, key_path
from scheduler.config.root import SidecarConfig
from scheduler.default_config import default_config_path

__all__ = ["load_config", "parse_config"]


def load_config(path: str | os.PathLike[str] | None = None, *, check_paths: bool = True) -> SidecarConfig:
    """Read, validate and freeze a config file (None: the default). Raises ConfigError.

    Relative paths inside the file (`backends.cwd`) are taken from the file's directory.
    """
    file = default_config_path() if path is None else Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(file), [f"cannot read the file: {exc}"]) from None
    return parse_config(text, str(file), base_dir=file.resolve().parent, check_paths=check_paths)


def parse_config(
    text: str,
    source: str = "<string>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
    check_paths: bool = True,
) -> SidecarConfig:
    """Validate YAML text; `source` names it in errors; relative paths start at `base_dir` (default: cwd)."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(source, [_yaml_problem(source, exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"YAML error: {exc}"]) from None
    if data is None:  # an empty file: all defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"top level must be a mapping of sections, got {_type_name(data)}"])
    context = {"base_dir": Path(base_dir) if base_dir is not None else Path.cwd()}
    try:
        config = SidecarConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, _problem_lines(exc)) from None
    if check_paths:
        config.check_paths(source)
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(source: str, exc: yaml.MarkedYAMLError) -> str:
    mark, context_mark = exc.problem_mark, exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}: " if mark else f"{source}: "
    message = f"{where}YAML syntax error: {exc.problem or exc.context}"
    if exc.context and exc.problem:
        started = ""
        if context_mark:
            started = f" started at line {context_mark.line + 1}, column {context_mark.column + 1}"
        message += f" ({exc.context}{started})"
    return message


def _problem_lines(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, Problems):
            lines.extend(f"{key_path(loc + key)}: {message}" for key, message in cause.problems)
        elif error["type"] == "extra_forbidden":
            lines.append(f"{key_path(loc)}: {_unknown_key_message(loc)}")
        else:
            message = str(cause) if isinstance(cause, ValueError) else _lower_first(error["msg"])
            # Values under `tenants` may be API keys: never echo them.
            if not isinstance(error["input"], dict) and loc[:1] != ("tenants",):
                message += f" (got {_short_repr(error['input'])})"
            lines.append(f"{key_path(loc)}: {message}")
    return lines


def _unknown_key_message(loc: Key) -> str:
    known = _known_keys(loc[:-1])
    if not known:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}known: {', '.join(known)})"


def _known_keys(section: Key) -> list[str]:
    node: object = SidecarConfig
    for part in section:
        if isinstance(part, int):  # an item of a `tuple[Model, ...]` field
            args = typing.get_args(node) if typing.get_origin(node) is tuple else ()
            node = args[0] if args else None
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        else:
            return []
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _lower_first(message: str) -> str:
    return message[:1].lower() + message[1:] if message[1:2].islower() else message


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else type(value).__name__
