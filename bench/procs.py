"""Processes and ports for the benchmarks: start a sidecar, emulators or nginx on loopback, stop them.

Every process starts in its own process group with its output in a file, and is stopped by
signalling that group (never by name). A benchmark gives each run its own ``XDG_RUNTIME_DIR``
(`isolated_env`) so the emulators' shared-GPU bookkeeping (glmtts.emulator.gpu) only ever sees the
processes of that run, not those of anything else running on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# A benchmark sidecar's admin token (unless its config sets one): /api/v1/health and /api/v1/queue
# show their details (backends, pids, counters) only to it. Never send it with TTS requests, where
# an Authorization header names a tenant.
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """A base port with base .. base+count-1 all free now (the sidecar numbers backends that way)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def get_json(url: str, timeout: float = 10.0, *, token: str | None = None) -> Any:
    """GET ``url``; ``token``: sent as ``Authorization: Bearer`` (a sidecar's admin token)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        return json.loads(resp.read())


def pid_gone(pid: int) -> bool:
    """True when `pid` no longer exists or is a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Proc:
    """A process we started, leading its own process group; output in `log_path`."""

    argv: list[str]
    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    admin_token: str | None = None  # a sidecar's

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it after `grace`; also removes the log file."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # anything the leader left in its group
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def wait_http(self, path: str, timeout: float = 60.0) -> None:
        def answers() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.argv} exited {self.popen.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2.0) as resp:
                    return bool(resp.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        try:
            wait_for(answers, timeout, f"{self.url}{path}")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.output()}") from None


def isolated_env(runtime_dir: Path, **extra: str) -> dict[str, str]:
    """Environment overrides for a run's processes: its own XDG_RUNTIME_DIR, plus `extra`."""
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return {"XDG_RUNTIME_DIR": str(runtime_dir), **extra}


def spawn(argv: Sequence[str], url: str, *, env: dict[str, str] | None = None) -> Proc:
    log = tempfile.NamedTemporaryFile(prefix="glmtts-bench-", suffix=".log", delete=False)  # noqa: SIM115
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": path, **(env or {})},
                             start_new_session=True)
    log.close()
    return Proc(argv=list(argv), url=url, popen=popen, log_path=Path(log.name))


def start_emulators(count: int, args: Sequence[str], *, gpus: Sequence[str], env: dict[str, str],
                    timeout: float = 120.0) -> list[Proc]:
    """`count` emulators (`python -m glmtts.emulator --port P *args`), emulator i on GPU id
    gpus[i % len(gpus)] (CUDA_VISIBLE_DEVICES, as the sidecar's `env` template gives its own)."""
    procs: list[Proc] = []
    try:
        for i in range(count):
            port = free_port()
            argv = [sys.executable, "-m", "glmtts.emulator", "--port", str(port), "--seed", str(i), *args]
            procs.append(spawn(argv, f"http://127.0.0.1:{port}",
                               env={**env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}))
        for proc in procs:
            proc.wait_http("/api/v1/health", timeout)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


def start_sidecar(config_text: str, port: int, work_dir: Path, *, env: dict[str, str] | None = None,
                  timeout: float = 120.0) -> Proc:
    """`python -m scheduler --config FILE` with `config_text`; returns once every backend is ready.
    A config without an ``admin:`` section gets ``ADMIN_TOKEN``."""
    config = work_dir / f"sidecar-{port}.yaml"
    if "\ntasks:" not in config_text:
        config_text += f"\ntasks: {{state_dir: {json.dumps(str(work_dir / f'tasks-{port}'))}}}\n"
    token = None
    if not config_text.startswith("admin:") and "\nadmin:" not in config_text:
        config_text += f"\nadmin: {{token: {ADMIN_TOKEN}}}\n"
        token = ADMIN_TOKEN
    config.write_text(config_text)
    proc = spawn([sys.executable, "-m", "scheduler", "--config", str(config)], f"http://127.0.0.1:{port}", env=env)
    proc.admin_token = token
    try:
        proc.wait_http("/readyz", timeout)
        wait_for(lambda: all(b["state"] == "ready" for b in backend_states(proc)), timeout,
                 "every backend to be ready")
    except BaseException:
        proc.stop()
        raise
    return proc


def backend_states(sidecar: Proc) -> list[dict[str, Any]]:
    backends: list[dict[str, Any]] = get_json(sidecar.url + "/api/v1/health", token=sidecar.admin_token)["backends"]
    return backends


def backend_pids(sidecar: Proc) -> list[int]:
    return [int(b["pid"]) for b in backend_states(sidecar) if b.get("pid")]


def reap(pids: Sequence[int], timeout: float = 15.0) -> None:
    """Wait for `pids` (children of a sidecar we stopped) to be gone; SIGKILL any straggler."""
    with contextlib.suppress(RuntimeError):
        wait_for(lambda: all(pid_gone(p) for p in pids), timeout, "backends to exit")
    for pid in pids:
        if not pid_gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of `pid`, KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields
