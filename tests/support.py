"""The tests' conveniences for real processes on loopback, on the shared machinery of bench.procs
(ports, HTTP, process groups, readiness, cleanup): the tests' defaults for emulators and sidecars,
the sidecar config builder, and the admin-token views of a sidecar's details."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# The process machinery is the benchmarks' too: one copy, in bench.procs.
from bench.procs import (
    ROOT,
    Proc,
    backend_pids,
    config_sections,
    configured_admin_token,
    free_port,
    free_ports,
    get_json,
    http,
    pid_gone,
    spawn,
    wait_for,
)
from bench.procs import backend_states as backend_details
from bench.procs import start_emulator as _start_emulator
from bench.procs import start_sidecar as _start_sidecar
from scheduler.core.cost import CostPriors

# The admin token `sidecar_config` writes unless told otherwise: /api/v1/health and /api/v1/queue
# show their details (backends, pids, tenants, slots) only to it. Send it to those and to admin
# endpoints only: on /api/v1/tts an Authorization header is a tenant key, and this one is nobody's.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
# Emulators sharing a GPU id slow each other down (glmtts.emulator.gpu): a runner's own
# CUDA_VISIBLE_DEVICES must not make every test's backends share one; a test asks for it.
_UNSET = ("CUDA_VISIBLE_DEVICES",)

Service = Proc  # a process a test started; its log file stays for reading after it stops

__all__ = ["ADMIN_TOKEN", "ROOT", "Service", "admin_headers", "backend_details", "backend_pids",
           "configured_admin_token", "details", "emulator", "free_port", "free_ports", "get_json", "http",
           "pid_gone", "running_sidecar", "sidecar_config", "start_emulator", "start_process", "start_sidecar",
           "wait_http", "wait_until"]


def start_process(argv: Sequence[str], url: str, *, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> Service:
    """`argv` in its own process group, its output kept in a file for the test to read."""
    return spawn(argv, url, env=env, cwd=cwd, unset=_UNSET, keep_log=True, log_prefix="glmtts-test-")


def wait_http(service: Service, path: str, timeout: float = 30.0) -> None:
    service.wait_http(path, timeout)


def start_emulator(*args: str, env: dict[str, str] | None = None, time_scale: float = 0.01,
                   wait: bool = True, cwd: Path | None = None) -> Service:
    return _start_emulator(["--time-scale", str(time_scale), *args], timeout=30.0, wait=wait, env=env, cwd=cwd,
                           unset=_UNSET, keep_log=True, log_prefix="glmtts-test-")


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
    base = free_ports(max(backends, 1))
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
{more}cost: {{base_s: {CostPriors().base_s * time_scale!r}, per_unit_s: {CostPriors().per_unit_s * time_scale!r},
       reload_s: {CostPriors().reload_s * time_scale!r}}}
{extra}
"""
    if admin_token is not None and "admin" not in config_sections(extra):
        text += f"admin: {{token: {admin_token}}}\n"
    if "classes" not in config_sections(extra):
        # The default classes without the short class's express slot and band: `slots` requests
        # per backend, each in the band it asked for, as the tests count them.
        text += ("classes: [{name: short, max_chars: 50}, {name: medium, max_chars: 200}, "
                 "{name: long, max_chars: null, max_in_service: 3}]\n")
    return text, port


def start_sidecar(config_text: str, port: int, tmp_dir: Path, *, wait_ready: bool = True) -> Service:
    """The sidecar of `config_text` (which `sidecar_config` gives its admin token), ready unless
    told otherwise; the returned service knows the admin token its config sets."""
    return _start_sidecar(config_text, port, tmp_dir, timeout=60.0, wait_ready=wait_ready, admin_token=None,
                          unset=_UNSET, keep_log=True, log_prefix="glmtts-test-")


def admin_headers(service: Service) -> dict[str, str]:
    """The sidecar's admin token as a header: for /api/v1/health, /api/v1/queue and admin endpoints
    only (on /api/v1/tts it would be an unknown API key)."""
    assert service.admin_token is not None, "this sidecar has no admin token: nobody sees its details"
    return {"Authorization": f"Bearer {service.admin_token}"}


def details(service: Service, path: str, *, timeout: float = 10.0, statuses: Sequence[int] = (200,)) -> Any:
    """GET ``path`` (/api/v1/health or /api/v1/queue) of a sidecar with its admin token: the page
    with its details. ``statuses``: those accepted (health answers 503, same body, while no backend
    is ready)."""
    assert service.admin_token is not None, "this sidecar has no admin token: nobody sees its details"
    return get_json(service.url + path, timeout, token=service.admin_token, statuses=statuses)


@contextlib.contextmanager
def running_sidecar(tmp_path: Path, **kwargs: Any) -> Iterator[Service]:
    """A sidecar from ``sidecar_config(**kwargs)``, ready, stopped (with its backends) on exit."""
    text, port = sidecar_config(**kwargs)
    service = start_sidecar(text, port, tmp_path)
    try:
        yield service
    finally:
        service.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    wait_for(lambda: bool(predicate()), timeout, what, interval=0.02)
