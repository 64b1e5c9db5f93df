"""Abusing the async task routes against a real sidecar: header bytes that are not UTF-8, clients
that hang up while a big upload is being stored. Neither may cost a backend slot, a queue place or
disk: afterwards no slot is in use (read from /metrics), nothing is queued, no request body is left
on disk, and the next synchronous request is served at once."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.contract_cases import multipart
from tests.reliability.support import assert_loop_lag_ok, record
from tests.support import Service, http, running_sidecar, wait_until

SHORT = "今天天气很好。"
UPLOAD_BYTES = 15 * 1024 * 1024
FINISHED = ("succeeded", "failed", "expired", "cancelled")


@dataclass
class Sidecar:
    service: Service
    state: Path  # tasks.state_dir

    @property
    def port(self) -> int:
        return int(self.service.url.rsplit(":", 1)[1])


@pytest.fixture()
def sidecar(tmp_path: Path) -> Iterator[Sidecar]:
    state = tmp_path / "task-state"
    # One backend with one slot: a single leaked slot would stall every request after it.
    with running_sidecar(tmp_path, backends=1, time_scale=0.01,
                         extra=f"tasks: {{state_dir: {json.dumps(str(state))}}}\n") as service:
        yield Sidecar(service, state)


def slots_and_queue(service: Service) -> tuple[int, int]:
    """Backend slots in use and requests queued, from /metrics."""
    status, _, body = http("GET", service.url + "/metrics")
    assert status == 200
    in_flight = queued = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "glmtts_sidecar_backend_in_flight":
                in_flight += sample.value
            elif sample.name == "glmtts_sidecar_queue_depth":
                queued += sample.value
    return round(in_flight), round(queued)


def exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 15.0) -> tuple[int | None, bytes]:
    """Send one request of exact bytes; (status, body) of the answer, status None when none came whole."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    top, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None, data
    return int(top.split(b" ", 2)[1]), rest


def served_now(service: Service) -> tuple[bool, float]:
    """A synchronous TTS request: (answered 200, seconds it waited in the queue)."""
    content_type, body = multipart(("input_text", SHORT), ("index", "exampleA"))
    status, headers, _ = http("POST", service.url + "/api/v1/tts", body=body,
                              headers={"Content-Type": content_type}, timeout=30)
    return status == 200, float(headers.get("X-Queue-Wait", "inf"))


def stored(state: Path) -> list[tuple[str, str]]:
    """(id, state) of every stored task."""
    db = sqlite3.connect(f"file:{state / 'tasks.sqlite3'}?mode=ro", uri=True)
    try:
        return [(str(i), str(s)) for i, s in db.execute("SELECT id, state FROM tasks")]
    finally:
        db.close()


URLENCODED = b"Content-Type: application/x-www-form-urlencoded\r\n"
FORM = b"input_text=hello&index=exampleA"


def test_header_bytes_that_are_not_utf8_on_the_task_routes_are_refused(sidecar: Sidecar) -> None:
    service = sidecar.service
    accepted = json.loads(http("POST", service.url + "/api/v1/tasks", body=FORM, headers={
        "Content-Type": "application/x-www-form-urlencoded"})[2])["task_id"]
    wait_until(lambda: slots_and_queue(service) == (0, 0), timeout=20, what="the first task to finish")
    tasks = f"/api/v1/tasks/{accepted}".encode()
    cases = {  # (request head without Content-Length, body, the header the answer must name)
        "Content-Type on POST /api/v1/tasks": (
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: s\r\nContent-Type: application/x-www-form-urlencoded; x=\xff\r\n",
            FORM, "Content-Type"),
        "X-Callback-URL on POST /api/v1/tasks": (
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: s\r\n" + URLENCODED + b"X-Callback-URL: http://hooks/\xff\r\n",
            FORM, "X-Callback-URL"),
        "Authorization on POST /api/v1/tasks": (
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: s\r\n" + URLENCODED + b"Authorization: Bearer k\xffey\r\n",
            FORM, "Authorization"),
        "Content-Type with Prefer: respond-async": (
            b"POST /api/v1/tts HTTP/1.1\r\nHost: s\r\nPrefer: respond-async\r\n"
            b"Content-Type: application/x-www-form-urlencoded; x=\xfe\r\n", FORM, "Content-Type"),
        "Authorization on GET /api/v1/tasks/{id}": (
            b"GET " + tasks + b" HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer \xff\r\n", b"", "Authorization"),
        "X-Callback-URL on GET /api/v1/tasks/{id}/audio": (
            b"GET " + tasks + b"/audio HTTP/1.1\r\nHost: s\r\nX-Callback-URL: \xff\r\n", b"", "X-Callback-URL"),
        "Content-Type on DELETE /api/v1/tasks/{id}": (
            b"DELETE " + tasks + b" HTTP/1.1\r\nHost: s\r\nContent-Type: text/\xff\r\n", b"", "Content-Type"),
    }
    # Each twice: once is enough to take a slot for good where nothing gives it back.
    answers = [(name, header, *exchange(sidecar.port, head, body))
               for name, (head, body, header) in cases.items() for _ in range(2)]
    statuses = [status for _, _, status, _ in answers]
    # The synchronous route answers the same Content-Type as upstream does: a urlencoded form is read
    # whatever its parameters say, so it is served.
    sync_head = b"POST /api/v1/tts HTTP/1.1\r\nHost: s\r\nContent-Type: application/x-www-form-urlencoded; x=\xff\r\n"
    sync = [exchange(sidecar.port, sync_head, FORM)[0] for _ in range(2)]
    slots, queued = slots_and_queue(service)
    ok, waited = served_now(service)
    lag = assert_loop_lag_ok(service.url)
    # Admitted: the synchronous requests (the refused ones never became work).
    record("tasks: header bytes that are not UTF-8 (7 routes x 2)", lost=sync.count(None) + int(not ok),
           unanswered=statuses.count(None), statuses=sorted({s for s in statuses if s is not None}),
           slots_in_use=slots, queued=queued, next_request_queue_s=round(waited, 3),
           loop_lag_ms=round(lag * 1000, 1))
    for name, header, status, payload in answers:
        assert status == 400, (name, status, payload[:300])
        refusal = json.loads(payload)
        assert refusal["reason"] == "non_ascii_header" and refusal["header"] == header, (name, refusal)
    assert sync == [200, 200], sync
    assert [t for t in stored(sidecar.state) if t[0] != accepted] == []
    assert (slots, queued) == (0, 0)
    assert ok and waited < 1.0, waited


def test_clients_hanging_up_while_a_15_mb_upload_is_stored_take_nothing(sidecar: Sidecar) -> None:
    service = sidecar.service
    # A valid form with a 15 MB file part (the prompt audio of upload mode, unused beside an index).
    content_type, body = multipart(("input_text", SHORT), ("index", "exampleA"),
                                   ("prompt_audio", ("big.wav", b"\0" * UPLOAD_BYTES)))
    head = (f"POST /api/v1/tasks HTTP/1.1\r\nHost: s\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    # The whole body, then the connection closes after a pause: early pauses end while the body is
    # read or parsed, later ones while it is written to disk, the latest after the 202 went out.
    pauses = (0.0, 0.01, 0.02, 0.05, 0.08, 0.12, 0.2, 0.35)
    for pause in pauses:
        with socket.create_connection(("127.0.0.1", sidecar.port), timeout=30) as sock:
            sock.sendall(head + body)
            time.sleep(pause)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    # Every task that was stored runs to its end; every other one was removed again.
    wait_until(lambda: all(state in FINISHED for _, state in stored(sidecar.state))
               and slots_and_queue(service) == (0, 0), timeout=60, what="stored tasks to finish")
    tasks = stored(sidecar.state)
    unfinished = [t for t in tasks if t[1] not in FINISHED]
    bodies = sorted(p.name for p in (sidecar.state / "requests").iterdir())
    slots, queued = slots_and_queue(service)
    ok, waited = served_now(service)
    lag = assert_loop_lag_ok(service.url)
    record("tasks: clients hang up while a 15 MB upload is stored (8 pauses)", lost=len(unfinished) + (not ok),
           stored=len(tasks), removed=len(pauses) - len(tasks), bodies_left=len(bodies), slots_in_use=slots,
           queued=queued, next_request_queue_s=round(waited, 3), loop_lag_ms=round(lag * 1000, 1))
    assert unfinished == []
    assert bodies == [], "a request body outlived its task (or a task that was never accepted)"
    assert (slots, queued) == (0, 0)
    assert ok and waited < 1.0, waited
