"""Emulator processes on one GPU share its throughput, as real backends on one card do.

Measured (measurements/h200-calibration.md, "processes on the same GPU" rows): n processes busy on
one GPU get G(n) times the throughput of one busy process alone in total, G = 1.0, 2.0, 2.9, 5.5,
8.7, 10.0 at n = 1, 2, 4, 8, 16, 24; so each busy process runs at G(n)/n of its solo speed. That
factor multiplies the in-process sharing of glmtts.emulator.timing.

The processes agree on n without a server: each one that is busy keeps an empty file named
``<pid>.<start time>`` in a directory named after the GPU id. Whoever counts ignores, and removes,
the files of processes that are gone (killed with SIGKILL mid-request, say): the pid does not exist,
is a zombie, or now belongs to a younger process (a reused pid has another start time). A busy
process counts again when it starts or finishes work and every ``poll_s`` while it works.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("glmtts.emulator")
T = TypeVar("T")

# Total throughput of n processes busy on one GPU, relative to one alone (the measured rows).
MEASURED_GPU_CURVE: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 2.0), (4, 2.9), (8, 5.5), (16, 8.7),
                                                    (24, 10.0))
POLL_S = 0.03  # how often a busy process looks at the others (real seconds)


class GpuCurveError(ValueError):
    pass


@dataclass(frozen=True)
class GpuCurve:
    """G(n): piecewise linear through its points, flat after the last; G(1) = 1 by definition."""

    points: tuple[tuple[int, float], ...] = MEASURED_GPU_CURVE

    def __post_init__(self) -> None:
        problem = _curve_problem(self.points)
        if problem:
            raise GpuCurveError(problem)

    @classmethod
    def parse(cls, text: str) -> GpuCurve:
        """``"1:1,2:2,4:2.9"``: processes:throughput pairs; a missing 1:1 is implied."""
        points: list[tuple[int, float]] = []
        for item in text.split(","):
            n_text, sep, g_text = item.strip().partition(":")
            if not sep:
                raise GpuCurveError(f"{item.strip()!r} is not PROCESSES:THROUGHPUT (e.g. 2:1.8)")
            try:
                n = int(n_text)
            except ValueError:
                raise GpuCurveError(f"process count {n_text.strip()!r} in {item.strip()!r} is not a whole "
                                    "number") from None
            try:
                g = float(g_text)
            except ValueError:
                raise GpuCurveError(f"throughput {g_text.strip()!r} in {item.strip()!r} is not a number") from None
            points.append((n, g))
        if points and points[0][0] != 1:
            points.insert(0, (1, 1.0))
        return cls(tuple(points))

    def __call__(self, n: float) -> float:
        """Total throughput with ``n`` processes busy (0 with none)."""
        if n <= 0:
            return 0.0
        points = self.points
        if n >= points[-1][0]:
            return points[-1][1]
        for (n0, g0), (n1, g1) in pairwise(points):
            if n <= n1:
                return g0 + (g1 - g0) * (n - n0) / (n1 - n0)
        raise AssertionError("unreachable: n is below the last point")

    def speed(self, n: int) -> float:
        """The fraction of its solo speed each of ``n`` busy processes gets (1.0 alone or idle)."""
        return self(n) / n if n >= 1 else 1.0

    def as_text(self) -> str:
        return ",".join(f"{n}:{g:g}" for n, g in self.points)


def _curve_problem(points: Sequence[tuple[int, float]]) -> str | None:
    if not points:
        return "the curve needs at least one PROCESSES:THROUGHPUT point"
    previous = 0
    for n, g in points:
        if n < 1:
            return f"process count {n} must be >= 1"
        if n <= previous:
            return f"process counts must increase: {n} comes after {previous}"
        if not (math.isfinite(g) and g > 0):
            return f"throughput at {n} processes must be a positive number, got {g}"
        if n == 1 and g != 1:
            return f"throughput at 1 process must be 1 (the curve is relative to one process alone), got {g:g}"
        if g > n + 1e-9:
            return f"throughput at {n} processes ({g:g}) exceeds {n}: processes cannot run faster together"
        previous = n
    if points[0][0] != 1:
        return f"the curve must start at 1 process, not {points[0][0]}"
    return None


def gpu_id_from(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """``--gpu`` if given ('' turns sharing off), else CUDA_VISIBLE_DEVICES' first entry, else None."""
    text = flag if flag is not None else environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0]
    return text.strip() or None


def default_state_dir() -> Path:
    """Where processes of this user meet: XDG_RUNTIME_DIR, else /dev/shm, else the temp directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / "glmtts-emulator-gpu"
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    return Path(base) / f"glmtts-emulator-gpu-{os.getuid()}"


def gpu_directory(state_dir: Path, gpu_id: str) -> Path:
    """A directory name for any GPU id: safe characters kept, a digest added when any were not."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", gpu_id)
    if safe != gpu_id:
        safe += "-" + hashlib.blake2b(gpu_id.encode(), digest_size=4).hexdigest()
    return state_dir / f"gpu-{safe}"


def process_start_time(pid: int) -> int | None:
    """A live process's start time (clock ticks after boot, /proc/PID/stat), None when it is gone.

    Zombies count as gone. Without /proc, 0 for any process that exists (no pid-reuse guard)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        if os.path.exists("/proc/self/stat"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain anything.
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


_MARKER = re.compile(r"(\d+)\.(\d+)")


class GpuRegistry:
    """The busy processes of one GPU: a directory with one empty file per busy process."""

    def __init__(self, directory: Path, *, pid: int | None = None,
                 start_time_of: Callable[[int], int | None] = process_start_time) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self._start_time_of = start_time_of
        self.name = f"{self.pid}.{start_time_of(self.pid) or 0}"

    def mark_busy(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / self.name).touch()

    def mark_idle(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / self.name).unlink()

    def busy(self) -> set[str]:
        """The markers of live busy processes (this one's included); stale ones are removed."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        live: set[str] = set()
        for name in names:
            match = _MARKER.fullmatch(name)
            if match is None:
                continue
            if name != self.name and self._start_time_of(int(match[1])) != int(match[2]):
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / name).unlink()
                continue
            live.add(name)
        return live


class GpuShare:
    """This process's side of a shared GPU: says when it is busy, follows how many others are.

    ``busy()`` brackets work on the GPU (nested uses count once); while busy, ``on_speed`` hears
    the per-process speed G(n)/n whenever n changes.
    """

    def __init__(self, gpu_id: str, curve: GpuCurve, registry: GpuRegistry, *,
                 poll_s: float = POLL_S) -> None:
        self.gpu_id = gpu_id
        self.curve = curve
        self.registry = registry
        self.poll_s = poll_s
        self.busy_processes = 0  # n as last seen (this process included while it is busy)
        self.speed = 1.0
        self._depth = 0
        self._poller: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[float], None]] = []
        self._warned = False

    @classmethod
    def create(cls, gpu_id: str, curve: GpuCurve, state_dir: Path | None = None) -> GpuShare:
        directory = gpu_directory(state_dir or default_state_dir(), gpu_id)
        return cls(gpu_id, curve, GpuRegistry(directory))

    def on_speed(self, listener: Callable[[float], None]) -> None:
        self._listeners.append(listener)

    @property
    def is_busy(self) -> bool:
        return self._depth > 0

    @contextlib.asynccontextmanager
    async def busy(self) -> AsyncIterator[None]:
        self._enter()
        try:
            yield
        finally:
            self._leave()

    def _enter(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self._safely(self.registry.mark_busy)
            self._poller = asyncio.ensure_future(self._poll())
            self.refresh()

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._safely(self.registry.mark_idle)
            if self._poller is not None:
                self._poller.cancel()
                self._poller = None
            self.refresh()

    def refresh(self) -> None:
        """Count the busy processes now and pass a changed speed on."""
        busy = self._safely(self.registry.busy)
        if busy is None:
            return
        if self.is_busy and self.registry.name not in busy:
            self._safely(self.registry.mark_busy)  # someone removed it; this process is alive
            busy.add(self.registry.name)
        self.busy_processes = len(busy)
        speed = self.curve.speed(self.busy_processes) if self.is_busy else 1.0
        if speed != self.speed:
            self.speed = speed
            for listener in self._listeners:
                listener(speed)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self.refresh()

    def as_json(self) -> dict[str, object]:
        return {"gpu": self.gpu_id, "gpu_busy_processes": self.busy_processes, "gpu_speed": round(self.speed, 4),
                "gpu_curve": self.curve.as_text(), "gpu_state_dir": str(self.registry.directory)}

    def _safely(self, action: Callable[[], T]) -> T | None:
        # The shared state is advisory: a full or unwritable directory must not fail a request.
        try:
            return action()
        except OSError as exc:
            if not self._warned:
                log.warning("GPU sharing state unusable, this process counts as alone: %s", exc)
                self._warned = True
            return None
