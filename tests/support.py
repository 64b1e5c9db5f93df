"""Helpers for tests that run real processes on loopback: free ports, start, wait, clean up."""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Free ports and process checks are the benchmarks' too: one copy, in bench.procs.
from bench.procs import free_port as free_port
from bench.procs import free_ports as free_ports
from bench.procs import pid_gone as pid_gone

ROOT = Path(__file__).resolve().parent.parent
# The admin token `sidecar_config` writes unless told otherwise: /api/v1/health and /api/v1/queue
# show their details (backends, pids, tenants, slots) only to it. Send it to those and to admin
# endpoints only: on /api/v1/tts an Authorization header is a tenant key, and this one is nobody's.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def http(method: str, url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP exchange with exactly these headers (no default Content-Type added)."""
    parts = urllib.parse.urlsplit(url)
    conn = httpclient.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path or "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(url: str, timeout: float = 10.0) -> Any:
    status, _, body = http("GET", url, timeout=timeout)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


@dataclass
class Service:
    """A process we started, in its own process group, with its output in a file."""

    argv: list[str]
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    admin_token: str | None = None  # a sidecar's, from its config

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Whatever the leader left in its group (it should be nothing) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def start_process(argv: Sequence[str], url: str, *, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> Service:
    log = tempfile.NamedTemporaryFile(prefix="glmtts-test-", suffix=".log", delete=False)  # noqa: SIM115
    # The checkout's packages win even when a process runs elsewhere (cwd) or nothing is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # Emulators sharing a GPU id slow each other down (glmtts.emulator.gpu): a runner's own
    # CUDA_VISIBLE_DEVICES must not make every test's backends share one; a test asks for it.
    inherited = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=cwd or ROOT, env={**inherited, "PYTHONPATH": path, **(env or {})},
                            start_new_session=True)
    log.close()
    return Service(argv=list(argv), url=url, proc=proc, log_path=Path(log.name))


def wait_http(service: Service, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise AssertionError(f"{service.argv} exited {service.proc.returncode}:\n{service.output()}")
        try:
            status, _, _ = http("GET", service.url + path, timeout=2.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{service.argv} not answering {path} after {timeout} s:\n{service.output()}")


def start_emulator(*args: str, env: dict[str, str] | None = None, time_scale: float = 0.01,
                   wait: bool = True, cwd: Path | None = None) -> Service:
    port = free_port()
    argv = [sys.executable, "-m", "glmtts.emulator", "--port", str(port), "--time-scale", str(time_scale),
            *args]
    service = start_process(argv, f"http://127.0.0.1:{port}", env=env, cwd=cwd)
    if wait:
        try:
            wait_http(service, "/api/v1/health")
        except BaseException:
            service.stop()
            raise
    return service


@contextlib.contextmanager
def emulator(*args: str, **kwargs: Any) -> Iterator[Service]:
    service = start_emulator(*args, **kwargs)
    try:
        yield service
    finally:
        service.stop()


def sidecar_config(*, backends: int = 2, slots: int | str = 1, time_scale: float = 0.01,
                   emulator_args: Sequence[str] = (), extra: str = "", warmup: bool = False,
                   command: Sequence[str] | None = None, backend_extra: str = "",
                   restart: str = "{backoff_initial_s: 0.2, backoff_max_s: 2.0}",
                   admin_token: str | None = ADMIN_TOKEN) -> tuple[str, int]:
    """A sidecar YAML config on free loopback ports; returns (yaml, listen port).

    The cost priors are the seed's, scaled like the emulators' timing. Warm-up is off unless asked
    for, so tests can count every request a backend receives. ``backend_extra``: more YAML lines
    for the ``backends`` section (e.g. ``watchdog: {...}``); ``extra``: more top-level sections.
    ``admin_token``: ``admin.token`` unless ``extra`` has an ``admin`` section (None: no token)."""
    port = free_port()
    base = free_ports(backends)
    if command is None:
        command = ["{python}", "-m", "glmtts.emulator", "--port", "{port}", "--time-scale", str(time_scale),
                   "--seed", "{index}", *emulator_args]
    more = "".join(f"  {line}\n" for line in backend_extra.splitlines() if line.strip())
    text = f"""
listen: {{host: 127.0.0.1, port: {port}}}
backends:
  command: {json.dumps(list(command))}
  gpus: {json.dumps([str(i) for i in range(backends)])}
  base_port: {base}
  slots: {slots}
  health: {{interval_s: 0.5, timeout_s: 2.0, start_timeout_s: 60.0}}
  restart: {restart}
  warmup: {{enabled: {"true" if warmup else "false"}}}
  stop_grace_s: 5.0
{more}cost: {{base_s: {0.3125 * time_scale!r}, per_unit_s: {0.159375 * time_scale!r}, reload_s: {20.0 * time_scale!r}}}
{extra}
"""
    if admin_token is not None and "admin" not in _sections(extra):
        text += f"admin: {{token: {admin_token}}}\n"
    if "classes" not in _sections(extra):
        # The default classes without the short class's express slot and band: `slots` requests
        # per backend, each in the band it asked for, as the tests count them.
        text += ("classes: [{name: short, max_chars: 50}, {name: medium, max_chars: 200}, "
                 "{name: long, max_chars: null, max_in_service: 3}]\n")
    return text, port


def start_sidecar(config_text: str, port: int, tmp_dir: Path, *, wait_ready: bool = True) -> Service:
    """The returned service knows the admin token its config sets."""
    config = tmp_dir / f"sidecar-{port}.yaml"
    if "\ntasks:" not in config_text:  # task state goes to the test's own directory
        config_text += f"\ntasks: {{state_dir: {json.dumps(str(tmp_dir / f'tasks-{port}'))}}}\n"
    config.write_text(config_text)
    service = start_process([sys.executable, "-m", "scheduler", "--config", str(config)],
                            f"http://127.0.0.1:{port}")
    service.admin_token = configured_admin_token(config_text)
    if wait_ready:
        try:
            wait_http(service, "/readyz", timeout=60)
            backends = backend_details(service)
            deadline = time.monotonic() + 60
            while any(b["state"] != "ready" for b in backends) and time.monotonic() < deadline:
                time.sleep(0.05)
                backends = backend_details(service)
            assert all(b["state"] == "ready" for b in backends), backends
        except BaseException:
            service.stop()
            raise
    return service


def _sections(config_text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(config_text)
    except yaml.YAMLError:  # a test of a broken file: the sidecar says what is wrong
        return {}
    return data if isinstance(data, dict) else {}


def configured_admin_token(config_text: str) -> str | None:
    """The admin token a sidecar config sets (``env:NAME`` read from this environment), or None."""
    admin = _sections(config_text).get("admin")
    token = admin.get("token") if isinstance(admin, dict) else None
    if isinstance(token, str) and token.startswith("env:"):
        return os.environ.get(token[len("env:"):])
    return token if isinstance(token, str) else None


def admin_headers(service: Service) -> dict[str, str]:
    """The sidecar's admin token as a header: for /api/v1/health, /api/v1/queue and admin endpoints
    only (on /api/v1/tts it would be an unknown API key)."""
    assert service.admin_token is not None, "this sidecar has no admin token: nobody sees its details"
    return {"Authorization": f"Bearer {service.admin_token}"}


def details(service: Service, path: str, *, timeout: float = 10.0, statuses: Sequence[int] = (200,)) -> Any:
    """GET ``path`` (/api/v1/health or /api/v1/queue) of a sidecar with its admin token: the page
    with its details. ``statuses``: those accepted (health answers 503, same body, while no backend
    is ready)."""
    status, _, body = http("GET", service.url + path, headers=admin_headers(service), timeout=timeout)
    assert status in statuses, (path, status, body[:300])
    return json.loads(body)


def backend_details(service: Service, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Each backend's state, pid and counters, from /api/v1/health (answered also while none is ready)."""
    backends: list[dict[str, Any]] = details(service, "/api/v1/health", timeout=timeout,
                                             statuses=(200, 503))["backends"]
    return backends


@contextlib.contextmanager
def running_sidecar(tmp_path: Path, **kwargs: Any) -> Iterator[Service]:
    """A sidecar from ``sidecar_config(**kwargs)``, ready, stopped (with its backends) on exit."""
    text, port = sidecar_config(**kwargs)
    service = start_sidecar(text, port, tmp_path)
    try:
        yield service
    finally:
        service.stop()


def backend_pids(service: Service) -> list[int]:
    return [b["pid"] for b in backend_details(service)]


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
