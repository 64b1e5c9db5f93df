"""The README's overload figures, written from the report's JSON (never typed in by hand).

    python -m bench.overload_readme [--json bench/reports/overload.json] [--readme README.md]

Replaces what lies between ``<!-- overload:start -->`` and ``<!-- overload:end -->`` in the README
with, per pool and trace (default curve), the goodput of nginx, the seed arm, the sidecar with
priors 2x high and 2x low, and the oracle at each load, and how many of the sidecar's verdicts
were met; then the flat-curve comparison.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

START, END = "<!-- overload:start -->", "<!-- overload:end -->"
SIDECARS = ("sidecar-high", "sidecar-low")


def _goodput(cell: dict[str, Any], arm: str, load: float) -> float | None:
    return next((r["summary"]["goodput"] for r in cell["runs"] if r["arm"] == arm and abs(r["load"] - load) < 1e-9),
                None)


def _oracle(cell: dict[str, Any], load: float) -> float | None:
    values = [g for arm in (f"oracle-slots{n}" for n in range(1, 5)) if (g := _goodput(cell, arm, load)) is not None]
    return max(values) if values else None


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def block(data: dict[str, Any]) -> str:
    """The Markdown between the markers."""
    setup = data["setup"]
    lines = [
        f"Goodput (solo-service seconds answered within the SLO per backend-second) from the last full run "
        f"of `python -m bench.overload` ({len([r for c in data['cells'] for r in c['runs']])} runs, time scale "
        f"{setup['time_scale']:g}, {setup['duration_s']:g} s measured after {setup['preroll_s']:g} s, service noise "
        f"σ {setup['jitter']:g}, SLO = the seed's dynamic timeouts); whole tables, verdicts and misses in "
        "[bench/reports/overload.md](bench/reports/overload.md).",
        "",
        "| pool, trace | load | nginx | seed | sidecar, priors 2× high | sidecar, priors 2× low "
        "| oracle (best fixed slots 1–4) |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in data["cells"]:
        if cell["curve"] != "default":
            continue
        for load in sorted(cell["loads"]):
            oracle = _oracle(cell, load) if load in cell["oracle_loads"] else None
            arms = " | ".join(_num(_goodput(cell, arm, load)) for arm in ("nginx", "seed", *SIDECARS))
            lines.append(f"| {cell['backends']} backends, {cell['trace']} | {load:g}× | {arms} | {_num(oracle)} |")
    met = [v for c in data["cells"] for v in c["verdicts"] if v["met"] is not None]
    lines += ["", f"The sidecar met {sum(1 for v in met if v['met'])} of the {len(met)} verdicts that could be "
              "judged; each target, and each miss by how much, is in the report."]
    for cell in data["cells"]:
        if cell["curve"] == "default":
            continue
        pairs = ", ".join(f"{load:g}×: {_num(_goodput(cell, 'sidecar-high', load))} vs "
                          f"{_num(_goodput(cell, 'slots1', load))}" for load in sorted(cell["loads"]))
        lines.append(f"On a flat in-process curve ({cell['backends']} backends, {cell['trace']}), the sidecar "
                     f"(priors 2× high) against `slots: 1`: {pairs}.")
    return "\n".join(lines)


def update(readme: Path, data: dict[str, Any]) -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme}: no {START} ... {END} block")
    readme.write_text(text[:start + len(START)] + "\n" + block(data) + "\n" + text[end:], encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/reports/overload.json"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    update(args.readme, json.loads(args.json.read_text(encoding="utf-8")))


if __name__ == "__main__":
    main()
