"""A real redis-server for tests, on a free loopback port, persisting as the docs advise (AOF,
fsync every second, no RDB snapshots) and never evicting. It can be stopped (by its pid) and
started again on the same port and directory, as a Redis that restarts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.procs import disown_group, free_port, own_group, pid_gone

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

__all__ = ["REDIS_SERVER", "RedisServer", "redis_server"]


class RedisServer:
    """One redis-server process: ``host``, ``port``, ``pid``, ``url``; ``stop`` and ``start``.
    ``extra``: more redis-server arguments (``--rename-command CONFIG ""`` hides CONFIG, as
    managed services do)."""

    def __init__(self, directory: Path, *, port: int | None = None, policy: str = "noeviction",
                 extra: Sequence[str] = ()) -> None:
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.policy = policy
        self.extra = tuple(extra)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._process is not None, "redis-server is not running"
        return self._process.pid

    def start(self, timeout: float = 10.0) -> None:
        """Start redis-server (again, on the same port and directory) and wait until it answers."""
        assert self._process is None, "redis-server is already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "yes",
                "--appendfsync", "everysec", "--dir", str(self.directory), "--maxmemory-policy", self.policy,
                "--protected-mode", "no", "--logfile", str(self.directory / "redis.log"), *self.extra]
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        own_group(self._process)  # ended at exit even if a test's teardown never stops it
        end = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > end:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:] \
                    if (self.directory / "redis.log").exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid (Redis writes its AOF and exits), SIGKILL after ``timeout``."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)
        disown_group(process)
        assert pid_gone(process.pid)

    def _answers(self) -> bool:
        """Whether PING gets PONG (the AOF is loaded once it does)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@contextlib.contextmanager
def redis_server(directory: Path, *, policy: str = "noeviction", extra: Sequence[str] = ()) -> Iterator[RedisServer]:
    """A started RedisServer, stopped on exit whatever happens."""
    server = RedisServer(directory, policy=policy, extra=extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()
