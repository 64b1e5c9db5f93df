"""Write the figures of the last reliability run into RELIABILITY.md.

    python -m tests.reliability.report FIGURES.jsonl [--doc RELIABILITY.md] [--command CMD]

Replaces what lies between the ``<!-- figures:start -->`` and ``<!-- figures:end -->`` markers
with one table row per recorded case (the last record of a case wins), in the order recorded. A
figure of None (``lost`` of a case that admits nothing, a status where no answer came) shows as
"–"; a record without ``lost`` shows "not counted".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

START, END = "<!-- figures:start -->", "<!-- figures:end -->"
NONE = "–"


def _cell(value: Any) -> str:
    if value is None:
        text = NONE
    elif isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}" if abs(value) >= 10000 else str(value)
    elif isinstance(value, list | tuple):
        text = ", ".join(_cell(v) for v in value)
    elif isinstance(value, dict):
        text = ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render(records: Sequence[dict[str, Any]], command: str) -> str:
    latest: dict[str, dict[str, Any]] = {}
    for rec in records:
        latest.pop(rec["case"], None)  # keep the order of the last record of each case
        latest[rec["case"]] = rec
    when = max((r["at"] for r in latest.values()), default=0.0)
    stamp = dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if when else "never"
    lines = [START, "", f"Last run: {stamp}, `{command}`, {len(latest)} cases.", "",
             "| case | lost | figures |", "|---|---|---|"]
    for case, rec in latest.items():
        figures = dict(rec["figures"])
        lost = figures.pop("lost", "not counted")
        body = "; ".join(f"{k.replace('_', ' ')} {_cell(v)}" for k, v in figures.items())
        lines.append(f"| {_cell(case)} | {_cell(lost)} | {body} |")
    lines += ["", END]
    return "\n".join(lines)


def update(doc: Path, records: Sequence[dict[str, Any]], command: str) -> None:
    text = doc.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{doc}: the {START} / {END} markers are missing")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    doc.write_text(head + render(records, command) + tail, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", type=Path)
    parser.add_argument("--doc", type=Path, default=Path("RELIABILITY.md"))
    parser.add_argument("--command", default="scripts/reliability")
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in args.figures.read_text(encoding="utf-8").splitlines() if line.strip()]
    update(args.doc, records, args.command)
    sys.stderr.write(f"{args.doc}: {len(records)} records\n")


if __name__ == "__main__":
    main()
