"""Slow and vanishing clients: slowloris, slow readers and disconnects at every stage cost the
sidecar neither responsiveness nor slots, descriptors or queue places, and lose no admitted request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.contract_cases import multipart
from tests.reliability.support import Admissions, assert_loop_lag_ok, record
from tests.reliability.test_backend_faults import SHORT, Result, backends, open_fds, received, tally_of, tts
from tests.support import (
    Service,
    configured_admin_token,
    details,
    running_sidecar,
    sidecar_config,
    start_process,
    wait_http,
    wait_until,
)

# Latencies beside slow clients, loop-lag bounds: in the "serial" xdist group (tests/conftest.py),
# never beside the suite's other heavy or timing-sensitive tests.
pytestmark = pytest.mark.xdist_group("serial")

LONG = "今天天气很好，我们去公园散步。" * 24  # 360 characters: a ~5 MB answer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def traffic(url: str, seconds: float, *, clients: int = 2) -> tuple[list[Result], list[float]]:
    """Normal TTS requests from ``clients`` threads back to back for ``seconds``: results, latencies."""
    results: list[Result] = []
    latencies: list[float] = []
    end = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < end:
            began = time.monotonic()
            result = tts(url, SHORT, timeout=30)
            latencies.append(time.monotonic() - began)
            results.append(result)

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return results, latencies


def within_tolerance(baseline: list[float], during: list[float]) -> bool:
    """Latency kept: p99 at most 3x the baseline's plus 50 ms (the machine is shared, so generous)."""
    return percentile(during, 0.99) <= 3 * percentile(baseline, 0.99) + 0.05


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def queue(service: Service) -> dict[str, Any]:
    result: dict[str, Any] = details(service, "/api/v1/queue")
    return result


def settled(service: Service) -> bool:
    """Nothing queued, nothing in service, no backend slot held."""
    status = queue(service)
    return status["depth"] == 0 and status["in_service"] == 0 and all(b["in_flight"] == 0 for b in status["backends"])


def address(service: Service) -> tuple[str, int]:
    host, _, port = service.url.removeprefix("http://").partition(":")
    return host, int(port)


def tts_request(text: str) -> bytes:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    head = (f"POST /api/v1/tts HTTP/1.1\r\nHost: sidecar\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


# --- slowhttptest ---------------------------------------------------------------------------------

@contextmanager
def slowhttptest(*args: str, stats: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run Debian's slowhttptest against the sidecar, its per-second statistics to ``stats``.csv;
    it is ended (by its pid) on exit."""
    program = shutil.which("slowhttptest")
    if program is None:
        pytest.skip("slowhttptest not installed")
    with stats.with_suffix(".out").open("wb") as sink:
        proc = subprocess.Popen([program, *args, "-g", "-o", str(stats)], stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


def attack_figures(stats: Path) -> dict[str, Any]:
    """From slowhttptest's CSV: the most connections it held at once, the most the server closed,
    and the lowest 'service available' it saw (0: its probe found the service down)."""
    csv = stats.with_suffix(".csv")
    if not csv.exists():
        return {}
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:] if line.strip()]
    return {"held_max": max(int(r[3]) for r in rows), "closed_by_server_max": max(int(r[1]) for r in rows),
            "service_available_min": min(int(r[4]) for r in rows)}


LOW_SOFT_NOFILE = 256  # a shell's or container's usual soft limit is 1024: below what one attack holds


@contextmanager
def sidecar_with_low_fd_limit(tmp_path: Path, extra: str = "") -> Iterator[Service]:
    """A ready sidecar started with a soft RLIMIT_NOFILE of LOW_SOFT_NOFILE (its hard limit unchanged)."""
    text, port = sidecar_config(backends=2, time_scale=0.01, extra=extra)
    config = tmp_path / "sidecar.yaml"
    config.write_text(text + f"\ntasks: {{state_dir: {json.dumps(str(tmp_path / 'tasks'))}}}\n")
    launch = ("import resource, runpy, sys; "
              f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LOW_SOFT_NOFILE}, "
              "resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
              f"sys.argv = ['scheduler', '--config', {str(config)!r}]; "
              "runpy.run_module('scheduler', run_name='__main__')")
    service = start_process([sys.executable, "-c", launch], f"http://127.0.0.1:{port}")
    service.admin_token = configured_admin_token(text)
    try:
        wait_http(service, "/readyz", timeout=60)
        wait_until(lambda: all(b["state"] == "ready" for b in backends(service)), timeout=60, what="backends ready")
        yield service
    finally:
        service.stop()


def fd_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/limits")


def attacked(tmp_path: Path, case: str, args: list[str], *, held_at_least: int, extra: str = "") -> dict[str, Any]:
    """Normal traffic before and during a slowhttptest attack: all answered, latency kept. The
    sidecar starts with a low soft descriptor limit, as from a shell: it raises it to the hard one.
    Returns slowhttptest's figures. Lost: of the TTS requests the sidecar admitted (its counters:
    the attack sends none), those without a whole answer."""
    with sidecar_with_low_fd_limit(tmp_path, extra) as service:
        soft, hard = fd_limits(service.pid)
        assert soft == hard or soft >= 65536, (soft, hard)
        admissions = Admissions.read(service.url)
        first = tts(service.url)  # first-request costs out of the baseline
        base_results, baseline = traffic(service.url, 2.0)
        fds_before = open_fds(service.pid)
        stats = tmp_path / "slowhttptest"
        with slowhttptest(*args, "-u", service.url + "/api/v1/health", stats=stats) as proc:
            wait_until(lambda: open_fds(service.pid) >= fds_before + held_at_least or proc.poll() is not None,
                       timeout=10, what="the attack's connections")
            fds_attack = open_fds(service.pid)
            results, during = traffic(service.url, 3.5)
            fds_attack = max(fds_attack, open_fds(service.pid))
            proc.wait(15)  # its statistics are written when it ends by itself
        wait_until(lambda: open_fds(service.pid) <= fds_before + 10, timeout=10, what="descriptors back")
        admitted = admissions.admitted_since(service.url)
        lag = assert_loop_lag_ok(service.url)
    figures = attack_figures(stats)
    results += [first, *base_results]
    lost = tally_of(results).lost_given(admitted)
    assert lost == 0 and all(r.ok for r in results), sorted({(r.status, r.error) for r in results}, key=str)
    assert fds_attack >= fds_before + held_at_least, (fds_before, fds_attack)
    assert within_tolerance(baseline, during), (percentile(baseline, 0.99), percentile(during, 0.99))
    assert figures.get("service_available_min", 1) > 0, figures
    record(case, sent=len(results), lost=lost, attack_connections_held=fds_attack - fds_before,
           p50_ms=[ms(percentile(baseline, 0.5)), ms(percentile(during, 0.5))],
           p99_ms=[ms(percentile(baseline, 0.99)), ms(percentile(during, 0.99))],
           p99_ratio=round(percentile(during, 0.99) / percentile(baseline, 0.99), 2),
           fd_soft_limit=soft, loop_lag_ms=ms(lag), **figures)
    return figures


def test_slowloris_does_not_slow_normal_traffic(tmp_path: Path) -> None:
    # A connection without a whole request head is closed after limits.idle_timeout_s.
    figures = attacked(tmp_path, "slow clients: slowloris (500 slow headers)",
                       ["-H", "-c", "500", "-i", "5", "-r", "250", "-l", "7"], held_at_least=300,
                       extra="limits: {idle_timeout_s: 4.0}")
    assert figures.get("closed_by_server_max", 1) > 0, figures


# 200 slowhttptest readers for 7 s: slow. The default suite keeps slow readers in the test below
# (readers of 5 MB answers: latency, slots, loop lag) and slowhttptest in the slowloris test above.
@pytest.mark.slow
def test_slow_readers_do_not_slow_normal_traffic(tmp_path: Path) -> None:
    attacked(tmp_path, "slow clients: slow read (200 slowhttptest readers)",
             ["-X", "-c", "200", "-w", "512", "-y", "1024", "-n", "5", "-z", "32", "-k", "3", "-r", "200",
              "-l", "7"], held_at_least=150)


def test_slow_readers_of_big_answers_hold_no_backend_slot(tmp_path: Path) -> None:
    """A client that reads a 5 MB answer at a trickle must not keep a GPU slot for the time it takes:
    the backend finished its work when its answer began."""
    with running_sidecar(tmp_path, backends=2, time_scale=0.01) as service:
        first = tts(service.url)
        base_results, baseline = traffic(service.url, 1.5)
        readers = []
        try:
            for _ in range(4):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(address(service))
                sock.sendall(tts_request(LONG))
                readers.append(sock)
            for sock in readers:  # each has its answer begun: then it reads nothing
                sock.settimeout(30)
                assert sock.recv(16).startswith(b"HTTP/1.1 200")
            held = queue(service)["in_service"]
            results, during = traffic(service.url, 2.5)
        finally:
            for sock in readers:
                sock.close()
        wait_until(lambda: settled(service), timeout=10, what="slots free")
        lag = assert_loop_lag_ok(service.url)
    results += [first, *base_results]
    # The slow readers are ours, hung up on purpose: lost counts the normal traffic.
    lost = tally_of(results).lost
    assert lost == 0 and all(r.ok for r in results), sorted({(r.status, r.error) for r in results}, key=str)
    assert held == 0, f"{held} slot(s) held by slow readers"
    assert within_tolerance(baseline, during), (percentile(baseline, 0.99), percentile(during, 0.99))
    record("slow clients: 4 slow readers of 5 MB answers", sent=len(results), lost=lost, slots_held=held,
           p99_ms=[ms(percentile(baseline, 0.99)), ms(percentile(during, 0.99))], loop_lag_ms=ms(lag))


# --- disconnects ----------------------------------------------------------------------------------


def test_disconnects_mid_upload_while_queued_and_mid_answer_free_everything(tmp_path: Path) -> None:
    # Slow enough that a long text holds its backend for ~4 s while another request waits behind it.
    with running_sidecar(tmp_path, backends=1, time_scale=0.05) as service:
        backend_url = backends(service)[0]["url"]
        admissions = Admissions.read(service.url)
        whole = [tts(service.url)]  # requests whose client waits for the answer
        began = time.monotonic()
        whole.append(tts(service.url))
        assert whole[-1].ok
        idle_took = time.monotonic() - began
        wait_until(lambda: settled(service), timeout=10, what="an idle sidecar")
        fds_before = open_fds(service.pid)
        forwarded_before = received(backend_url)

        # (a) mid-upload: half a multipart body, then the socket closes.
        request = tts_request(SHORT)
        with socket.create_connection(address(service)) as sock:
            sock.sendall(request[: len(request) // 2])
            time.sleep(0.3)  # the client stalls mid-upload, then leaves
        wait_until(lambda: settled(service) and open_fds(service.pid) <= fds_before, timeout=10,
                   what="the upload's connection gone")
        assert received(backend_url) == forwarded_before

        # (b) queued: the only slot is busy with a long text; the next request leaves while queued.
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(tts, service.url, LONG)
            wait_until(lambda: queue(service)["in_service"] == 1, timeout=10, what="the long text in service")
            with socket.create_connection(address(service)) as sock:
                sock.sendall(tts_request(SHORT + "排队"))
                wait_until(lambda: queue(service)["depth"] == 1, timeout=10, what="a queued request")
            wait_until(lambda: queue(service)["depth"] == 0, timeout=10, what="the queue to forget it")
            whole.append(running.result())
        assert whole[-1].ok
        forwarded_of_queued = received(backend_url) - forwarded_before - 1  # the long text was
        assert forwarded_of_queued == 0, "a request whose client left while queued was sent"

        # (c) running: the client leaves while the backend works on its request; the slot stays
        # busy until the backend answers (no cancellation upstream), then is freed, counted as orphaned.
        orphaned_before = queue(service)["orphaned_backend_seconds"]
        with socket.create_connection(address(service)) as sock:
            sock.sendall(tts_request(LONG + "走"))
            wait_until(lambda: queue(service)["in_service"] == 1, timeout=10, what="the request in service")
            time.sleep(0.5)  # the client stays a while into the work, then leaves
        wait_until(lambda: settled(service), timeout=15, what="the orphaned work to end")
        orphaned = queue(service)["orphaned_backend_seconds"] - orphaned_before

        # (d) mid-answer: a 5 MB answer, a little of it read, then the socket closes.
        with socket.create_connection(address(service)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(tts_request(LONG + "停"))
            sock.settimeout(30)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        wait_until(lambda: settled(service), timeout=15, what="slots free after the cut answer")
        wait_until(lambda: open_fds(service.pid) <= fds_before + 2, timeout=10, what="descriptors back")
        # A client hanging up says nothing about the backend: it stays in rotation.
        backend = backends(service)[0]
        assert backend["state"] == "ready" and backend["last_error"] is None, backend

        # No slot leaked: an idle sidecar serves the next request at once.
        began = time.monotonic()
        after = tts(service.url)
        took = time.monotonic() - began
        whole.append(after)
        fds_after = open_fds(service.pid)
        admitted = admissions.admitted_since(service.url)
        lag = assert_loop_lag_ok(service.url)
    # Lost counts the requests whose client waited; those it left (queued, running, mid-answer) are
    # not the sidecar's to answer, and show as what the sidecar admitted beyond them.
    tally = tally_of(whole)
    assert after.ok and took < 3 * idle_took + 0.5, (idle_took, took)
    assert float(after.headers["X-Queue-Wait"]) < 0.1, after.headers
    assert orphaned > 0, "a request whose client left while it ran was not counted as orphaned work"
    assert tally.lost == 0, tally.figures()
    record("slow clients: disconnects (upload, queued, running, answer)", lost=tally.lost,
           left_by_client=admitted - tally.admitted, forwarded_of_queued=forwarded_of_queued,
           orphaned_backend_s=round(orphaned, 2), fds=[fds_before, fds_after],
           next_request_ms=[ms(idle_took), ms(took)], loop_lag_ms=ms(lag))
