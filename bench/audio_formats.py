"""What each OpenAI `response_format` costs the sidecar: CPU per second of audio, and bytes.

    python -m bench.audio_formats [--smoke] [--out bench/reports]

The sidecar re-encodes the backend's 16-bit mono WAV (24000 or 32000 Hz) with glmtts.audio.encode
for every OpenAI speech request, on its own CPU. This measures that cost per format and input rate on
speech-like audio -- the emulator's synthetic voice (glmtts.emulator.voice.render_speech: harmonic
syllables, pitch declination and gaps), the audio the synthetic engine answers -- as CPU seconds
(`time.process_time`, this process's user + system time, so a busy neighbour does not inflate it)
per second of audio: median and p90 over the repetitions, after one unmeasured warm-up encode. Also
the encoded size per second of audio (deterministic for a given clip). Formats whose encoder is not
installed here (aac without the extra) are listed with the reason.

Writes ``audio_formats.md`` and ``audio_formats.json`` into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from bench.summary import percentile
from glmtts.audio import FORMATS, Pcm, available, decode_wav, encode
from glmtts.emulator.voice import SECONDS_PER_UNIT, render_speech

REPORT = "audio_formats.md"
DATA = "audio_formats.json"
RATES = (24000, 32000)  # what upstream writes
TEXT = "今天天气很好，我们一起去公园散步吧。"  # repeated to the clip's length; only its hash shapes the voice
PACKAGES = ("numpy", "soundfile", "soxr", "av")
COLUMNS = ("format", "input Hz", "CPU ms per audio s (median)", "p90", "× real time (median)",
           "bytes per audio s", "kbit/s")


@dataclass(frozen=True, kw_only=True)
class Setup:
    clip_s: float  # length of the speech clip each encode handles
    repetitions: int  # measured encodes per (format, rate), after one warm-up


FULL = Setup(clip_s=10.0, repetitions=30)
SMOKE = Setup(clip_s=1.0, repetitions=3)


@dataclass(frozen=True, kw_only=True)
class Cell:
    format: str
    rate: int
    audio_s: float
    cpu_s_per_audio_s: list[float]  # one per repetition
    median: float
    p90: float
    bytes: int  # size of one encoded clip

    @property
    def bytes_per_audio_s(self) -> float:
        return self.bytes / self.audio_s


def speech(setup: Setup, rate: int) -> Pcm:
    """The synthetic engine's voice for a clip of `setup.clip_s` seconds at `rate`."""
    units = setup.clip_s / SECONDS_PER_UNIT
    wav = render_speech(text=TEXT, units=units, sample_rate=rate, seed=7, duration_s=setup.clip_s)
    return decode_wav(wav)


def measure(pcm: Pcm, fmt: str, repetitions: int) -> Cell:
    encoded = encode(pcm, fmt)  # warm-up: imports, codec tables, caches
    per_audio_s: list[float] = []
    for _ in range(repetitions):
        started = time.process_time()
        encoded = encode(pcm, fmt)
        per_audio_s.append((time.process_time() - started) / pcm.duration_s)
    median, p90 = percentile(per_audio_s, 50), percentile(per_audio_s, 90)
    assert median is not None and p90 is not None  # repetitions >= 1
    return Cell(format=fmt, rate=pcm.rate, audio_s=pcm.duration_s, cpu_s_per_audio_s=per_audio_s,
                median=median, p90=p90, bytes=len(encoded))


def run(setup: Setup) -> tuple[list[Cell], dict[str, str]]:
    """Every available format at both rates; the unavailable ones with why."""
    missing = {fmt: why for fmt in FORMATS if (why := available(fmt)) is not None}
    cells = [measure(speech(setup, rate), fmt, setup.repetitions)
             for fmt in FORMATS if fmt not in missing for rate in RATES]
    return cells, missing


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    import soundfile  # type: ignore[import-untyped]

    found["libsndfile"] = str(soundfile.__libsndfile_version__)
    return found


def _row(cell: Cell) -> list[str]:
    return [cell.format, str(cell.rate), f"{1000 * cell.median:.2f}", f"{1000 * cell.p90:.2f}",
            f"{1 / cell.median:.0f}" if cell.median > 0 else "∞",
            f"{cell.bytes_per_audio_s:.0f}", f"{8 * cell.bytes_per_audio_s / 1000:.1f}"]


def render(setup: Setup, cells: Sequence[Cell], missing: dict[str, str], *, command: str, wall_s: float,
           cpu: str, libs: dict[str, str]) -> str:
    lines = [
        "# Audio formats: CPU and size per second of audio",
        "",
        f"Reproduce: `{command}` (this run: {wall_s:.1f} s).",
        "",
        f"Machine: {cpu}; Python {libs['python']}; "
        + ", ".join(f"{name} {version}" for name, version in libs.items() if name != "python") + ".",
        "",
        f"Input: the emulator's synthetic voice, a {setup.clip_s:g} s clip, 16-bit mono, at each rate upstream "
        f"writes. Each cell: one warm-up encode, then {setup.repetitions} measured `glmtts.audio.encode` calls; "
        "CPU is `time.process_time` (this process only) divided by the clip's length. *× real time* = audio "
        "seconds one core encodes per CPU second. Opus at 32000 Hz includes resampling to 48000 Hz; pcm at "
        "32000 Hz includes resampling to 24000 Hz (soxr HQ).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(_row(cell)) + " |" for cell in cells),
        "",
    ]
    if missing:
        lines += ["Not measured (encoder not installed here):", "",
                  *(f"- {fmt}: {why}" for fmt, why in missing.items()), ""]
    return "\n".join(lines)


DOCS_BEGIN = "<!-- audio-formats table: written by python -m bench.audio_formats --docs; do not edit -->"
DOCS_END = "<!-- end of audio-formats table -->"


def docs_table(data: dict[str, object]) -> str:
    """The format table docs/openai.md shows, from a report's JSON: median CPU per second of audio
    at each input rate, and the size, as measured by the run that wrote ``data``."""
    cells = data["cells"]
    assert isinstance(cells, list)
    by_format: dict[str, dict[int, dict[str, float]]] = {}
    for cell in cells:
        by_format.setdefault(cell["format"], {})[cell["rate"]] = cell
    rates = sorted({rate for per_rate in by_format.values() for rate in per_rate})
    header = ["format", *(f"CPU ms per audio s, {rate} Hz in" for rate in rates), "kbit/s"]
    rows = []
    for fmt, per_rate in by_format.items():
        cpu = [f"{1000 * per_rate[rate]['median']:.2f}" if rate in per_rate else "–" for rate in rates]
        kbits = sorted(8 * c["bytes_per_audio_s"] / 1000 for c in per_rate.values())
        size = f"{kbits[0]:.0f}" if round(kbits[0]) == round(kbits[-1]) else f"{kbits[0]:.0f}–{kbits[-1]:.0f}"
        rows.append([fmt, *cpu, size])
    unavailable = data.get("unavailable") or {}
    assert isinstance(unavailable, dict)
    lines = [
        DOCS_BEGIN,
        f"Measured by `{data['command']}` on {data['cpu_model']} (median of the run's repetitions; "
        "one core; the full table with p90 is in the report):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        *([""] + [f"Not measured there: {fmt} ({why})." for fmt, why in unavailable.items()] if unavailable else []),
        DOCS_END,
    ]
    return "\n".join(lines)


def write_docs(path: Path, data: dict[str, object]) -> None:
    """Replace the table between the markers in ``path`` (they must be there already)."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no audio-formats table markers to replace")
    path.write_text(text[:start] + docs_table(data) + text[end + len(DOCS_END):], encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a 1 s clip, 3 repetitions: checks the code, not the CPU")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    parser.add_argument("--docs", type=Path, help="also rewrite the format table in this file (docs/openai.md)")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    command = "python -m bench.audio_formats" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    started = time.monotonic()
    cells, missing = run(setup)
    wall_s = time.monotonic() - started
    cpu, libs = cpu_model(), versions()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / REPORT
    report.write_text(render(setup, cells, missing, command=command, wall_s=wall_s, cpu=cpu, libs=libs))
    data = {
        "command": command, "wall_s": wall_s, "setup": asdict(setup), "cpu_model": cpu, "versions": libs,
        "cells": [{**asdict(cell), "bytes_per_audio_s": cell.bytes_per_audio_s} for cell in cells],
        "unavailable": missing,
    }
    (args.out / DATA).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if args.docs is not None:
        write_docs(args.docs, data)
    sys.stdout.write(report.read_text())


if __name__ == "__main__":
    main()
