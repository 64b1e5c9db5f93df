"""systemd's notify protocol, in-tree: tell the service manager when the sidecar is ready, reloading
or stopping, what it is doing (STATUS), and that it is alive (the watchdog).

The protocol is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=VALUE`` lines sent to the socket
named by ``$NOTIFY_SOCKET`` (a path, or an abstract name starting with ``@``); see sd_notify(3).
Without ``$NOTIFY_SOCKET`` (not run by systemd, or ``Type=`` is not notify) every call does nothing.
Nothing here raises on a failed send: being observed must never stop the sidecar from serving.

Who calls what: the CLI builds one ``Notifier.from_environ(unset=True)`` (so backend processes do
not inherit the socket); ``ServiceStatus`` turns the sidecar's lifecycle into messages (READY=1
once it listens *and* a backend is ready; RELOADING=1/READY=1 around a reload; STOPPING=1 on
drain; STATUS on every backend change); the app runs ``watchdog_loop`` for its whole lifetime.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger("glmtts_sidecar.systemd")

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1`` (ping at half of it), or None when no
    watchdog is asked for: ``WATCHDOG_USEC`` unset or not a positive integer, or ``WATCHDOG_PID``
    set to a process other than ``pid`` (default: this one)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    if "WATCHDOG_PID" in env:
        try:
            owner = int(env["WATCHDOG_PID"])
        except ValueError:
            return None
        if owner != (os.getpid() if pid is None else pid):
            return None  # meant for our parent (e.g. a wrapper script that exec'd nothing)
    return usec / 1_000_000


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. systemd ≥254's "vsock:": not supported here


class Notifier:
    """Sends notify datagrams to one socket; a no-op without one. ``watchdog_s``: the interval from
    ``WATCHDOG_USEC`` when it was read through ``from_environ``."""

    def __init__(self, address: str | None = None, *, watchdog_s: float | None = None) -> None:
        self.address = address  # as in $NOTIFY_SOCKET: a path or "@abstract"
        self.watchdog_s = watchdog_s
        self._target = _socket_address(address) if address else None
        if address and self._target is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; not notifying systemd", address)
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """From ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``; ``unset`` removes them
        afterwards so that child processes (the backends) do not talk to systemd as us."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET") or None, watchdog_s=watchdog_interval(env))
        if unset:
            for key in _ENV_KEYS:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when sent. Newlines in values become
        spaces (a value cannot span lines). Send errors are logged once, never raised."""
        if self._target is None or not fields:
            return False
        lines = "".join(f"{key}={_one_line(str(value))}\n" for key, value in fields.items())
        try:
            if self._sock is None:
                # Non-blocking: a send from the event loop must never wait on systemd.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(lines.encode("utf-8", "replace"), self._target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd at %s: %s (further failures are logged at debug)",
                            self.address, exc)
            else:
                log.debug("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **_status(status))

    def reloading(self, status: str | None = None) -> bool:
        # MONOTONIC_USEC is what systemd ≥253 wants with RELOADING=1 (Type=notify-reload); older ones ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec, **_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **_status(status))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: str) -> str:
    return " ".join(value.splitlines()) if ("\n" in value or "\r" in value) else value


def _status(text: str | None) -> dict[str, str]:
    return {} if text is None else {"STATUS": text}


async def watchdog_loop(notifier: Notifier, interval: float, healthy: Callable[[], bool]) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds while ``healthy()``; runs until cancelled.

    The caller passes half of ``notifier.watchdog_s``. The sidecar passes ``healthy=lambda: True``:
    it pings while its event loop runs, so systemd restarts it only when the loop is wedged (or
    the process hangs). It does *not* stop pinging when no backend is ready: bringing backends
    back is the supervisor's job, and a restart by systemd would kill the ones still loading."""
    while True:
        if healthy():
            notifier.watchdog()
        await asyncio.sleep(interval)


class ServiceStatus:
    """The sidecar's lifecycle, told to systemd. Called by the CLI (``listening``), the app
    (``backends`` on every backend change) and ``scheduler.runtime.control`` (``reloading``/``reloaded``,
    ``stopping``). READY=1 goes out once, when the sidecar listens and a backend is ready; a
    reload before that, or after ``stopping``, sends nothing."""

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        self.ready = False  # READY=1 sent (and not taken back by a reload in progress)
        self._listening = False
        self._stopping = False
        self._reloads = 0  # reloads in progress (SIGHUP and /admin/reload may overlap)
        self._backends = (0, 0)
        self._last_status: str | None = None

    def listening(self) -> None:
        self._listening = True
        self._update()

    def backends(self, ready: int, total: int) -> None:
        self._backends = (ready, total)
        self._update()

    def reloading(self) -> None:
        if self.ready and not self._stopping:
            self._reloads += 1
            if self._reloads == 1:
                self._last_status = "reloading the configuration"
                self.notifier.reloading(self._last_status)

    def reloaded(self, ok: bool) -> None:
        """After every ``reloading()``, whatever the outcome: systemd waits for READY=1."""
        if self._reloads == 0:
            return
        self._reloads -= 1
        if self._reloads or self._stopping:
            return
        self._last_status = self._describe() + ("" if ok else "; last reload refused")
        self.notifier.ready(self._last_status)

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._last_status = "draining: no new requests; finishing queued and running ones"
            self.notifier.stopping(self._last_status)

    def _describe(self) -> str:
        ready, total = self._backends
        return f"{ready}/{total} backends ready" + ("" if self._listening else "; not listening yet")

    def _update(self) -> None:
        if self._stopping or self._reloads:
            return
        text = self._describe()
        if not self.ready and self._listening and self._backends[0] > 0:
            self.ready = True
            self._last_status = text
            self.notifier.ready(text)
        elif text != self._last_status:
            self._last_status = text
            self.notifier.status(text)
