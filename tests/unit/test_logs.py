"""Log formats: text for people, one JSON object per line for journald/Loki."""

from __future__ import annotations

import json
import logging

from scheduler.logs import JsonFormatter


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("glmtts_sidecar.access", logging.INFO, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_carry_level_logger_and_message() -> None:
    line = json.loads(JsonFormatter().format(record("backend gpu0-0: starting -> ready")))
    assert line["level"] == "INFO" and line["logger"] == "glmtts_sidecar.access"
    assert line["msg"] == "backend gpu0-0: starting -> ready" and line["ts"].endswith("Z")


def test_access_entries_are_merged_as_fields() -> None:
    entry = {"id": "r1", "tenant": "default", "band": "standard", "chars": 5, "status": 200, "outcome": "ok"}
    line = json.loads(JsonFormatter().format(record(json.dumps(entry), access=entry)))
    assert "msg" not in line
    assert {k: line[k] for k in entry} == entry
