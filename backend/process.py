"""One backend process: spawn it in its own process group, copy its output to our log, stop and reap it.

A backend must never outlive the sidecar, even when the sidecar is killed with SIGKILL and runs no
cleanup: on Linux the child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable

from backend.settings import BackendsConfig, BackendSpec
from glmtts.loop import wait_for

__all__ = ["MAX_LINE_BYTES", "BackendProcess", "LineSplitter", "describe_exit"]

output_log = logging.getLogger("glmtts_sidecar.backend")

MAX_LINE_BYTES = 8192  # a longer output line is logged in pieces of this size
_READ_BYTES = 65536
_PR_SET_PDEATHSIG = 1
_OUTPUT_DRAIN_S = 2.0  # after the process is reaped, how long its output may take to reach EOF


class LineSplitter:
    """Bytes in, complete text lines out; a line longer than `max_bytes` comes out in pieces."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        lines: list[str] = []
        while True:
            end = self._buffer.find(b"\n", 0, self.max_bytes + 1)
            if end >= 0:
                lines.append(_decode(self._buffer[:end]))
                del self._buffer[: end + 1]
            elif len(self._buffer) >= self.max_bytes:
                lines.append(_decode(self._buffer[: self.max_bytes]))
                del self._buffer[: self.max_bytes]
            else:
                return lines

    def flush(self) -> list[str]:
        """What is left after EOF (a last line without a newline)."""
        rest, self._buffer = self._buffer, bytearray()
        return [_decode(rest)] if rest else []


def _decode(line: bytes | bytearray) -> str:
    return bytes(line).rstrip(b"\r").decode("utf-8", errors="replace")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class BackendProcess:
    """A spawned backend; the pid is its process group id (it leads a new session)."""

    def __init__(self, proc: asyncio.subprocess.Process, backend_id: str, *, log_output: bool) -> None:
        self._proc = proc
        self.backend_id = backend_id
        self._log_output = log_output
        self._reaped = False
        self._output = asyncio.ensure_future(self._copy_output())

    @classmethod
    async def spawn(
        cls, config: BackendsConfig, spec: BackendSpec, *, python: str, log_output: bool
    ) -> BackendProcess:
        """Start backend `spec`; raises OSError when the program cannot be started."""
        assert spec.managed and spec.gpu is not None, spec
        argv = config.command_argv(port=spec.port, gpu=spec.gpu, index=spec.index, python=python, host=spec.host)
        extra_env = config.environment(
            port=spec.port, gpu=spec.gpu, index=spec.index, python=python, host=spec.host
        )
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=config.cwd,
            env={**os.environ, **extra_env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        return cls(proc, spec.id, log_output=log_output)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        """Wait for the process to exit, reap it, and kill whatever it left in its group."""
        code = await self._proc.wait()
        if not self._reaped:
            self._reaped = True
            # The group id cannot be reused while a member lives, so this reaches only our leftovers.
            self._signal_group(signal.SIGKILL)
        return code

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the group, SIGKILL it after `grace_s`, reap; safe to call again or after an exit."""
        if self._proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(asyncio.shield(self.wait()), grace_s)
            if self._proc.returncode is None:
                self._signal_group(signal.SIGKILL)
        code = await self.wait()
        await self._finish_output()
        return code

    def kill(self) -> None:
        """SIGKILL the whole group now, without waiting; `wait()` (the supervisor's) then reaps it.

        For a process that is stuck (it would not act on SIGTERM in time, and every second it
        holds requests and GPU memory costs more than a graceful exit could save).
        """
        if self._proc.returncode is None:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def _finish_output(self) -> None:
        # A grandchild that escaped the group could hold the pipe open: stop reading then.
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(asyncio.shield(self._output), _OUTPUT_DRAIN_S)
        if not self._output.done():
            self._output.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._output

    async def _copy_output(self) -> None:
        stream = self._proc.stdout
        assert stream is not None
        splitter = LineSplitter()
        try:
            while chunk := await stream.read(_READ_BYTES):
                self._log(splitter.feed(chunk))
            self._log(splitter.flush())
        except Exception:  # losing the output must not take the supervision down with it
            output_log.exception("[%s] cannot read the backend's output", self.backend_id)

    def _log(self, lines: list[str]) -> None:
        if self._log_output:
            for line in lines:
                output_log.info("[%s] %s", self.backend_id, line)


# libc's prctl, looked up once in the parent: the child between fork and exec should do little.
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc/musl-like: no parent-death signal, still works
        _prctl = None


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """The child's pre-exec step: SIGKILL me when the parent dies; exit if it already has.

    The kernel sends the signal when the *thread* that forked exits: spawn from the event loop's
    thread, which lives as long as the sidecar.
    """
    prctl = _prctl
    if prctl is None:
        return None

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup
