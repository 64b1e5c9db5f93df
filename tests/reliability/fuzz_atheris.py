"""The atheris (libFuzzer) harness of tests/reliability/fuzz_targets.py, run as a subprocess:

    python -m tests.reliability.fuzz_atheris --runs 100000 --max-time 20 --artifacts DIR [CORPUS ...]

glmtts is imported under atheris's instrumentation, so the fuzzer is guided by coverage of the
parser and the contract. A failed check, an exception or an input over ``--timeout`` seconds makes
libFuzzer write the input to ``DIR`` (crash-*, timeout-*) and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["glmtts"]):
    from tests.reliability import fuzz_targets


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, required=True, help="most inputs to try")
    parser.add_argument("--max-time", type=int, required=True, help="most seconds to fuzz")
    parser.add_argument("--artifacts", type=Path, required=True, help="where a failing input is written")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--max-len", type=int, default=16384, help="longest input in bytes")
    parser.add_argument("--worst", type=Path, help="keep the most CPU milliseconds one input took in this file")
    parser.add_argument("corpus", nargs="*", type=Path, help="corpus directories; new inputs go to the first")
    args = parser.parse_args(argv)
    worst = 0.0

    def one_input(data: bytes) -> None:
        nonlocal worst
        _, cpu_s = fuzz_targets.check(*fuzz_targets.split_input(data))
        if cpu_s > worst:  # rare: libFuzzer exits without running Python's atexit handlers
            worst = cpu_s
            if args.worst is not None:
                args.worst.write_text(f"{worst * 1000:.3f}\n")

    atheris.Setup([sys.argv[0], f"-runs={args.runs}", f"-max_total_time={args.max_time}", f"-timeout={args.timeout}",
                   f"-max_len={args.max_len}", "-rss_limit_mb=2048", f"-artifact_prefix={args.artifacts}/",
                   "-print_final_stats=1", *(str(c) for c in args.corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
