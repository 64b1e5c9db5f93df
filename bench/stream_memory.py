"""Peak memory of the sidecar while many clients each receive a large (~5 MB) answer.

    python -m bench.stream_memory [--clients 20] [--chars 360] [--report bench/reports/stream-memory.md]

Starts a sidecar over emulator backends on loopback, warms it up, then has every client request
a long text at once and reads the sidecar's peak resident memory (VmHWM) before and after. An
answer streamed through keeps the peak flat; one held whole would add clients x answer size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.contract_cases import multipart
from tests.support import Service, http, sidecar_config, start_sidecar

TEXT = "从前有一座山，山上有一座庙，庙里有一个老和尚在给小和尚讲故事。"


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def _request(service: Service, text: str, seed: int) -> int:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"), ("seed", str(seed)))
    status, _, raw = http("POST", service.url + "/api/v1/tts", body=body, headers={"Content-Type": content_type},
                          timeout=120)
    assert status == 200 and json.loads(raw)["success"], raw[:200]
    return len(raw)


def measure(*, clients: int = 20, chars: int = 360, backends: int = 2, time_scale: float = 0.002) -> dict[str, Any]:
    text = (TEXT * (chars // len(TEXT) + 1))[:chars]
    slots = max(1, clients // backends)
    config, port = sidecar_config(backends=backends, slots=slots, time_scale=time_scale)
    with tempfile.TemporaryDirectory() as tmp:
        service = start_sidecar(config, port, Path(tmp))
        try:
            for seed in range(backends * 2):  # load the models, warm every path
                _request(service, text, seed)
            before = memory_kib(service.pid)
            started = time.monotonic()
            with ThreadPoolExecutor(clients) as pool:
                sizes = list(pool.map(lambda i: _request(service, text, 1000 + i), range(clients)))
            elapsed = time.monotonic() - started
            after = memory_kib(service.pid)
        finally:
            service.stop()
    return {
        "clients": clients, "answer_bytes": max(sizes), "total_bytes": sum(sizes), "seconds": elapsed,
        "rss_before_kib": before["VmRSS"], "peak_before_kib": before["VmHWM"], "peak_after_kib": after["VmHWM"],
        "peak_growth_kib": after["VmHWM"] - before["VmHWM"],
    }


def report(result: dict[str, Any]) -> str:
    mib = 1024.0
    return "\n".join([
        "# Sidecar memory while streaming large answers",
        "",
        f"{result['clients']} clients at once, each receiving a {result['answer_bytes'] / 1e6:.1f} MB answer "
        f"({result['total_bytes'] / 1e6:.0f} MB in all, {result['seconds']:.1f} s).",
        "",
        "| | MiB |",
        "|---|---|",
        f"| resident before | {result['rss_before_kib'] / mib:.1f} |",
        f"| peak before | {result['peak_before_kib'] / mib:.1f} |",
        f"| peak after | {result['peak_after_kib'] / mib:.1f} |",
        f"| peak growth | {result['peak_growth_kib'] / mib:.1f} |",
        "",
        "Reproduce: `python -m bench.stream_memory`.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--chars", type=int, default=360)
    parser.add_argument("--report", type=Path, default=Path("bench/reports/stream-memory.md"))
    args = parser.parse_args()
    text = report(measure(clients=args.clients, chars=args.chars))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
