"""Emulator processes on one GPU share its throughput; processes on other GPUs, or dead ones, do not.

Like test_emulator_behaviour's contention check, these compare latencies the emulators measure
themselves (``generation_time``) with a process alone, with ±25 % for a shared machine. The curve
in most tests (G = 1.2 at 2 processes, 1.6 at 4) makes every shared case clearly slower than alone.
Each test keeps its GPU state in its own directory.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.contract_cases import multipart
from tests.support import Service, get_json, http, start_emulator, wait_until

# Latency ratios: in the "serial" xdist group (tests/conftest.py), never beside the suite's other
# heavy or timing-sensitive tests.
pytestmark = pytest.mark.xdist_group("serial")

SHORT = "今天天气很好，我们去公园散步。"
TEXT = SHORT * 4  # 56 units: ~9.2 s at time scale 1, ~0.55 s here
LONG_TEXT = SHORT * 8  # 112 units: ~1.1 s here
SCALE = 0.06
NO_NOISE = ("--jitter", "0", "--cold-factor", "1", "--load-seconds", "0")
CURVE = "1:1,2:1.2,4:1.6"
NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # whatever the test runner's GPUs, only what a test asks for


def say(server: Service, text: str) -> float:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    status, _, raw = http("POST", server.url + "/api/v1/tts", body=body,
                          headers={"Content-Type": content_type}, timeout=60)
    answer = json.loads(raw)
    assert status == 200 and answer["success"] is True, (status, answer)
    return float(answer["generation_time"])


def stats(server: Service) -> dict[str, Any]:
    result: dict[str, Any] = get_json(server.url + "/emulator/stats")
    return result


@contextlib.contextmanager
def emulators(*setups: tuple[Sequence[str], dict[str, str]]) -> Iterator[list[Service]]:
    """One emulator per (arguments, environment), all stopped on exit."""
    with contextlib.ExitStack() as stack:
        servers: list[Service] = []
        for args, env in setups:
            server = start_emulator(*NO_NOISE, *args, time_scale=SCALE, env=env)
            stack.callback(server.stop)
            servers.append(server)
        for server in servers:
            say(server, "预热")
        yield servers


def alone(servers: Sequence[Service], text: str = TEXT) -> float:
    """Mean latency of each server serving the text with nothing else running."""
    return sum(say(server, text) for server in servers) / len(servers)


def together(servers: Sequence[Service], text: str = TEXT) -> float:
    """Mean latency of every server serving the text at the same moment."""
    barrier = threading.Barrier(len(servers))

    def one(server: Service) -> float:
        barrier.wait()
        return say(server, text)

    with ThreadPoolExecutor(len(servers)) as pool:
        return sum(pool.map(one, servers)) / len(servers)


def within(measured: float, expected: float, tolerance: float = 0.25) -> bool:
    return expected * (1 - tolerance) < measured < expected * (1 + tolerance)


def test_processes_on_one_gpu_share_its_throughput(tmp_path: Path) -> None:
    # The id comes from CUDA_VISIBLE_DEVICES (first entry) as the sidecar sets it, or from --gpu.
    shared = ("--gpu-curve", CURVE, "--gpu-state-dir", str(tmp_path))
    from_env = (shared, {"CUDA_VISIBLE_DEVICES": "5,2"})
    from_flag = ((*shared, "--gpu", "5"), NO_CUDA)
    with emulators(from_env, from_env, from_flag, from_flag) as servers:
        base = alone(servers)
        pair = together(servers[:2])  # G(2) = 1.2: each at 0.6 of its solo speed
        with ThreadPoolExecutor(1) as watcher:
            seen = watcher.submit(_busy_seen_during, servers[0], lambda: together(servers))
            four, busy_seen = seen.result()  # G(4) = 1.6: each at 0.4
        info = [stats(server) for server in servers]
    assert within(pair / base, 2 / 1.2), (base, pair)
    assert within(four / base, 4 / 1.6), (base, four)
    assert busy_seen == 4
    assert {(s["gpu"], s["gpu_curve"]) for s in info} == {("5", "1:1,2:1.2,4:1.6")}
    assert list((tmp_path / "gpu-5").iterdir()) == []  # all idle again: no busy marker left


def _busy_seen_during(server: Service, work: Any) -> tuple[float, int]:
    """Run ``work`` in a thread; meanwhile, the most busy processes ``server`` reported seeing."""
    most = 0
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(work)
        while not result.done():
            most = max(most, stats(server)["gpu_busy_processes"])
            time.sleep(0.05)
        return result.result(), most


def test_the_measured_curve_is_the_default(tmp_path: Path) -> None:
    # Measured G(4) = 2.9: four requests on four processes each take 4 / 2.9 = x1.38.
    args = ("--gpu", "0", "--gpu-state-dir", str(tmp_path))
    with emulators(*[(args, NO_CUDA)] * 4) as servers:
        base = alone(servers)
        four = together(servers)
        assert stats(servers[0])["gpu_curve"] == "1:1,2:2,4:2.9,8:5.5,16:8.7,24:10"
    assert within(four / base, 4 / 2.9), (base, four)


def test_processes_on_different_gpus_do_not_slow_each_other(tmp_path: Path) -> None:
    state = ("--gpu-curve", CURVE, "--gpu-state-dir", str(tmp_path))
    with emulators(((*state, "--gpu", "a"), NO_CUDA), ((*state, "--gpu", "b"), NO_CUDA),
                   (state, {"CUDA_VISIBLE_DEVICES": "c"}), (state, NO_CUDA)) as servers:
        base = alone(servers)
        all_at_once = together(servers)
        info = [stats(server) for server in servers]
    assert within(all_at_once / base, 1.0), (base, all_at_once)
    assert [s["gpu"] for s in info] == ["a", "b", "c", None]
    assert info[3]["gpu_busy_processes"] == 0 and info[3]["gpu_speed"] == 1.0


def test_a_process_killed_mid_request_stops_counting(tmp_path: Path) -> None:
    # G(2) = 1.2: while both are busy each runs at 0.6. Killing one after d seconds leaves the
    # survivor W + 0.4 d to finish a request of W alone; a dead process still counted gives W / 0.6.
    args = ("--gpu", "7", "--gpu-curve", "1:1,2:1.2", "--gpu-state-dir", str(tmp_path))
    with emulators((args, NO_CUDA), (args, NO_CUDA)) as (survivor, victim):
        base = alone([survivor], LONG_TEXT)
        with ThreadPoolExecutor(2) as pool:
            submitted = time.monotonic()
            running = pool.submit(say, survivor, LONG_TEXT)
            doomed = pool.submit(say, victim, LONG_TEXT)
            wait_until(lambda: stats(survivor)["gpu_busy_processes"] == 2, timeout=base,
                       what="the survivor to see both processes busy")
            time.sleep(max(0.0, submitted + 0.35 - time.monotonic()))
            killed_after = time.monotonic() - submitted
            victim.stop(signal.SIGKILL)
            assert stats(survivor)["in_flight"] == 1  # still at work, and now alone
            wait_until(lambda: stats(survivor)["gpu_busy_processes"] == 1, timeout=base,
                       what="the survivor to stop counting the dead process")
            latency = running.result()
            assert doomed.exception() is not None  # its connection died with it
    expected = base + 0.4 * killed_after
    assert within(latency, expected), (base, killed_after, latency, expected, base / 0.6)
    assert list((tmp_path / "gpu-7").iterdir()) == []  # the dead one's marker was cleared too
