"""Processes and ports on loopback, for the benchmarks and the tests alike: free ports, start a
sidecar, emulators or nginx, wait until they answer, stop them.

Every process starts in its own process group with its output in a file, and is stopped by
signalling that group (never by name): SIGTERM, then SIGKILL after a grace period, then SIGKILL
again for anything the leader left in its group. A benchmark gives each run its own
``XDG_RUNTIME_DIR`` (`isolated_env`) so the emulators' shared-GPU bookkeeping
(glmtts.emulator.gpu) only ever sees the processes of that run, not those of anything else
running on the machine. Ports come from blocks this process holds a lock on (`free_ports`), so
parallel test workers and benchmarks never hand out the same one.

Each group started here is remembered until it is stopped (`own_group`, `disown_group`): when this
process exits, or a test session ends (tests/conftest.py), `end_own_groups` SIGKILLs the groups
still left, so a run cut short (a test timed out in its teardown, a benchmark interrupted) leaves
no process behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import http.client as httpclient
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
# A benchmark sidecar's admin token (unless its config sets one): /api/v1/health and /api/v1/queue
# show their details (backends, pids, counters) only to it. Never send it with TTS requests, where
# an Authorization header names a tenant.
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"


class WaitTimeout(RuntimeError):
    """A condition did not come true in time."""


class ProcessFailed(RuntimeError):
    """A process we started exited, or never answered, while we waited for it."""


class StatusError(OSError):
    """An HTTP answer other than the one expected: an OSError, as urllib's HTTPError is, so that
    callers treating "cannot be had" alike catch one type."""


# --- ports ------------------------------------------------------------------------------------

PORT_BLOCK = 128  # ports per reserved block: the most one `free_ports` call hands out
_PORT_FLOOR = 20000  # below: well-known and registered services, and the sidecar's own defaults
_LOCK_DIR = Path(tempfile.gettempdir()) / f"glmtts-ports-{os.getuid()}"


def _port_range() -> tuple[int, int]:
    """[low, high) of the ports to reserve from: below the kernel's ephemeral range, where no port
    is handed out by bind(0) or taken by an outgoing connection; above it when that leaves more."""
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    below, above = (_PORT_FLOOR, low), (high + 1, 65536)
    return below if below[1] - below[0] >= above[1] - above[0] else above


class _PortBlocks:
    """The blocks of ports this process holds, and the next port to hand out.

    A block is held with an exclusive flock(2) on a per-user lock file; the kernel releases it when
    the process exits (however it exits), so a block is never held by two live processes and
    comes free again when its holder is gone. Ports are handed out in order and never twice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[int] = []  # the lock files' descriptors, open for the life of the process
        self._next = self._end = 0

    def take(self, count: int) -> int:
        """The first of `count` consecutive ports, each free when checked, none handed out before."""
        if not 0 < count <= PORT_BLOCK:
            raise ValueError(f"1 to {PORT_BLOCK} consecutive ports at a time, not {count}")
        with self._lock:
            while True:
                if self._end - self._next < count:
                    self._next, self._end = self._reserve()
                base = self._next
                blocker = next((p for p in range(base, base + count) if not _bindable(p)), None)
                if blocker is None:
                    self._next = base + count
                    return base
                self._next = blocker + 1  # something outside this scheme holds it: skip past

    def _reserve(self) -> tuple[int, int]:
        low, high = _port_range()
        starts = list(range(low, high - PORT_BLOCK + 1, PORT_BLOCK))
        random.shuffle(starts)  # independent processes rarely try the same block first
        _LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        for start in starts:
            fd = os.open(_LOCK_DIR / f"block-{start}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._held.append(fd)
            return start, start + PORT_BLOCK
        raise RuntimeError(f"every block of {PORT_BLOCK} ports in {low}..{high - 1} is held by another process")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_BLOCKS = _PortBlocks()


def free_ports(count: int) -> int:
    """A base port with base .. base+count-1 free (the sidecar numbers its backends that way).

    The guarantee: no two live processes that take ports here (pytest-xdist workers, parallel
    test sessions, benchmarks) are ever handed the same port, and one process is never handed a
    port twice; each port was also free when handed out. What remains is the race with programs
    outside this scheme, which is small: the ports lie outside the kernel's ephemeral range, so
    nothing that binds port 0 or connects out takes them. At most `PORT_BLOCK` at a time.
    """
    return _BLOCKS.take(count)


def free_port() -> int:
    """One loopback port, with `free_ports`' guarantee."""
    return _BLOCKS.take(1)


# --- HTTP and waiting -------------------------------------------------------------------------


def http(method: str, url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP exchange with exactly these headers (no default Content-Type added, no proxy)."""
    parts = urllib.parse.urlsplit(url)
    conn = httpclient.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path or "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(url: str, timeout: float = 10.0, *, token: str | None = None, statuses: Sequence[int] = (200,)) -> Any:
    """The JSON of GET `url`. ``token``: sent as ``Authorization: Bearer`` (a sidecar's admin
    token); ``statuses``: the answers accepted, any other raises StatusError."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    status, _, body = http("GET", url, headers=headers, timeout=timeout)
    if status not in statuses:
        raise StatusError(f"GET {url}: HTTP {status} {body[:300]!r}")
    return json.loads(body)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.05) -> None:
    """Poll `predicate` every `interval` seconds until it holds; WaitTimeout after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")


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


# --- processes --------------------------------------------------------------------------------

_OWN_GROUPS: dict[int, subprocess.Popen[bytes]] = {}  # groups started here and not yet stopped, by leader pid
_OWN_GROUPS_LOCK = threading.Lock()


def own_group(popen: subprocess.Popen[bytes]) -> None:
    """Remember ``popen``, started leading its own process group (``start_new_session``), until
    ``disown_group``: ``end_own_groups`` ends it if it is still there."""
    with _OWN_GROUPS_LOCK:
        _OWN_GROUPS[popen.pid] = popen


def disown_group(popen: subprocess.Popen[bytes]) -> None:
    """``popen`` was stopped (and waited for) by its owner."""
    with _OWN_GROUPS_LOCK:
        _OWN_GROUPS.pop(popen.pid, None)


@atexit.register
def end_own_groups() -> list[int]:
    """SIGKILL every group started here and not stopped, and reap its leader; returns their pids.
    A leader already reaped is never signalled (its pid may be another process's by now)."""
    with _OWN_GROUPS_LOCK:
        left = list(_OWN_GROUPS.values())
        _OWN_GROUPS.clear()
    for popen in left:
        if popen.returncode is not None:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(10)
    return [popen.pid for popen in left]


@dataclass
class Proc:
    """A process we started, leading its own process group; output in `log_path`."""

    argv: list[str]
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    admin_token: str | None = None  # a sidecar's, from its config
    keep_log: bool = False  # `stop` leaves the log file (for reading after the process is gone)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, tail: int | None = None) -> str:
        """What it wrote so far (the last `tail` characters)."""
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
        """Signal the group with `sig`, SIGKILL it after `grace`; returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # anything the leader left in its group
        disown_group(self.proc)
        if not self.keep_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return self.proc.returncode

    def wait_http(self, path: str, timeout: float = 60.0) -> None:
        """Until GET `path` answers 200; ProcessFailed (with the output) if it exits or never does."""
        self.wait_ready(lambda: http("GET", self.url + path, timeout=2.0)[0] == 200, f"answering {path}", timeout)

    def wait_ready(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Until `ready()` is true (an OSError from it counts as not yet); ProcessFailed with the
        process's output if it exits first, or is still not `what` (its state, for the message)
        after `timeout` seconds."""

        def check() -> bool:
            if not self.alive():
                raise ProcessFailed(f"{self.argv} exited {self.proc.returncode}:\n{self.output()}")
            try:
                return ready()
            except OSError:
                return False

        try:
            wait_for(check, timeout, f"{self.url}: {what}")
        except WaitTimeout:
            raise ProcessFailed(f"{self.argv} not {what} after {timeout:g} s:\n{self.output()}") from None


def isolated_env(runtime_dir: Path, **extra: str) -> dict[str, str]:
    """Environment overrides for a run's processes: its own XDG_RUNTIME_DIR, plus `extra`."""
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return {"XDG_RUNTIME_DIR": str(runtime_dir), **extra}


def spawn(argv: Sequence[str], url: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
          unset: Sequence[str] = (), keep_log: bool = False, log_prefix: str = "glmtts-bench-") -> Proc:
    """Start `argv` in a new process group (cwd: the checkout unless given), stdout and stderr to a
    temporary file. Its environment: ours without `unset`, the checkout first on PYTHONPATH (its
    packages win wherever it runs and whatever is installed), then `env`."""
    log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)  # noqa: SIM115
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    inherited = {k: v for k, v in os.environ.items() if k not in unset}
    popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=cwd or ROOT, env={**inherited, "PYTHONPATH": path, **(env or {})},
                             start_new_session=True)
    own_group(popen)
    log.close()
    return Proc(argv=list(argv), url=url, proc=popen, log_path=Path(log.name), keep_log=keep_log)


def start_emulator(args: Sequence[str], *, timeout: float = 60.0, wait: bool = True, **spawn_args: Any) -> Proc:
    """`python -m glmtts.emulator --port P *args` on a free port (`spawn_args`: as `spawn`'s);
    with `wait`, returns once it answers its health check (stopped if it never does)."""
    port = free_port()
    proc = spawn([sys.executable, "-m", "glmtts.emulator", "--port", str(port), *args], f"http://127.0.0.1:{port}",
                 **spawn_args)
    if wait:
        try:
            proc.wait_http("/api/v1/health", timeout)
        except BaseException:
            proc.stop()
            raise
    return proc


def start_emulators(count: int, args: Sequence[str], *, gpus: Sequence[str], env: dict[str, str],
                    timeout: float = 120.0) -> list[Proc]:
    """`count` emulators (`--seed i *args`), emulator i on GPU id gpus[i % len(gpus)]
    (CUDA_VISIBLE_DEVICES, as the sidecar's `env` template gives its own), started together."""
    procs: list[Proc] = []
    try:
        for i in range(count):
            procs.append(start_emulator(["--seed", str(i), *args], wait=False,
                                        env={**env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}))
        for proc in procs:
            proc.wait_http("/api/v1/health", timeout)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


# --- sidecars ---------------------------------------------------------------------------------


def config_sections(config_text: str) -> dict[str, Any]:
    """A sidecar config's top-level sections ({} for a file that is not YAML: the sidecar will say
    what is wrong with it)."""
    try:
        data = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def configured_admin_token(config_text: str) -> str | None:
    """The admin token a sidecar config sets (``env:NAME`` read from this environment), or None."""
    admin = config_sections(config_text).get("admin")
    token = admin.get("token") if isinstance(admin, dict) else None
    if isinstance(token, str) and token.startswith("env:"):
        return os.environ.get(token[len("env:"):])
    return token if isinstance(token, str) else None


def start_sidecar(config_text: str, port: int, work_dir: Path, *, env: dict[str, str] | None = None,
                  timeout: float = 120.0, wait_ready: bool = True, admin_token: str | None = ADMIN_TOKEN,
                  **spawn_args: Any) -> Proc:
    """`python -m scheduler --config FILE` with `config_text` (FILE and the task state in `work_dir`);
    with `wait_ready`, returns once /readyz answers and then every backend is ready, each within
    `timeout` (stopped otherwise). A config without an ``admin`` section gets ``admin_token``
    (None: none); the returned process knows the token its config ends up with."""
    config = work_dir / f"sidecar-{port}.yaml"
    if "\ntasks:" not in config_text:  # task state goes to the run's own directory
        config_text += f"\ntasks: {{state_dir: {json.dumps(str(work_dir / f'tasks-{port}'))}}}\n"
    if admin_token is not None and "admin" not in config_sections(config_text):
        config_text += f"\nadmin: {{token: {admin_token}}}\n"
    config.write_text(config_text)
    proc = spawn([sys.executable, "-m", "scheduler", "--config", str(config)], f"http://127.0.0.1:{port}", env=env,
                 **spawn_args)
    proc.admin_token = configured_admin_token(config_text)
    if wait_ready:
        try:
            proc.wait_http("/readyz", timeout)
            wait_for(lambda: all(b["state"] == "ready" for b in backend_states(proc)), timeout,
                     "every backend to be ready")
        except BaseException:
            proc.stop()
            raise
    return proc


def backend_states(sidecar: Proc, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Each backend's state, pid and counters, from /api/v1/health with the sidecar's admin token
    (answered also while no backend is ready, with 503)."""
    if sidecar.admin_token is None:
        raise ValueError("this sidecar has no admin token: nobody sees its details")
    health = get_json(sidecar.url + "/api/v1/health", timeout, token=sidecar.admin_token, statuses=(200, 503))
    backends: list[dict[str, Any]] = health["backends"]
    return backends


def backend_pids(sidecar: Proc) -> list[int]:
    """The pids of the sidecar's running backends."""
    return [int(b["pid"]) for b in backend_states(sidecar) if b.get("pid")]


def reap(pids: Sequence[int], timeout: float = 15.0) -> None:
    """Wait for `pids` (children of a sidecar we stopped) to be gone; SIGKILL any straggler."""
    with contextlib.suppress(WaitTimeout):
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
