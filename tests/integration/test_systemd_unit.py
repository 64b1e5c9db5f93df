"""The systemd unit (checked by ``systemd-analyze verify``) and the sidecar's sd_notify messages, read
from a real datagram socket the way systemd would."""

from __future__ import annotations

import configparser
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import scheduler.http.app
from tests.support import (
    ROOT,
    backend_details,
    configured_admin_token,
    http,
    sidecar_config,
    start_process,
    wait_until,
)

UNIT = ROOT / "systemd" / "glmtts-sidecar.service"
PRODUCTION = ROOT / "config" / "glmtts-production.yaml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def verify(unit: Path) -> str:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          check=False)
    return (done.stdout + done.stderr).strip()


def unit_values(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


@needs_analyze
def test_the_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    # Only what cannot hold on a test machine changes: the program exists here, and so do the account.
    user = pwd.getpwuid(0).pw_name
    group = grp.getgrgid(0).gr_name
    text = UNIT.read_text()
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={sys.executable}", text)
    text = re.sub(r"(?m)^User=.*$", f"User={user}", text)
    text = re.sub(r"(?m)^Group=.*$", f"Group={group}", text)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    assert verify(copy) == ""


@needs_analyze
def test_the_unit_as_shipped_only_misses_its_program() -> None:
    program = unit_values(UNIT.read_text())["Service"]["ExecStart"].split()[0]
    lines = verify(UNIT).splitlines()
    assert all(program in line and "not executable" in line for line in lines), lines


def test_the_stop_and_start_timeouts_cover_the_production_example() -> None:
    service = unit_values(UNIT.read_text())["Service"]
    config = yaml.safe_load(PRODUCTION.read_text())
    drain = config["shutdown"]["drain_timeout_s"] + config["backends"]["stop_grace_s"]
    assert float(service["TimeoutStopSec"]) > drain
    assert float(service["TimeoutStartSec"]) > config["backends"]["health"]["start_timeout_s"]
    assert service["Type"] == "notify" and service["KillMode"] == "mixed" and "PrivateDevices" not in service


# --- the running sidecar ---------------------------------------------------------------------------


@dataclass
class FakeSystemd:
    """A NOTIFY_SOCKET receiver; when READY=1 arrives, it asks /readyz at once, like a unit ordered
    after ours would start talking to it."""

    address: str
    url: str
    messages: list[dict[str, str]] = field(default_factory=list)
    readyz_at_ready: list[int] = field(default_factory=list)

    def fields(self, key: str) -> list[str]:
        return [m[key] for m in list(self.messages) if key in m]

    def index(self, key: str, start: int = 0) -> int:
        return next(i for i, m in enumerate(list(self.messages)) if i >= start and key in m)

    def receive(self, sock: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            if message.get("READY") == "1":
                status, _, _ = http("GET", self.url + "/readyz", timeout=5)
                self.readyz_at_ready.append(status)
            self.messages.append(message)


@contextlib.contextmanager
def fake_systemd(url: str) -> Iterator[FakeSystemd]:
    directory = tempfile.mkdtemp(prefix="sdn-")  # AF_UNIX paths must stay short
    address = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.1)
    systemd = FakeSystemd(address, url)
    stop = threading.Event()
    thread = threading.Thread(target=systemd.receive, args=(sock, stop), daemon=True)
    thread.start()
    try:
        yield systemd
    finally:
        stop.set()
        thread.join(5)
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(not hasattr(scheduler.http.app, "SYSTEMD"),
                    reason="scheduler.http.app does not report to systemd yet")
def test_the_sidecar_reports_ready_reload_and_stop(tmp_path: Path) -> None:
    text, port = sidecar_config(backends=2)
    config = tmp_path / "sidecar.yaml"
    config.write_text(text)
    url = f"http://127.0.0.1:{port}"
    with fake_systemd(url) as systemd:
        service = start_process([sys.executable, "-m", "scheduler", "--config", str(config)], url,
                                env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "1000000"})
        service.admin_token = configured_admin_token(text)
        try:
            wait_until(lambda: "1" in systemd.fields("READY") or not service.alive(), timeout=60, what="READY=1")
            assert service.alive(), service.output()
            assert systemd.readyz_at_ready == [200]
            assert systemd.fields("STATUS")[0].startswith("0/2 backends ready")
            wait_until(lambda: "2/2 backends ready" in systemd.fields("STATUS"), what="STATUS with both ready")
            wait_until(lambda: len(systemd.fields("WATCHDOG")) >= 2, timeout=5, what="watchdog pings")

            # The backends must not talk to systemd as the sidecar.
            for backend in backend_details(service):
                environ = Path(f"/proc/{backend['pid']}/environ").read_bytes().split(b"\0")
                assert not any(entry.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for entry in environ)

            os.kill(service.pid, signal.SIGHUP)
            wait_until(lambda: "1" in systemd.fields("RELOADING"), what="RELOADING=1")
            reloading = systemd.index("RELOADING")
            assert int(systemd.messages[reloading]["MONOTONIC_USEC"]) > 0
            wait_until(lambda: systemd.fields("READY").count("1") == 2, what="READY=1 after the reload")
            assert systemd.index("READY", reloading) > reloading

            os.kill(service.pid, signal.SIGTERM)
            wait_until(lambda: "1" in systemd.fields("STOPPING"), what="STOPPING=1")
            assert service.proc.wait(30) == 0, service.output()
            assert systemd.fields("READY").count("1") == 2  # nothing claims readiness while stopping
        finally:
            service.stop()

