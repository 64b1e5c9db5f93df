"""Backend faults through the whole sidecar, with nothing lost: every admitted request gets a definite
answer (a success, or a status the client can act on), never a hang, a vanished request or a broken
connection; a request is retried on another backend only while no byte of it went to the client."""

from __future__ import annotations

import http.client as httpclient
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.contract_cases import multipart
from tests.reliability.support import assert_loop_lag_ok, record
from tests.support import (
    Service,
    emulator,
    get_json,
    http,
    running_sidecar,
    sidecar_config,
    start_sidecar,
    wait_until,
)

SHORT = "今天天气很好，我们去公园散步。"
JSON = {"Content-Type": "application/json"}


@dataclass
class Result:
    """What one client saw: a status and a body, or no answer at all (``status`` None: lost)."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cut: bool = False  # the answer began but its body stopped short
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.cut and json.loads(self.body).get("success") is True


def tts(url: str, text: str = SHORT, *, conn: httpclient.HTTPConnection | None = None,
        timeout: float = 60.0) -> Result:
    """One TTS request; on ``conn`` (kept open) when given, else on a new connection."""
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    host, _, port = url.removeprefix("http://").partition(":")
    own = conn is None
    conn = conn or httpclient.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/api/v1/tts", body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
    except (OSError, httpclient.HTTPException) as exc:
        return Result(None, error=f"{type(exc).__name__}: {exc}")
    headers = dict(resp.getheaders())
    try:
        return Result(resp.status, headers, resp.read())
    except httpclient.IncompleteRead as exc:
        return Result(resp.status, headers, exc.partial, cut=True, error="IncompleteRead")
    except (OSError, httpclient.HTTPException) as exc:
        return Result(resp.status, headers, cut=True, error=f"{type(exc).__name__}: {exc}")
    finally:
        if own:
            conn.close()


def backends(service: Service) -> list[dict[str, Any]]:
    status, _, raw = http("GET", service.url + "/api/v1/health", timeout=10)
    assert status in (200, 503), (status, raw[:300])
    result: list[dict[str, Any]] = json.loads(raw)["backends"]
    return result


def received(url: str) -> int:
    return int(get_json(url + "/emulator/stats")["tts_received"])


def set_faults(url: str, faults: dict[str, Any]) -> None:
    status, _, body = http("POST", url + "/emulator/faults", body=json.dumps(faults).encode(), headers=JSON)
    assert status == 200, body


def zombies(parent: int) -> list[int]:
    """Children of ``parent`` that exited and were not reaped (state Z)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == parent and fields[0] == "Z":
            found.append(int(entry))
    return found


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- 500 storm ------------------------------------------------------------------------------------


def test_500_storm_ejects_the_backend_and_retries_without_a_storm(tmp_path: Path) -> None:
    outlier = "outlier: {consecutive_failures: 3, base_ejection_s: 30.0, max_ejection_s: 60.0}"
    # Warmed up, every backend holds the model: none is passed over for affinity, the bad one gets traffic.
    with running_sidecar(tmp_path, backends=3, time_scale=0.01, backend_extra=outlier, warmup=True) as service, \
            ThreadPoolExecutor(3) as pool:
        urls = [b["url"] for b in backends(service)]
        bad = urls[0]
        warmups = [received(url) for url in urls]
        set_faults(bad, {"fail_status": 500})
        results: list[Result] = []
        deadline = time.monotonic() + 20
        while backends(service)[0]["outlier"] is None and time.monotonic() < deadline:
            results += pool.map(lambda i: tts(service.url, f"{SHORT}{i}"), range(3))
            time.sleep(0.05)
        ejected = backends(service)[0]
        assert ejected["outlier"] is not None and ejected["state"] == "unhealthy", ejected
        to_eject, bad_at_ejection = len(results), received(bad) - warmups[0]
        results += pool.map(lambda i: tts(service.url, f"{SHORT}{i}"), range(30))
        counts = [received(url) - warm for url, warm in zip(urls, warmups, strict=True)]
        lag = assert_loop_lag_ok(service.url)
    statuses = sorted({r.status for r in results}, key=str)
    lost = sum(r.status is None for r in results)
    assert lost == 0 and all(r.ok for r in results), statuses
    assert all(r.headers.get("X-Backend") != ejected["id"] for r in results), "a 500 reached a client"
    sent = len(results)
    # Every 500 was retried once, on a healthy backend, and nothing else was: no retry storm.
    assert sum(counts) == sent + counts[0], (sent, counts)
    assert counts[0] == bad_at_ejection, "the ejected backend still got traffic"
    assert counts[0] <= 3 * 3, counts  # it is taken out after each 500; ejected after 3 in a row
    record("backend faults: 500 storm", sent=sent, lost=lost, client_errors=0, bad_backend_received=counts[0],
           retries=sum(counts) - sent, requests_until_ejected=to_eject, loop_lag_ms=round(lag * 1000, 1))


# --- an answer cut short is never retried -----------------------------------------------------------

ANSWER_HEAD = b'{"success":true,"message":"TTS generation successful","audio_base64":"'


class CuttingBackend:
    """A backend of our own: healthy, but each TTS answer is headers and part of a body, then the
    connection closes; by Content-Length and chunked framing in turn. Counts TTS attempts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.attempts = 0
        self.sent: list[bytes] = []  # the body bytes each attempt got before the cut
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                           if k.strip().lower() == "content-length"), 0)
            while len(rest) < length:
                rest += conn.recv(65536)
            method, path = lines[0].split()[:2]
            if method == "GET" and path == "/api/v1/health":
                body = b'{"status":"healthy","model_loaded":false}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                return
            if not (method == "POST" and path == "/api/v1/tts"):
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            self.attempts += 1
            part = ANSWER_HEAD + b"UklGR" * 4000
            if self.attempts % 2:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400000\r\n\r\n"
                             + part)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n" % (len(part), part))
            self.sent.append(part)
            time.sleep(0.1)  # let the part reach the sidecar and the client before the cut


@contextmanager
def cutting_backend() -> Iterator[CuttingBackend]:
    backend = CuttingBackend()
    try:
        yield backend
    finally:
        backend.close()


def test_an_answer_cut_mid_body_reaches_the_client_cut_and_is_never_retried(tmp_path: Path) -> None:
    with cutting_backend() as raw:
        text, port = sidecar_config(backends=1, time_scale=0.05, backend_extra=f"external: [{json.dumps(raw.url)}]")
        service = start_sidecar(text, port, tmp_path)
        try:
            emulator_url = backends(service)[0]["url"]
            results: list[Result] = []
            deadline = time.monotonic() + 25
            with ThreadPoolExecutor(3) as pool:
                while raw.attempts < 2 and time.monotonic() < deadline:
                    wait_until(lambda: all(b["state"] == "ready" for b in backends(service)), timeout=10,
                               what="both backends ready")
                    results += pool.map(lambda i: tts(service.url, f"{SHORT}{i}"), range(3))
            served = received(emulator_url)
            lag = assert_loop_lag_ok(service.url)
        finally:
            service.stop()
    lost = sum(r.status is None for r in results)
    cut = [r for r in results if r.headers.get("X-Backend") == "ext-0"]
    assert lost == 0 and raw.attempts >= 2, (lost, raw.attempts, [r.error for r in results])
    # The client sees the cut (no spliced second answer), and the backend saw exactly one attempt.
    assert len(cut) == raw.attempts
    assert all(r.cut and r.status == 200 for r in cut), [(r.status, r.error) for r in cut]
    assert sorted(r.body for r in cut) == sorted(raw.sent), [len(r.body) for r in cut]
    whole = [r for r in results if r not in cut]
    assert all(r.ok for r in whole) and served == len(whole), (served, len(whole))
    record("backend faults: answer cut mid-body", sent=len(results), lost=lost, cut_seen_by_client=len(cut),
           backend_attempts_of_cut=raw.attempts, retried_after_bytes=0, loop_lag_ms=round(lag * 1000, 1))


# --- success: false passes through ----------------------------------------------------------------


def test_success_false_passes_through_byte_for_byte_and_is_not_retried(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, backends=2, time_scale=0.01) as service:
        urls = [b["url"] for b in backends(service)]
        for url in urls:
            set_faults(url, {"fail_status": 200})
        direct = tts(urls[0], SHORT)
        before = sum(received(url) for url in urls)
        results = [tts(service.url, SHORT) for _ in range(6)]
        after = sum(received(url) for url in urls)
        lag = assert_loop_lag_ok(service.url)
    lost = sum(r.status is None for r in results)
    assert direct.status == 200 and json.loads(direct.body)["success"] is False
    assert lost == 0 and all(r.status == 200 and r.body == direct.body for r in results), \
        [(r.status, r.body[:120]) for r in results]
    assert after - before == len(results), "a success: false answer was retried"
    record("backend faults: success false passthrough", sent=len(results), lost=lost,
           identical_bodies=len(results), backend_attempts=after - before, loop_lag_ms=round(lag * 1000, 1))


# --- keep-alive race ------------------------------------------------------------------------------

GAPS_S = (4.9, 4.95, 5.0, 5.05, 5.1)


def idle_close_after(url: str, limit: float = 12.0) -> float | None:
    """Seconds until the server closes a kept-alive connection left idle after one answer."""
    host, _, port = url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=limit) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        answered = time.monotonic()
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            return None
        return time.monotonic() - answered


def test_idle_gaps_around_the_backends_keep_alive_never_surface_a_disconnect(tmp_path: Path) -> None:
    """uvicorn (GLM-TTS's server) closes a connection idle for 5 s, and so does the emulator. A pooled
    connection the sidecar reuses at that very moment would carry a request into a closing socket.
    Two things keep that from any client: the sidecar's backend client drops idle connections after
    CLIENT_KEEPALIVE_S (3 s), well before the backend does, so a request after a ~5 s gap goes out on
    a fresh connection; and a request that still meets a connection closed under it (a backend that
    closes earlier) fails before any answer began, so it is retried on another backend."""
    from backend.client import CLIENT_KEEPALIVE_S

    assert CLIENT_KEEPALIVE_S < 5.0
    with emulator() as direct, ThreadPoolExecutor(1) as probe, \
            running_sidecar(tmp_path, backends=len(GAPS_S), time_scale=0.01) as service:
        closed_after = probe.submit(idle_close_after, direct.url)

        def with_gap(gap: float) -> list[Result]:
            host, _, port = service.url.removeprefix("http://").partition(":")
            conn = httpclient.HTTPConnection(host, int(port), timeout=30)
            try:
                out = [tts(service.url, conn=conn)]
                for _ in range(2):
                    time.sleep(gap)
                    out.append(tts(service.url, conn=conn))
                return out
            finally:
                conn.close()

        with ThreadPoolExecutor(len(GAPS_S)) as pool:
            runs = list(pool.map(with_gap, GAPS_S))
        idle_s = closed_after.result()
        lag = assert_loop_lag_ok(service.url)
    assert idle_s is not None and 4.5 <= idle_s <= 6.5, idle_s
    results = [r for run in runs for r in run]
    lost = sum(r.status is None for r in results)
    assert lost == 0 and all(r.ok for r in results), [(r.status, r.error) for r in results]
    record("backend faults: keep-alive race", sent=len(results), lost=lost, gaps_s=list(GAPS_S),
           emulator_idle_close_s=round(idle_s, 2), client_keepalive_s=CLIENT_KEEPALIVE_S,
           loop_lag_ms=round(lag * 1000, 1))


# --- crash storm ----------------------------------------------------------------------------------


def crash_storm(tmp_path: Path, crashes: int) -> None:
    restart = "{backoff_initial_s: 0.01, backoff_max_s: 0.05, crash_loop: {max_failures: 1000, window_s: 60.0, " \
              "cooldown_s: 1.0}}"
    with emulator() as healthy:
        # Each life passes its warm-up (request 1: it holds the model, so it gets traffic), then the
        # first real request finds it exiting without an answer.
        text, port = sidecar_config(backends=1, time_scale=0.01, emulator_args=("--crash-after", "1"),
                                    restart=restart, warmup=True,
                                    backend_extra=f"external: [{json.dumps(healthy.url)}]")
        service = start_sidecar(text, port, tmp_path)
        try:
            fds_before = open_fds(service.pid)
            results: list[Result] = []
            lives: list[int] = []  # pids of the crashing backend, one per life
            settled_zombies: set[int] = set()  # zombies of lives already replaced (must stay empty)
            transient = 0  # the most zombies seen at any moment (an exit not yet reaped)
            stop = threading.Event()

            def client() -> None:
                while not stop.is_set():
                    results.append(tts(service.url, SHORT))

            deadline = time.monotonic() + 20 + crashes * 1.5
            with ThreadPoolExecutor(2) as pool:
                workers = [pool.submit(client) for _ in range(2)]
                try:
                    while len(lives) <= crashes and time.monotonic() < deadline:
                        crashy = backends(service)[0]
                        if crashy["pid"] is not None and crashy["pid"] not in lives:
                            lives.append(crashy["pid"])
                        found = zombies(service.pid)
                        transient = max(transient, len(found))
                        # A life that was replaced by a new one must have been reaped by then.
                        settled_zombies.update(pid for pid in found if pid in lives[:-1])
                        time.sleep(0.01)
                finally:
                    stop.set()
                    for worker in workers:
                        worker.result()
            restarts = backends(service)[0]["restarts"]
            wait_until(lambda: backends(service)[0]["state"] == "ready" or backends(service)[0]["pid"] is None,
                       timeout=10, what="the last restart to settle")
            wait_until(lambda: not zombies(service.pid), timeout=5, what="no zombie")
            fds_after = open_fds(service.pid)
            lag = assert_loop_lag_ok(service.url)
        finally:
            service.stop()
    lost = sum(r.status is None for r in results)
    assert restarts >= crashes, restarts
    assert not settled_zombies, settled_zombies
    assert lost == 0 and all(r.ok for r in results), sorted({(r.status, r.error) for r in results}, key=str)
    assert fds_after <= fds_before + 8, (fds_before, fds_after)
    record(f"backend faults: {crashes} backend crashes", sent=len(results), lost=lost, crashes=restarts,
           zombies_after_settle=0, zombies_transient_max=transient, fds_before=fds_before, fds_after=fds_after,
           loop_lag_ms=round(lag * 1000, 1))


def test_20_backend_crashes_leave_no_zombie_no_fd_and_no_lost_request(tmp_path: Path) -> None:
    crash_storm(tmp_path, 20)


@pytest.mark.slow
def test_50_backend_crashes_leave_no_zombie_no_fd_and_no_lost_request(tmp_path: Path) -> None:
    crash_storm(tmp_path, 50)
