"""Tools for the hostile-input cases: a recording backend, raw sockets, and the sidecar's costs.

- ``Recorder``: a tiny HTTP/1.1 backend on loopback, wired into the sidecar as an external
  backend, that writes down the request line of everything the sidecar sends it. A smuggled or
  extra request shows up there, whatever the sidecar itself believes it forwarded. Given
  ``idle_close_s``, it also loses the keep-alive race every time it can (see ``Recorder``).
- ``raw``: send exact bytes on a fresh connection and read what comes back until the sidecar
  closes or a timeout passes; ``responses`` splits that into (status, headers, body), and
  ``tally_of`` counts them as the case's outcomes.
- ``Costs``: the sidecar's peak RSS growth (VmHWM, reset through clear_refs) and CPU seconds
  (utime + stime) over one case, from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.reliability.support import (
    MAX_LOOP_LAG_S,
    Admissions,
    Outcome,
    Tally,
    assert_lag_within_bound,
    case_loop_lag_s,
    mark_loop_lag,
    record,
)
from tests.support import Service, sidecar_config, start_sidecar

MIB = 1024 * 1024
HEALTHY = {"status": "healthy", "model_loaded": True, "model_sample_rate": 24000, "model_use_phoneme": False}
PROMPTS = {"prompts": [{"index": "exampleA", "prompt_text": "x", "audio_path": "/a.wav"}]}
SUCCESS = {"success": True, "audio": "", "sample_rate": 24000, "message": "recorded"}
# What the sidecar sends on its own, not on a client's behalf.
ROUTINE = {("GET", "/api/v1/health"), ("GET", "/api/v1/prompts")}


class Recorder:
    """A raw HTTP/1.1 backend in a thread of the test process; records every request it reads.

    ``idle_close_s``: a server closes a keep-alive connection idle that long (uvicorn: 5 s). When a
    request arrives on a connection at that moment, it is lost with the connection: the keep-alive
    race. This one loses it every time: a request that finds its connection idle ``idle_close_s``
    or longer is closed on, unanswered (counted in ``raced``), as if the idle timer had fired just
    as it arrived."""

    def __init__(self, *, idle_close_s: float | None = None) -> None:
        self.requests: list[tuple[str, str]] = []
        self.raced: list[tuple[str, str]] = []
        self.idle_close_s = idle_close_s
        self.port = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Recorder:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the recording backend did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def seen(self) -> list[tuple[str, str]]:
        """Every request other than the sidecar's own health and prompt-list reads."""
        with self._lock:
            return [r for r in self.requests if r not in ROUTINE]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=256 * 1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        answered_at: float | None = None  # when the last answer on this connection went out
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                                 ValueError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                if (self.idle_close_s is not None and answered_at is not None
                        and loop.time() - answered_at >= self.idle_close_s):
                    with self._lock:
                        self.raced.append((method, path))
                    break  # closed as the request arrived: no answer
                with self._lock:
                    self.requests.append((method, path))
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        await reader.readexactly(size + 2)
                    await reader.readuntil(b"\r\n")
                else:
                    await reader.readexactly(int(headers.get("content-length", "0")))
                status, payload = self._answer(method, path)
                body = json.dumps(payload, separators=(",", ":")).encode()  # as FastAPI writes it
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                answered_at = loop.time()
        writer.close()

    @staticmethod
    def _answer(method: str, path: str) -> tuple[int, object]:
        if (method, path) == ("GET", "/api/v1/health"):
            return 200, HEALTHY
        if (method, path) == ("GET", "/api/v1/prompts"):
            return 200, PROMPTS
        if (method, path) == ("POST", "/api/v1/tts"):
            return 200, SUCCESS
        return 404, {"detail": "Not Found"}


@contextlib.contextmanager
def recorded_sidecar(tmp_path: Path, *, extra: str = "", managed: int = 0) -> Iterator[tuple[Service, Recorder]]:
    """A sidecar whose pool holds the recorder (as an external backend) and ``managed`` emulators;
    its first case's loop lag is measured from here."""
    recorder = Recorder().start()
    try:
        text, port = sidecar_config(backends=managed, backend_extra=f"external: [{json.dumps(recorder.url)}]",
                                    extra=extra)
        service = start_sidecar(text, port, tmp_path)
        try:
            mark_loop_lag(service.url)
            yield service, recorder
        finally:
            service.stop()
    finally:
        recorder.stop()


# --- raw sockets --------------------------------------------------------------------------------


@dataclass
class Raw:
    """What came back on one raw connection."""

    data: bytes
    closed: bool  # the sidecar closed (EOF or reset) before our timeout
    seconds: float
    reset: bool = False
    sent: int = 0  # bytes we managed to send

    def responses(self) -> list[tuple[int, dict[str, str], bytes]]:
        return responses(self.data)

    @property
    def cut(self) -> bool:
        """The sidecar closed the connection in the middle of an answer."""
        return self.closed and _split(self.data)[1] < len(self.data)

    @property
    def status(self) -> int | None:
        got = self.responses()
        return got[0][0] if got else None

    def detail(self) -> object:
        got = self.responses()
        return json.loads(got[0][2]).get("detail") if got else None


def raw(port: int, data: bytes | Iterable[bytes], *, timeout: float = 10.0, pause_s: float = 0.0,
        read_while_sending: bool = True, until: int | None = None, marker: tuple[bytes, int] | None = None) -> Raw:
    """Send ``data`` (or each of its pieces, ``pause_s`` apart) on a new connection, then read until
    the sidecar closes, ``until`` whole responses came back, ``marker`` (bytes, count) was seen that
    many times, or ``timeout`` seconds have passed since the start. Sending stops as soon as an
    answer arrives (``read_while_sending``), as a client would."""
    start = time.monotonic()
    deadline = start + timeout
    got = bytearray()
    closed = reset = False
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        pieces = [data] if isinstance(data, bytes) else data
        try:
            for piece in pieces:
                if time.monotonic() > deadline:
                    break
                sock.sendall(piece)
                sent += len(piece)
                if pause_s:
                    time.sleep(pause_s)
                if read_while_sending and _readable(sock):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the sidecar stopped listening to us; read what it said
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(256 * 1024)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = reset = True
                break
            if not chunk:
                closed = True
                break
            got += chunk
            if until is not None and len(responses(bytes(got))) >= until:
                break
            if marker is not None and got.count(marker[0]) >= marker[1]:
                break
    return Raw(bytes(got), closed, time.monotonic() - start, reset, sent)


def _readable(sock: socket.socket) -> bool:
    import select

    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split HTTP/1.1 responses (framed by Content-Length or chunked) out of a byte stream."""
    return _split(data)[0]


def tally_of(got: Raw) -> Tally:
    """The outcomes a raw exchange shows: each complete answer, and an answer cut short. Requests
    that got nothing back are for the sidecar's counters to place (``Tally.lost_given``)."""
    tally = Tally()
    for status, headers, body in got.responses():
        tally.answer(status, headers, body)
    if got.cut:
        tally.fail(Outcome.CUT)
    return tally


def _split(data: bytes) -> tuple[list[tuple[int, dict[str, str], bytes]], int]:
    """The complete responses at the start of ``data``, and where the rest (an incomplete one) begins."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    start = 0
    while True:
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            return out, start
        lines = data[start:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        pos = end + 4
        if "content-length" in headers:
            length = int(headers["content-length"])
            if len(data) < pos + length:
                return out, start
            body, pos = data[pos : pos + length], pos + length
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body_parts = []
            while True:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    return out, start
                size = int(data[pos:line_end].split(b";")[0], 16)
                if len(data) < line_end + 2 + size + 2:
                    return out, start
                body_parts.append(data[line_end + 2 : line_end + 2 + size])
                pos = line_end + 2 + size + 2
                if size == 0:
                    break
            body = b"".join(body_parts)
        else:
            body, pos = data[pos:], len(data)
        out.append((status, headers, body))
        start = pos


# --- the sidecar's costs --------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass
class Costs:
    """Peak RSS growth and CPU seconds of process ``pid`` from construction to ``done()``."""

    pid: int
    rss_start_kib: int = 0
    hwm_reset: bool = False
    cpu_start: float = 0.0
    rss_growth_mib: float = 0.0
    cpu_s: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        with contextlib.suppress(OSError):  # "5": reset the peak RSS to the current RSS
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        self.rss_start_kib = _status_kib(self.pid, "VmRSS")
        if not self.hwm_reset:
            self.rss_start_kib = _status_kib(self.pid, "VmHWM")
        self.cpu_start = _cpu_s(self.pid)

    def done(self) -> Costs:
        self.rss_growth_mib = max(0, _status_kib(self.pid, "VmHWM") - self.rss_start_kib) / 1024
        self.cpu_s = _cpu_s(self.pid) - self.cpu_start
        return self


# --- one case, measured and recorded ----------------------------------------------------------------


@dataclass
class Target:
    """The sidecar under attack and the recorder behind it."""

    service: Service
    recorder: Recorder
    max_body_bytes: int

    @property
    def port(self) -> int:
        return int(self.service.url.rsplit(":", 1)[1])


MAX_CASE_CPU_S = 10.0  # generous: a case that makes the sidecar work this hard is a finding


def run_case(target: Target, name: str, data: bytes | Iterable[bytes], *, status: int | None,
             detail: str | None = None, closed: bool | None = None, forwarded: int = 0, answers: int | None = 1,
             max_rss_mib: float | None = None, max_cpu_s: float = MAX_CASE_CPU_S,
             max_lag_s: float = MAX_LOOP_LAG_S, **raw_args: Any) -> Raw:
    """Send one hostile request (or stream) and check the sidecar's answer and costs, and what the
    backend saw; record the figures as ``name``. ``status``: of the first answer (None: no answer
    at all); ``detail``: a phrase the answer's body must hold; ``closed``: the sidecar must have
    closed the connection (True) or kept it (False); ``forwarded``: requests the backend must
    have seen; ``answers``: how many answers came back (None: any). Lost requests are the TTS
    requests the sidecar admitted (its counters) less the complete answers that came back to them."""
    url = target.service.url
    before = len(target.recorder.seen())
    mark_loop_lag(url)
    admissions = Admissions.read(url)
    costs = Costs(target.service.pid)
    got = raw(target.port, data, **raw_args)
    costs.done()
    time.sleep(0.05)  # anything the sidecar might still forward would be on its way by now
    new = target.recorder.seen()[before:]
    admitted = admissions.admitted_since(url)
    tally = tally_of(got)
    lag = case_loop_lag_s(url)
    record(name, status=got.status, backend_saw=len(new), rss_growth_mib=round(costs.rss_growth_mib, 1),
           cpu_s=round(costs.cpu_s, 3), sent_bytes=got.sent, closed=got.closed, admitted=admitted,
           lost=tally.lost_given(admitted), loop_lag_ms=round(lag * 1000, 1))
    answered = got.responses()
    assert got.status == status, (got.status, got.data[:400])
    if answers is not None:
        assert len(answered) == answers, [(s, b[:100]) for s, _, b in answered]
    if detail is not None:
        assert detail in answered[0][2].decode("utf-8", "replace"), answered[0][2][:400]
    if status in (408, 413):  # the rest of the body is not read: the connection must not be reused
        assert answered[0][1].get("connection") == "close", answered[0][1]
    if closed is not None:
        assert got.closed is closed, f"connection closed: {got.closed}, after {got.seconds:.1f} s"
    assert len(new) == forwarded, new
    assert all("smuggled" not in path for _, path in target.recorder.requests), target.recorder.requests
    assert not tally.lost_given(admitted), (admitted, tally.figures())
    limit = max_rss_mib if max_rss_mib is not None else 2 * target.max_body_bytes / MIB
    assert costs.rss_growth_mib < limit, f"peak RSS grew {costs.rss_growth_mib:.1f} MiB (bound {limit:.1f})"
    assert costs.cpu_s < max_cpu_s, f"{costs.cpu_s:.2f} CPU seconds (bound {max_cpu_s})"
    assert target.service.alive()
    assert_lag_within_bound(lag, max_lag_s)
    return got
