"""Peak memory of the sidecar while many clients each receive a large (~5 MB) answer.

    python -m bench.stream_memory [--clients 20] [--chars 360] [--report bench/reports/stream-memory.md]

Starts a sidecar over emulator backends on loopback, warms it up, then has every client request
a long text at once and reads the sidecar's peak resident memory (VmHWM) before and after. An
answer streamed through keeps the peak flat; one held whole would add clients x answer size.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import procs
from bench.closedloop import tts_form
from bench.procs import memory_kib
from scheduler.core.cost import CostPriors

TEXT = "从前有一座山，山上有一座庙，庙里有一个老和尚在给小和尚讲故事。"


def _request(url: str, text: str, seed: int) -> int:
    content_type, body = tts_form(text, seed=seed)
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
    try:
        conn.request("POST", "/api/v1/tts", body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    assert resp.status == 200 and json.loads(raw)["success"], raw[:200]
    return len(raw)


def sidecar_yaml(*, backends: int, slots: int, time_scale: float) -> tuple[str, int]:
    """A sidecar over `backends` emulators on free loopback ports; (yaml, listen port)."""
    port = procs.free_port()
    command = ["{python}", "-m", "glmtts.emulator", "--port", "{port}", "--time-scale", f"{time_scale:g}",
               "--seed", "{index}"]
    return f"""listen: {{host: 127.0.0.1, port: {port}}}
backends:
  command: {json.dumps(command)}
  gpus: {json.dumps([str(i) for i in range(backends)])}
  base_port: {procs.free_ports(backends)}
  slots: {slots}
  health: {{interval_s: 0.5, timeout_s: 2.0, start_timeout_s: 60.0}}
  warmup: {{enabled: false}}
  stop_grace_s: 5.0
cost: {{base_s: {CostPriors().base_s * time_scale!r}, per_unit_s: {CostPriors().per_unit_s * time_scale!r},
       reload_s: {CostPriors().reload_s * time_scale!r}}}
""", port


def measure(*, clients: int = 20, chars: int = 360, backends: int = 2, time_scale: float = 0.002) -> dict[str, Any]:
    text = (TEXT * (chars // len(TEXT) + 1))[:chars]
    slots = max(1, clients // backends)
    config, port = sidecar_yaml(backends=backends, slots=slots, time_scale=time_scale)
    with tempfile.TemporaryDirectory() as tmp:
        service = procs.start_sidecar(config, port, Path(tmp), env=procs.isolated_env(Path(tmp) / "runtime"))
        pids = procs.backend_pids(service)
        try:
            for seed in range(backends * 2):  # load the models, warm every path
                _request(service.url, text, seed)
            before = memory_kib(service.pid)
            started = time.monotonic()
            with ThreadPoolExecutor(clients) as pool:
                sizes = list(pool.map(lambda i: _request(service.url, text, 1000 + i), range(clients)))
            elapsed = time.monotonic() - started
            after = memory_kib(service.pid)
        finally:
            service.stop()
            procs.reap(pids)
    return {
        "clients": clients, "answer_bytes": max(sizes), "total_bytes": sum(sizes), "seconds": elapsed,
        "rss_before_kib": before["VmRSS"], "peak_before_kib": before["VmHWM"], "peak_after_kib": after["VmHWM"],
        "peak_growth_kib": after["VmHWM"] - before["VmHWM"], "pids": [service.pid, *pids],
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
