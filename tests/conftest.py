"""Settings for the whole test session, with or without pytest-xdist workers.

- Every test process (each xdist worker, or the one process of a plain run) gets its own
  ``XDG_RUNTIME_DIR``, which the emulators it starts inherit: the emulators' shared-GPU bookkeeping
  (glmtts.emulator.gpu) counts busy processes per GPU id there, and tests in other workers, or
  other runs on the machine, must not slow a test's emulators down by using the same GPU ids.
- The default run leaves out tests marked ``slow`` (``addopts``): those that need minutes or many
  processes. Its summary says how many it left out and how to run them, so that is never silent.
- A test marked ``alone`` runs with no other test running in any worker: it measures throughput,
  which other workers' processes on the same cores would disturb. A turnstile of two file locks
  shared by the session's workers does it (``_alone_or_together``): such a test closes the gate,
  waits for the tests running elsewhere to finish, and runs; the others wait at the gate meanwhile.
- At the session's end each test process SIGKILLs the process groups it started through
  bench.procs (sidecars, emulators, redis-server) that no test stopped: a teardown cut short by a
  timeout leaves nothing running (``bench.procs.end_own_groups``, also run at interpreter exit).
- scripts/test spreads the suite over pytest-xdist workers with ``--dist loadgroup``. Tests that
  keep cores busy or measure time, memory or loop lag carry ``xdist_group("serial")``: one worker
  runs them one after another, so they never run beside each other. Modules with a module-scoped
  server carry a group of their own, so that server starts once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.procs import end_own_groups

SLOW_DESELECTED = "slow_deselected"  # the key under which xdist workers report their count
LOCKS = "GLMTTS_TEST_LOCKS"  # the session's lock directory, set by the first process (the controller)
_OWN_LOCKS = pytest.StashKey[Path]()
_RUNTIME_DIR = pytest.StashKey[Path]()
_SLOW_COUNT = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="glmtts-test-runtime-"))  # mode 0700, as XDG requires
    config.stash[_RUNTIME_DIR] = runtime
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    config.stash[_SLOW_COUNT] = 0
    if LOCKS not in os.environ:  # the controller (or a plain run); xdist workers inherit its directory
        locks = Path(tempfile.mkdtemp(prefix="glmtts-test-locks-"))
        os.environ[LOCKS] = str(locks)
        config.stash[_OWN_LOCKS] = locks
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_WorkerCounts(config), "glmtts-slow-counts")


def pytest_unconfigure(config: pytest.Config) -> None:
    end_own_groups()  # processes a test started and never stopped (its teardown cut short by a timeout)
    locks = config.stash.get(_OWN_LOCKS, None)
    if locks is not None:
        shutil.rmtree(locks, ignore_errors=True)
        os.environ.pop(LOCKS, None)
    runtime = config.stash.get(_RUNTIME_DIR, None)
    if runtime is not None:
        shutil.rmtree(runtime, ignore_errors=True)


def pytest_deselected(items: list[pytest.Item]) -> None:
    """Count the slow tests a marker expression left out (in a worker: reported to the controller)."""
    if not items:
        return
    config = items[0].config
    slow = sum(1 for item in items if item.get_closest_marker("slow") is not None)
    config.stash[_SLOW_COUNT] = config.stash.get(_SLOW_COUNT, 0) + slow
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[SLOW_DESELECTED] = config.stash[_SLOW_COUNT]


class _WorkerCounts:
    """On the xdist controller, which collects nothing itself: the workers' counts (each worker
    collects the whole suite, so they agree; the largest is taken in case one stopped early)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        count = int(getattr(node, "workeroutput", {}).get(SLOW_DESELECTED, 0))
        self.config.stash[_SLOW_COUNT] = max(self.config.stash.get(_SLOW_COUNT, 0), count)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    count = config.stash.get(_SLOW_COUNT, 0)
    if count:
        noun = "test" if count == 1 else "tests"
        terminalreporter.write_line(f"{count} slow {noun} not run (./scripts/test -m slow runs them)",
                                    yellow=True)


@pytest.fixture(autouse=True)
def _alone_or_together(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hold the session's shared lock while a test runs, or its exclusive one for a test marked
    ``alone``; the gate keeps a waiting ``alone`` test from being starved by tests that keep starting."""
    directory = Path(os.environ[LOCKS])
    with open(directory / "gate", "a") as gate, open(directory / "tests", "a") as tests:
        if request.node.get_closest_marker("alone") is not None:
            fcntl.flock(gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(tests, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(gate, fcntl.LOCK_UN)
        else:
            fcntl.flock(gate, fcntl.LOCK_EX)  # passes at once unless an `alone` test is waiting or running
            fcntl.flock(gate, fcntl.LOCK_UN)
            fcntl.flock(tests, fcntl.LOCK_SH)
            yield
