"""backends.slots end to end: a fixed limit caps each backend; auto learns a backend's knee.

The emulator shares one process among its requests along a throughput curve (``--throughput``),
as GLM-TTS shares a GPU among threads; the sidecar sees only how long requests take."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import WaitTimeout
from tests.contract_cases import multipart
from tests.support import (
    Service,
    details,
    get_json,
    http,
    running_sidecar,
    sidecar_config,
    start_sidecar,
    wait_until,
)

SHORT = "今天天气很好，出去走走。"[:10]  # 10 units: ~1.9 s on a GPU
LONG = ("从前有一座山，山上有一座庙，庙里有一个老和尚在给小和尚讲故事。" * 8)[:200]  # 200 units: ~32 s
KNEE = "1,1.9,2.6,2.75"  # total throughput at 1..4 in flight: 2.75 / 2.6 < 1.1, so 3 is the knee


def tts(service: Service, text: str) -> int:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    status, _, _ = http("POST", service.url + "/api/v1/tts", body=body, headers={"Content-Type": content_type},
                        timeout=60)
    return status


def closed_loop(service: Service, clients: int, stop: threading.Event) -> list[int]:
    """``clients`` callers, each sending the next request (short and long in turn) as soon as its
    last one is answered, until ``stop``."""
    statuses: list[int] = []

    def client(n: int) -> None:
        i = n
        while not stop.is_set():
            statuses.append(tts(service, (SHORT if i % 2 else LONG) + str(i)))
            i += clients

    with ThreadPoolExecutor(clients) as pool:
        for n in range(clients):
            pool.submit(client, n)
        stop.wait()
    return statuses


def backends(service: Service) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = details(service, "/api/v1/queue")["backends"]
    return found


def slot_gauges(service: Service) -> dict[str, float]:
    _, _, raw = http("GET", service.url + "/metrics")
    return {s.labels["backend"]: s.value for family in text_string_to_metric_families(raw.decode())
            if family.name == "glmtts_sidecar_backend_slots" for s in family.samples}


def test_fixed_slots_cap_every_backend(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, backends=2, slots=2, time_scale=0.02) as service, \
            ThreadPoolExecutor(1) as load:
        stop = threading.Event()
        statuses = load.submit(closed_loop, service, 8, stop)
        time.sleep(2.0)  # the load runs this long: the caps must hold all through it
        stop.set()
        assert set(statuses.result()) == {200}
        assert slot_gauges(service) == {"gpu0-0": 2.0, "gpu1-0": 2.0}
        for backend in backends(service):
            assert (backend["slots"], backend["slot_mode"]) == (2, "fixed")
            assert get_json(backend["url"] + "/emulator/stats")["max_in_flight"] == 2


# Throughput measured per slot count: alone, with nothing else running (tests/conftest.py), so every
# other worker waits ~15 s: slow. The learning itself is covered in the default suite on simulated
# curves (tests/unit/test_concurrency.py), and auto mode on a live sidecar by the reload test below.
@pytest.mark.slow
@pytest.mark.xdist_group("serial")
@pytest.mark.alone
def test_auto_slots_settle_at_the_knee_of_the_throughput_curve(tmp_path: Path) -> None:
    # No jitter and no cold start: what varies is the length of the texts (17x) and the sidecar's
    # own overhead. The cost priors are the emulator's, so the solo estimate of each text is right.
    extra = "max_slots: 4\nadaptive: {samples: 8, reprobe_s: 600}"
    emulator_args = ["--throughput", KNEE, "--jitter", "0", "--cold-factor", "1"]
    with running_sidecar(tmp_path, backends=1, slots="auto", time_scale=0.03, emulator_args=emulator_args,
                         backend_extra=extra) as service, ThreadPoolExecutor(1) as load:
        assert slot_gauges(service) == {"gpu0-0": 1.0}  # auto starts at 1
        stop = threading.Event()
        statuses = load.submit(closed_loop, service, 8, stop)
        started = time.monotonic()
        try:
            # Learned: 1, 2 and 3 each beat the level below by over 10 %; 4 was tried and dropped.
            def judged() -> bool:
                state = details(service, "/api/v1/queue")["slots"]["gpu0-0"]
                return not state["probing"] and "4" in state["levels"] and state["slots"] < 4

            # ~15 s alone; beside the suite's other workers on 2 cores it has taken over 35 s.
            try:
                wait_until(judged, timeout=90, what="the probe of 4 slots to be judged")
            except WaitTimeout:  # say what the limit had learned by then
                pytest.fail(f"the probe of 4 slots was not judged in 90 s: "
                            f"{json.dumps(details(service, '/api/v1/queue')['slots'])}")
        finally:
            stop.set()
        learned_s = time.monotonic() - started
        assert set(statuses.result()) == {200}
        state = details(service, "/api/v1/queue")["slots"]["gpu0-0"]
        throughput = {int(k): v["throughput"] for k, v in state["levels"].items()}
        print(f"learned in {learned_s:.1f} s: {json.dumps(state)}")
        assert (state["mode"], state["slots"], state["max_slots"]) == ("auto", 3, 4), state
        assert throughput[2] > 1.1 * throughput[1] and throughput[3] > 1.1 * throughput[2], state
        assert slot_gauges(service) == {"gpu0-0": 3.0}
        backend = backends(service)[0]
        assert (backend["slots"], backend["slot_mode"]) == (3, "auto")
        assert get_json(backend["url"] + "/emulator/stats")["max_in_flight"] <= 4  # never past max_slots


def test_a_reload_switches_between_fixed_and_auto(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=1, slots=2)
    service = start_sidecar(text, port, tmp_path)
    config = tmp_path / f"sidecar-{port}.yaml"
    text = config.read_text()  # as started (start_sidecar adds the task directory)
    try:
        pid = backends(service)[0]["pid"]
        assert (backends(service)[0]["slots"], backends(service)[0]["slot_mode"]) == (2, "fixed")
        config.write_text(text.replace("slots: 2", "slots: auto\n  max_slots: 3"))
        os.kill(service.pid, signal.SIGHUP)
        wait_until(lambda: backends(service)[0]["slot_mode"] == "auto", what="slots: auto")
        assert backends(service)[0]["slots"] == 1 and slot_gauges(service) == {"gpu0-0": 1.0}
        assert details(service, "/api/v1/queue")["slots"]["gpu0-0"]["max_slots"] == 3
        assert tts(service, SHORT) == 200
        config.write_text(text)
        os.kill(service.pid, signal.SIGHUP)
        wait_until(lambda: backends(service)[0]["slot_mode"] == "fixed", what="slots: 2 again")
        assert backends(service)[0]["slots"] == 2 and backends(service)[0]["pid"] == pid  # no restart
    finally:
        service.stop()
