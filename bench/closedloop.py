"""Closed-loop load: each client sends one request, waits for the answer, sends the next.

    measure(urls, body, window_s=..., ramp_s=...)

Client i talks to ``urls[i]`` (one URL per client; several clients may share one). Only requests
that *finish* inside the measurement window (after the ramp, while every client is busy) count:
throughput = their number / window, latency = their send-to-last-byte times.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.summary import percentile
from glmtts.form import encode_multipart, multipart_content_type


@dataclass(frozen=True)
class Exchange:
    client: int
    started: float  # monotonic seconds
    finished: float
    ok: bool  # 200 with success: true


@dataclass(frozen=True, kw_only=True)
class Window:
    """What the clients saw inside the window."""

    clients: int
    window_s: float
    completed: int  # OK answers finished inside the window
    failed: int  # answers (or errors) inside the window that were not OK
    latencies_s: tuple[float, ...]  # of the OK ones
    finishes: tuple[tuple[float, ...], ...] = ()  # per client, when its OK answers inside the window finished

    @property
    def rps(self) -> float:
        """Sum of each client's rate: (answers - 1) / (last - first finish) when it had two or more in
        the window (no error from where the window's edges cut a request), else answers / window."""
        if not self.finishes:
            return self.completed / self.window_s
        total = 0.0
        for times in self.finishes:
            span = times[-1] - times[0] if len(times) >= 2 else 0.0
            total += (len(times) - 1) / span if span > 0 else len(times) / self.window_s
        return total

    def latency(self, q: float) -> float | None:
        return percentile(self.latencies_s, q)

    def latency_or_nan(self, q: float) -> float:
        """For plots: a missing percentile is a gap."""
        value = self.latency(q)
        return math.nan if value is None else value


def tts_form(text: str, *, seed: int = 1) -> tuple[str, bytes]:
    """A multipart ``POST /api/v1/tts`` body with `text` and the exampleA prompt."""
    boundary = uuid.uuid4().hex
    fields = {"input_text": text, "index": "exampleA", "seed": str(seed)}
    return multipart_content_type(boundary), encode_multipart(fields.items(), boundary=boundary)


def _ok(status: int, body: bytes) -> bool:
    if status != 200:
        return False
    try:
        return bool(json.loads(body).get("success") is True)
    except (ValueError, AttributeError):
        return False


async def run_clients(urls: Sequence[str], form: tuple[str, bytes], *, duration_s: float,
                      timeout_s: float = 600.0) -> list[Exchange]:
    """Every client loops on its URL for `duration_s` (the last request may finish later)."""
    content_type, body = form
    exchanges: list[Exchange] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        stop_at = time.monotonic() + duration_s

        async def client(i: int, url: str) -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    async with session.post(url + "/api/v1/tts", data=body,
                                            headers={"Content-Type": content_type}) as resp:
                        ok = _ok(resp.status, await resp.read())
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                exchanges.append(Exchange(i, started, time.monotonic(), ok))

        await asyncio.gather(*(client(i, u) for i, u in enumerate(urls)))
    return exchanges


def measure(urls: Sequence[str], form: tuple[str, bytes], *, window_s: float, ramp_s: float) -> Window:
    """Run the clients for ramp + window; count what finished inside the window."""
    began = time.monotonic()
    exchanges = asyncio.run(run_clients(urls, form, duration_s=ramp_s + window_s))
    lo, hi = began + ramp_s, began + ramp_s + window_s
    inside = [e for e in exchanges if lo <= e.finished <= hi]
    finishes = tuple(tuple(sorted(e.finished for e in inside if e.ok and e.client == i)) for i in range(len(urls)))
    return Window(clients=len(urls), window_s=window_s, completed=sum(e.ok for e in inside),
                  failed=sum(not e.ok for e in inside),
                  latencies_s=tuple(e.finished - e.started for e in inside if e.ok), finishes=finishes)


def warm(urls: Sequence[str], form: tuple[str, bytes], rounds: int = 1) -> None:
    """`rounds` requests on every URL, the URLs in parallel (loads each backend's model)."""

    async def go() -> None:
        content_type, body = form
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:

            async def one(url: str) -> None:
                for _ in range(rounds):
                    async with session.post(url + "/api/v1/tts", data=body,
                                            headers={"Content-Type": content_type}) as resp:
                        raw = await resp.read()
                        if not _ok(resp.status, raw):
                            raise RuntimeError(f"warm-up of {url}: HTTP {resp.status} {raw[:300]!r}")

            await asyncio.gather(*(one(u) for u in dict.fromkeys(urls)))

    asyncio.run(go())


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes (not their children) have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            data = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total
