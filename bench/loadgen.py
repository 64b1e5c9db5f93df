"""An open-loop load generator for ``POST /api/v1/tts``: a seeded trace, replayed on schedule.

    python -m bench.loadgen --url http://127.0.0.1:8049 --rate 5 --duration 30 [--seed 1]

The trace (`make_trace`) is a list of `Arrival`s drawn from one seed: Poisson arrival times, a
tenant per arrival (by offered-rate share), a length class (by a mix of `MIXES`: `LENGTH_MIX` by
default) and a Chinese text of that length cut from a fixed corpus. The same seed at another rate gives the
same sequence of requests, only compressed or stretched in time, so loads stay comparable and
one trace can be replayed against several targets.

`replay` sends every arrival at its intended time whatever the server does (open loop) and
measures each latency from that *intended* time, so a slow server shows up as latency instead of
slowing the generator down (no coordinated omission). It is bounded in count (the trace) and in
time (`wall_cap_s`): requests still outstanding at the cap are cancelled and recorded as
``timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TextIO

import aiohttp

from glmtts.form import encode_multipart, multipart_content_type
from glmtts.text import units

# The same sentence bench/stream_memory.py uses; texts are windows of it repeated.
CORPUS = "从前有一座山，山上有一座庙，庙里有一个老和尚在给小和尚讲故事。"
PROMPT_INDEX = "exampleA"  # a prompt every emulator (and GLM-TTS's example cache) knows
TIMEOUT_REASON = "timeout"  # no answer before the wall-clock cap
DEADLINE_REASON = "deadline"  # a 408 whose body has no reason (upstream's wording)


@dataclass(frozen=True, kw_only=True)
class LengthClass:
    """Texts of `min_chars`..`max_chars` characters (uniform), drawn with probability `share`."""

    name: str
    min_chars: int
    max_chars: int
    share: float


# The mix the benchmark offers: mostly short texts, a tail of long ones.
LENGTH_MIX = (
    LengthClass(name="short", min_chars=10, max_chars=50, share=0.7),
    LengthClass(name="medium", min_chars=51, max_chars=200, share=0.2),
    LengthClass(name="long", min_chars=201, max_chars=500, share=0.1),
)
# Two kinds of request only: many short texts (~20 chars) and some long ones (~500 chars), the
# seed's two calibration points.
BIMODAL_MIX = (
    LengthClass(name="short", min_chars=15, max_chars=25, share=0.8),
    LengthClass(name="long", min_chars=480, max_chars=520, share=0.2),
)
MIXES: dict[str, tuple[LengthClass, ...]] = {"mix": LENGTH_MIX, "bimodal": BIMODAL_MIX}


@dataclass(frozen=True, kw_only=True)
class Tenant:
    """A client population: its API key (sent as a Bearer token), weight, and share of the load."""

    name: str
    key: str | None
    share: float
    weight: float = 1.0


@dataclass(frozen=True)
class Arrival:
    """One request of a trace: when to send it (seconds from the start), for whom, what text."""

    at_s: float
    tenant: str
    text: str
    chars: int
    cls: str


@dataclass(frozen=True, kw_only=True)
class Record:
    """What became of one arrival. `latency_s` runs from the intended send time to the last byte."""

    tenant: str
    cls: str
    chars: int
    intended_s: float  # the arrival's at_s
    send_lag_s: float  # how late the generator actually sent it (should stay ~0)
    latency_s: float
    status: int | None  # HTTP status; None when no answer came (see reason)
    reason: str | None  # error body's "reason", "deadline" for a bare 408, "timeout", or a client error
    success: bool | None  # the "success" field of a 200 body
    backend: str | None  # X-Backend
    units: float = 0.0  # cost units of the text (glmtts.text.units): what its work is computed from

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.success is True


def _pick(rng: random.Random, shares: Sequence[float]) -> int:
    point = rng.random() * sum(shares)
    for i, share in enumerate(shares):
        point -= share
        if point < 0:
            return i
    return len(shares) - 1


def corpus_text(offset: int, chars: int) -> str:
    """`chars` characters of the corpus repeated, starting at `offset`."""
    start = offset % len(CORPUS)
    repeats = (start + chars) // len(CORPUS) + 1
    return (CORPUS * repeats)[start:start + chars]


def make_trace(*, seed: int, rate: float, duration_s: float, tenants: Sequence[Tenant],
               max_requests: int | None = None, mix: Sequence[LengthClass] = LENGTH_MIX) -> list[Arrival]:
    """Poisson arrivals at `rate` per second over `duration_s` (at most `max_requests`).

    Every arrival draws the same random numbers in the same order whatever the rate (a unit-rate
    gap, then tenant, class, length, text offset), so traces of one seed at different rates hold
    the same requests in the same order, with gaps scaled by 1/rate.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    at = 0.0
    while max_requests is None or len(arrivals) < max_requests:
        at += rng.expovariate(1.0) / rate
        tenant = tenants[_pick(rng, [t.share for t in tenants])]
        cls = mix[_pick(rng, [c.share for c in mix])]
        chars = rng.randint(cls.min_chars, cls.max_chars)
        offset = rng.randrange(len(CORPUS))
        if at >= duration_s:
            break
        arrivals.append(Arrival(at, tenant.name, corpus_text(offset, chars), chars, cls.name))
    return arrivals


def _multipart(fields: dict[str, str]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    return multipart_content_type(boundary), encode_multipart(fields.items(), boundary=boundary)


def _error_reason(status: int, body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    reason = payload.get("reason") if isinstance(payload, dict) else None
    if isinstance(reason, str):
        return reason
    return DEADLINE_REASON if status == 408 else None


def _success(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("success") is True


class Progress:
    """A progress line on `stream`: rewritten in place on a terminal, else one line per 10%."""

    def __init__(self, label: str, total: int, stream: TextIO = sys.stderr) -> None:
        self.label, self.total, self.stream = label, max(1, total), stream
        self.tty = stream.isatty()
        self.done = 0
        self._statuses: Counter[str] = Counter()
        self._next_tenth = 1

    def update(self, record: Record) -> None:
        self.done += 1
        self._statuses["ok" if record.ok else str(record.status or record.reason)] += 1
        tenth = self.done * 10 // self.total
        if self.tty:
            self.stream.write(f"\r{self._line()}")
            self.stream.flush()
        elif tenth >= self._next_tenth:
            self._next_tenth = tenth + 1
            self.stream.write(self._line() + "\n")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _line(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in sorted(self._statuses.items()))
        return f"[{self.label}] {self.done}/{self.total} ({100 * self.done // self.total}%) {counts}"


async def _send(session: aiohttp.ClientSession, url: str, arrival: Arrival, headers: dict[str, str],
                intended: float, loop: asyncio.AbstractEventLoop) -> Record:
    content_type, body = _multipart({"input_text": arrival.text, "index": PROMPT_INDEX})
    sent = loop.time()
    status: int | None = None
    reason: str | None = None
    success: bool | None = None
    backend: str | None = None
    try:
        async with session.post(url, data=body, headers={**headers, "Content-Type": content_type}) as resp:
            payload = await resp.read()
            status, backend = resp.status, resp.headers.get("X-Backend")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        reason = f"client_{type(exc).__name__}"
    else:
        if status == 200:
            success = _success(payload)
        else:
            reason = _error_reason(status, payload)
    return Record(tenant=arrival.tenant, cls=arrival.cls, chars=arrival.chars, intended_s=arrival.at_s,
                  send_lag_s=sent - intended, latency_s=loop.time() - intended, status=status,
                  reason=reason, success=success, backend=backend, units=units(arrival.text))


async def replay(url: str, trace: Sequence[Arrival], tenants: Sequence[Tenant], *, wall_cap_s: float,
                 label: str = "load", progress: TextIO | None = sys.stderr,
                 connections: int = 1000) -> list[Record]:
    """Send each arrival at its intended time to `url` (…/api/v1/tts); one `Record` per arrival.

    Never waits for an answer before sending the next request. At `wall_cap_s` after the start,
    requests still outstanding are cancelled and recorded with reason "timeout" (latency up to
    the cap); arrivals not yet sent by then are recorded the same way with latency 0.
    """
    headers_of = {t.name: {"Authorization": f"Bearer {t.key}"} if t.key else {} for t in tenants}
    loop = asyncio.get_running_loop()
    bar = Progress(label, len(trace), progress) if progress is not None else None
    results: list[Record | None] = [None] * len(trace)
    timeout = aiohttp.ClientTimeout(total=wall_cap_s + 60.0, sock_connect=30.0)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = loop.time()
        tasks: dict[int, asyncio.Task[None]] = {}

        async def one(i: int, arrival: Arrival, intended: float) -> None:
            record = await _send(session, url, arrival, headers_of[arrival.tenant], intended, loop)
            results[i] = record
            if bar is not None:
                bar.update(record)

        async def launch() -> None:
            for i, arrival in enumerate(trace):
                intended = start + arrival.at_s
                delay = intended - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks[i] = asyncio.ensure_future(one(i, arrival, intended))

        launcher = asyncio.ensure_future(launch())
        try:
            await asyncio.wait_for(asyncio.shield(launcher), timeout=wall_cap_s)
            pending = [t for t in tasks.values() if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=max(0.0, start + wall_cap_s - loop.time()))
        except asyncio.TimeoutError:
            pass
        finally:
            launcher.cancel()
            outstanding = [t for t in tasks.values() if not t.done()]
            for task in outstanding:
                task.cancel()
            await asyncio.gather(launcher, *outstanding, return_exceptions=True)
        ended = loop.time()
    if bar is not None:
        bar.close()
    return [record if record is not None else _unanswered(arrival, ended - start if i in tasks else None)
            for i, (arrival, record) in enumerate(zip(trace, results, strict=True))]


def _unanswered(arrival: Arrival, ended_s: float | None) -> Record:
    """The record of an arrival cut off by the wall-clock cap (`ended_s`: when; None: never sent)."""
    latency = max(0.0, ended_s - arrival.at_s) if ended_s is not None else 0.0
    return Record(tenant=arrival.tenant, cls=arrival.cls, chars=arrival.chars, intended_s=arrival.at_s,
                  send_lag_s=0.0, latency_s=latency, status=None, reason=TIMEOUT_REASON, success=None,
                  backend=None, units=units(arrival.text))


def outcome_counts(records: Sequence[Record]) -> dict[str, int]:
    """How many records ended each way: "200 ok", "429 queue_full", "408 deadline", "timeout", ..."""
    counts: Counter[str] = Counter()
    for r in records:
        if r.ok:
            counts["200 ok"] += 1
        elif r.status == 200:
            counts["200 failed"] += 1
        else:
            counts[" ".join(str(p) for p in (r.status, r.reason) if p is not None) or "unknown"] += 1
    return dict(counts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8049", help="the sidecar (or a backend)")
    parser.add_argument("--rate", type=float, required=True, help="offered requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--grace", type=float, default=60.0, help="seconds to await stragglers after the last arrival")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--key", default=None, help="API key sent as Authorization: Bearer")
    parser.add_argument("--records", default=None, help="write every record as JSON lines to this file")
    args = parser.parse_args(argv)
    tenants = [Tenant(name="client", key=args.key, share=1.0)]
    trace = make_trace(seed=args.seed, rate=args.rate, duration_s=args.duration, tenants=tenants,
                       max_requests=args.max_requests)
    records = asyncio.run(replay(args.url.rstrip("/") + "/api/v1/tts", trace, tenants,
                                 wall_cap_s=args.duration + args.grace))
    if args.records:
        with open(args.records, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
    latencies = sorted(r.latency_s for r in records if r.ok)
    p50 = latencies[len(latencies) // 2] if latencies else math.nan
    sys.stdout.write(json.dumps({"requests": len(records), "outcomes": outcome_counts(records),
                                 "p50_ok_s": round(p50, 3)}, indent=2) + "\n")


if __name__ == "__main__":
    main()

