"""scheduler.runtime.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.runtime.sdnotify import Notifier, ServiceStatus, watchdog_interval, watchdog_loop


@contextlib.contextmanager
def receiver(address: str) -> Iterator[socket.socket]:
    """A datagram socket bound where ``$NOTIFY_SOCKET=address`` points."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(1.0)
    try:
        yield sock
    finally:
        sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    lines = sock.recv(4096).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


def pending(sock: socket.socket) -> list[dict[str, str]]:
    sock.setblocking(False)
    messages = []
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines()))
    return messages


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    address = str(tmp_path / "notify")
    with receiver(address) as sock:
        yield address, sock


def test_messages_reach_a_path_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("2/2 backends ready")
    assert received(sock) == {"READY": "1", "STATUS": "2/2 backends ready"}
    assert notifier.stopping()
    assert received(sock) == {"STOPPING": "1"}
    assert notifier.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}
    assert notifier.notify(EXTEND_TIMEOUT_USEC=5_000_000)
    assert received(sock) == {"EXTEND_TIMEOUT_USEC": "5000000"}
    notifier.close()


def test_messages_reach_an_abstract_socket() -> None:
    address = f"@glmtts-sidecar-test-{uuid.uuid4().hex}"
    with receiver(address) as sock:
        notifier = Notifier(address)
        assert notifier.status("warming up")
        assert received(sock) == {"STATUS": "warming up"}


def test_reloading_carries_the_monotonic_clock(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(address).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = received(sock)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_newlines_cannot_inject_fields(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    Notifier(address).status("line one\nREADY=1\r\nthree")
    assert received(sock) == {"STATUS": "line one READY=1 three"}


def test_without_notify_socket_everything_is_a_no_op() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}):
        notifier = Notifier.from_environ(env)
        assert not notifier.enabled and notifier.watchdog_s is None
        assert not notifier.ready() and not notifier.watchdog() and not notifier.status("x")


def test_an_unsupported_address_disables_notifying(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier("vsock:2:1234")
    assert not notifier.enabled and not notifier.ready()
    assert "not a path" in caplog.text


def test_send_errors_are_swallowed_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert not notifier.ready()
    assert not notifier.watchdog()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0].getMessage()


def test_from_environ_can_unset_what_children_must_not_inherit(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    notifier = Notifier.from_environ(env, unset=True)
    assert notifier.address == str(tmp_path / "s") and notifier.watchdog_s == 30.0
    assert env == {"OTHER": "kept"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "1500"}, 0.0015),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, 60.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_pid_defaults_to_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[dict[str, object]] = []

    def notify(self, **fields: object) -> bool:
        self.sent.append(fields)
        return True


async def run_briefly(notifier: Notifier, healthy: list[bool], *, interval: float = 0.02,
                      duration: float) -> None:
    task = asyncio.ensure_future(watchdog_loop(notifier, interval, lambda: healthy[0]))
    await asyncio.sleep(duration)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_watchdog_loop_pings_every_interval() -> None:
    notifier = Recorder()
    await run_briefly(notifier, [True], duration=0.07)  # pings at 0, 0.02, 0.04, 0.06
    assert len(notifier.sent) >= 3
    assert all(fields == {"WATCHDOG": 1} for fields in notifier.sent)


async def test_watchdog_loop_stays_silent_while_unhealthy() -> None:
    notifier = Recorder()
    await run_briefly(notifier, [False], duration=0.04)
    assert notifier.sent == []


async def test_watchdog_loop_over_a_real_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    await run_briefly(Notifier(address), [True], duration=0.03)
    messages = pending(sock)
    assert len(messages) >= 2 and all(m == {"WATCHDOG": "1"} for m in messages)


def test_service_status_sends_ready_once_listening_with_a_ready_backend() -> None:
    recorder = Recorder()
    status = ServiceStatus(recorder)
    status.backends(0, 2)
    status.backends(0, 2)  # unchanged: not repeated
    status.listening()
    status.backends(1, 2)
    status.backends(2, 2)
    assert recorder.sent == [
        {"STATUS": "0/2 backends ready; not listening yet"},
        {"STATUS": "0/2 backends ready"},
        {"READY": 1, "STATUS": "1/2 backends ready"},
        {"STATUS": "2/2 backends ready"},
    ]
    assert status.ready


def test_service_status_ready_waits_for_listening() -> None:
    recorder = Recorder()
    status = ServiceStatus(recorder)
    status.backends(1, 1)
    assert recorder.sent == [{"STATUS": "1/1 backends ready; not listening yet"}]
    status.listening()
    assert recorder.sent[-1] == {"READY": 1, "STATUS": "1/1 backends ready"}


def test_service_status_reload_is_bracketed_by_reloading_and_ready() -> None:
    recorder = Recorder()
    status = ServiceStatus(recorder)
    status.listening()
    status.backends(1, 1)
    recorder.sent.clear()
    status.reloading()
    status.backends(0, 1)  # during the reload: no STATUS, the READY=1 that ends it says it all
    status.reloaded(ok=False)
    assert [set(m) for m in recorder.sent] == [{"RELOADING", "MONOTONIC_USEC", "STATUS"}, {"READY", "STATUS"}]
    assert recorder.sent[-1]["STATUS"] == "0/1 backends ready; last reload refused"


def test_service_status_reload_before_ready_or_while_stopping_sends_nothing() -> None:
    recorder = Recorder()
    status = ServiceStatus(recorder)
    status.reloading()
    status.reloaded(ok=True)
    assert recorder.sent == []
    status.listening()
    status.backends(1, 1)
    status.stopping()
    status.stopping()
    recorder.sent.clear()
    status.reloading()
    status.reloaded(ok=True)
    status.backends(0, 1)
    assert recorder.sent == []


def test_service_status_stopping_is_sent_once() -> None:
    recorder = Recorder()
    status = ServiceStatus(recorder)
    status.stopping()
    status.stopping()
    assert [m.get("STOPPING") for m in recorder.sent] == [1]


def test_service_status_overlapping_reloads_send_one_pair() -> None:
    recorder = Recorder()
    status = ServiceStatus(recorder)
    status.listening()
    status.backends(1, 1)
    recorder.sent.clear()
    status.reloading()
    status.reloading()
    status.reloaded(ok=True)
    assert [m.get("RELOADING") for m in recorder.sent] == [1]
    status.reloaded(ok=True)
    assert recorder.sent[-1] == {"READY": 1, "STATUS": "1/1 backends ready"} and len(recorder.sent) == 2
