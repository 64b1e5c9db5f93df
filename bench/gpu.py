"""GPU: k real decoding backends on one GPU, raw and through the sidecar.

    python -m bench.gpu [--ks 1 2 4 8] [--out bench/reports]
    python -m bench.gpu --device cpu --tiny      # the same orchestration on the tiny CPU model (seconds)

For each k the sidecar starts k emulator processes with the torch engine at GLM-TTS's first-stage
size (`--engine torch --torch-preset glmtts`: a 1.36 B-parameter Llama, bf16, CUDA; see
glmtts/emulator/torch_engine.py) on one GPU (`gpus: ["0"]`, `processes_per_gpu: k`, one request
per process), warms each up (model load, the slow first decode), then two closed-loop
measurements on the same processes:

- **raw**: k clients, client i sending to backend i directly (the processes' own ceiling);
- **sidecar**: k clients sending to the sidecar, which spreads them over the k processes.

Reports requests/s, speech tokens/s, latency p50/p99 and the model load time per k, with the
calibration's measured figures beside them. Without torch or a CUDA device it writes a report
that says why it was skipped and exits 0. The whole run is bounded (`--budget`, default 420 s):
a k that would not fit is left out, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from matplotlib.figure import Figure

from bench import procs
from bench.closedloop import Window, measure, tts_form, warm
from bench.loadgen import corpus_text
from glmtts.text import units

REPORT = "gpu.md"
THROUGHPUT_PLOT = "gpu-throughput.png"
LATENCY_PLOT = "gpu-latency.png"
COLUMNS = ("processes", "path", "req/s", "speech tokens/s", "× vs 1 raw", "p50 s", "p99 s", "load + warm-up s")
NO_TORCH = "skipped: torch not installed (pip install -e '.[torch]')"
NO_CUDA = "skipped: no CUDA device (torch.cuda.is_available() is false)"
TOKENS_PER_UNIT = 6.0  # TorchEngineConfig.tokens_per_unit
# The calibration's aggregate tokens/s for k processes on one H200 (measurements/h200-calibration.md;
# cold requests, 250 tokens each).
CALIBRATION_TOKENS_S = {1: "42–47 (warm); 11–17 (cold)", 2: "31", 4: "44", 8: "88–95", 16: "142"}


@dataclass(frozen=True, kw_only=True)
class Setup:
    ks: tuple[int, ...]
    device: str  # "cuda" or "cpu"
    tiny: bool  # the engine's tiny default model instead of GLM-TTS's size
    chars: int  # text of every request
    window_s: float
    ramp_s: float
    budget_s: float  # the whole run, model loads included

    def emulator_args(self) -> list[str]:
        args = ["--engine", "torch", "--log-level", "WARNING"]
        if not self.tiny:
            args += ["--torch-preset", "glmtts"]
        return [*args, "--torch-device", self.device]


# ~17 CJK characters = 17 units = ~100 speech tokens (4 s of audio): ~2.3 s alone on a warm H200 process.
FULL = Setup(ks=(1, 2, 4, 8), device="cuda", tiny=False, chars=17, window_s=15.0, ramp_s=6.0, budget_s=420.0)
DRY_RUN = Setup(ks=(1, 2), device="cpu", tiny=True, chars=17, window_s=2.0, ramp_s=0.5, budget_s=120.0)


@dataclass(frozen=True, kw_only=True)
class Point:
    k: int
    path: str  # "raw" or "sidecar"
    window: Window
    load_s: float  # sidecar start to every backend ready (model load + the sidecar's warm-up decode)


def availability(device: str) -> str | None:
    """Why this machine cannot run the benchmark on `device`, or None."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return NO_TORCH
    if device.startswith("cuda") and not torch.cuda.is_available():
        return NO_CUDA
    return None


def sidecar_yaml(setup: Setup, k: int) -> tuple[str, int]:
    port = procs.free_port()
    command = ["{python}", "-m", "glmtts.emulator", "--port", "{port}", *setup.emulator_args(), "--seed", "{index}"]
    return f"""listen: {{host: 127.0.0.1, port: {port}}}
backends:
  command: {json.dumps(command)}
  env: {{CUDA_VISIBLE_DEVICES: "{{gpu}}"}}
  gpus: ["0"]
  processes_per_gpu: {k}
  slots: 1
  base_port: {procs.free_ports(k)}
  health: {{interval_s: 1.0, timeout_s: 5.0, start_timeout_s: 300.0}}
  warmup: {{text: {json.dumps(corpus_text(0, setup.chars), ensure_ascii=False)}, timeout_s: 300.0}}
  stop_grace_s: 5.0
  # Contention slows every process alike; nothing here is an outlier or stuck.
  outlier: {{latency_ratio: 50.0}}
  watchdog: {{min_s: 600.0, unresponsive_s: 120.0}}
# One warm process on an H200 decodes ~45 tokens/s at batch 1: 6 tokens per unit = ~0.13 s per unit.
cost: {{base_s: 0.1, per_unit_s: 0.13}}
logging: {{level: WARNING}}
""", port


def run_k(setup: Setup, k: int, work: Path) -> tuple[list[Point], list[int]]:
    text, port = sidecar_yaml(setup, k)
    started = time.monotonic()
    sidecar = procs.start_sidecar(text, port, work, env=procs.isolated_env(work / f"runtime-{k}"), timeout=300)
    load_s = time.monotonic() - started
    pids = [sidecar.pid]
    try:
        backends = procs.backend_states(sidecar)
        pids += [int(b["pid"]) for b in backends if b.get("pid")]
        urls = [str(b["url"]) for b in backends]
        form = tts_form(corpus_text(0, setup.chars))
        warm(urls, form)  # a second decode each: the sidecar's warm-up paid the first, slow one
        raw = measure(urls, form, window_s=setup.window_s, ramp_s=setup.ramp_s)
        through = measure([sidecar.url] * k, form, window_s=setup.window_s, ramp_s=setup.ramp_s)
    finally:
        sidecar.stop()
        procs.reap(pids[1:])
    return [Point(k=k, path="raw", window=raw, load_s=load_s),
            Point(k=k, path="sidecar", window=through, load_s=load_s)], pids


@dataclass
class Outcome:
    points: list[Point]
    pids: list[int]  # every process started
    left_out: list[int]  # ks not run, to stay within the budget or after a failure
    failure: str | None  # what went wrong, when something did
    wall_s: float


def run(setup: Setup) -> Outcome:
    """Each k in turn; a k that would overrun the budget is left out, and a failure ends the run
    (what was measured before it is kept)."""
    began = time.monotonic()
    out = Outcome(points=[], pids=[], left_out=[], failure=None, wall_s=0.0)
    per_k_s = 0.0
    with tempfile.TemporaryDirectory(prefix="glmtts-gpu-") as tmp:
        for k in setup.ks:
            elapsed = time.monotonic() - began
            # A k costs at least as much as the one before it (more processes to load, longer decodes).
            if out.failure or (out.points and elapsed + per_k_s * 1.3 > setup.budget_s):
                out.left_out.append(k)
                continue
            k_began = time.monotonic()
            try:
                new, started = run_k(setup, k, Path(tmp))
            except Exception as exc:  # keep what was measured; say what failed
                out.failure = f"k = {k}: {type(exc).__name__}: {str(exc)[-3000:]}"
                sys.stderr.write(f"[gpu] {out.failure}\n")
                continue
            per_k_s = time.monotonic() - k_began
            out.points += new
            out.pids += started
            for p in new:
                sys.stderr.write(f"[gpu] k={k} {p.path}: {p.window.rps:.2f} req/s, "
                                 f"p50 {p.window.latency(50) or 0:.2f} s (load {p.load_s:.0f} s)\n")
    out.wall_s = time.monotonic() - began
    return out


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def tokens_per_request(setup: Setup) -> float:
    return max(1.0, round(TOKENS_PER_UNIT * units(corpus_text(0, setup.chars))))


def table(setup: Setup, points: Sequence[Point]) -> list[str]:
    tokens = tokens_per_request(setup)
    base = next((p.window.rps for p in points if p.k == 1 and p.path == "raw"), None)
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for p in points:
        ratio = p.window.rps / base if base else None
        rows.append("| " + " | ".join([str(p.k), p.path, _f(p.window.rps), _f(p.window.rps * tokens, 1), _f(ratio),
                                       _f(p.window.latency(50)), _f(p.window.latency(99)), _f(p.load_s, 0)]) + " |")
    return rows


def plot(points: Sequence[Point], out: Path, tokens: float) -> None:
    for name, ylabel in ((THROUGHPUT_PLOT, "speech tokens/s (all processes)"),
                         (LATENCY_PLOT, "latency p50 (solid) / p99 (dashed), s")):
        fig = Figure(figsize=(5.5, 4.0))
        ax = fig.subplots()
        for path, marker in (("raw", "o"), ("sidecar", "s")):
            mine = [p for p in points if p.path == path]
            ks = [p.k for p in mine]
            if name == THROUGHPUT_PLOT:
                ax.plot(ks, [p.window.rps * tokens for p in mine], marker=marker, label=path)
            else:
                ax.plot(ks, [p.window.latency_or_nan(50) for p in mine], marker=marker, label=f"{path} p50")
                ax.plot(ks, [p.window.latency_or_nan(99) for p in mine], marker=marker, linestyle="--",
                        label=f"{path} p99")
        ax.set_xlabel("processes on one GPU")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)


def render(setup: Setup, points: Sequence[Point], left_out: Sequence[int], wall_s: float, command: str,
           skipped: str | None, failure: str | None = None) -> str:
    model = ("the engine's tiny default model (a dry run of the orchestration, not a GPU measurement)" if setup.tiny
             else "GLM-TTS's first-stage shape: a 1.36 B-parameter Llama in bf16")
    lines = [
        "# GPU: k real decoding backends on one GPU, raw and through the sidecar",
        "",
        f"Reproduce: `{command}`" + ("" if skipped else f" (this run: {wall_s:.0f} s)") + ".",
        "",
    ]
    if skipped:
        return "\n".join([*lines, skipped, ""])
    tokens = tokens_per_request(setup)
    lines += [
        f"Backends: `python -m glmtts.emulator {' '.join(setup.emulator_args())}` — {model}, on `{setup.device}`, "
        f"started by the sidecar (`gpus: [\"0\"]`, `processes_per_gpu: k`, `slots: 1`). Every request: a "
        f"{setup.chars}-character text, {tokens:.0f} speech tokens sampled top-k with HF `generate` at batch 1, "
        "as upstream runs one request. Each backend is warmed up (the sidecar's warm-up decode and one more); "
        f"then **raw** (k clients, one per process, straight to its port) and **sidecar** (k clients to the "
        f"sidecar) closed loops, counting the requests that finish in a {setup.window_s:g} s window after a "
        f"{setup.ramp_s:g} s ramp. *load + warm-up s*: sidecar start to every backend ready (k models loading at "
        "once, plus each one's first decode). The sidecar's cost prior is one warm H200 process (~0.13 s per text "
        "unit), and its outlier ejection and watchdog are loosened so that contention, which slows every process "
        "alike, never takes a backend out of the measurement.",
        "",
        *table(setup, points),
        "",
    ]
    if failure:
        lines += ["**The run failed** (what was measured before is above):", "", "```", failure, "```", ""]
    if left_out:
        why = "after the failure" if failure else f"to stay within the {setup.budget_s:g} s budget"
        lines += [f"Left out {why}: k = {', '.join(map(str, left_out))}.", ""]
    lines += [
        "The calibration's aggregate tokens/s for k processes on one H200 (250-token, mostly cold requests; "
        "measurements/h200-calibration.md): "
        + "; ".join(f"k = {k}: {v}" for k, v in CALIBRATION_TOKENS_S.items()) + ".",
        "",
        f"![throughput]({THROUGHPUT_PLOT})",
        "",
        f"![latency]({LATENCY_PLOT})",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (with --device cpu: a short dry run)")
    parser.add_argument("--ks", nargs="+", type=int, help="process counts (default 1 2 4 8; dry run 1 2)")
    parser.add_argument("--window", type=float, help="seconds of measurement per k and path")
    parser.add_argument("--budget", type=float, help="seconds for the whole run, model loads included")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = parser.parse_args(argv)
    setup = DRY_RUN if args.device == "cpu" and args.tiny else replace(FULL, device=args.device, tiny=args.tiny)
    if args.ks:
        setup = replace(setup, ks=tuple(args.ks))
    if args.window:
        setup = replace(setup, window_s=args.window)
    if args.budget:
        setup = replace(setup, budget_s=args.budget)
    command = "python -m bench.gpu" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / REPORT
    skipped = availability(setup.device)
    outcome = Outcome(points=[], pids=[], left_out=[], failure=None, wall_s=0.0)
    if skipped is None:
        outcome = run(setup)
        plot(outcome.points, args.out, tokens_per_request(setup))
    else:
        sys.stderr.write(skipped + "\n")
    report.write_text(render(setup, outcome.points, outcome.left_out, outcome.wall_s, command, skipped,
                             outcome.failure))
    (args.out / "gpu.json").write_text(json.dumps(
        {"setup": asdict(setup), "skipped": skipped, "failure": outcome.failure, "wall_s": outcome.wall_s,
         "left_out": outcome.left_out, "pids": outcome.pids,
         "points": [{"k": p.k, "path": p.path, "rps": p.window.rps, "p50_s": p.window.latency(50),
                     "p99_s": p.window.latency(99), "completed": p.window.completed, "failed": p.window.failed,
                     "load_s": p.load_s} for p in outcome.points]}, indent=2) + "\n")
    sys.stdout.write(report.read_text())
    if outcome.failure:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
