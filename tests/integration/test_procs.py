"""bench.procs ends the process groups it started and nobody stopped, when its process exits.

A test whose teardown never runs to the end (cut short by a timeout) must not leave its
processes behind: a Python process that spawns a group (a leader and the leader's child) and
exits without stopping it leaves neither running; a group it stopped itself is not signalled
again.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.procs import ROOT, pid_gone

SLEEPER = ("import subprocess, sys, time\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
           "print(child.pid, flush=True)\n"
           "time.sleep(60)\n")


def run_parent(body: str) -> list[int]:
    """Run ``body`` in a fresh interpreter (bench.procs imported), return the pids it printed."""
    program = ("import sys, time\n"
               "from bench.procs import spawn\n"
               f"SLEEPER = {SLEEPER!r}\n" + body)
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return [int(word) for word in done.stdout.split()]


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids of ``pids`` still alive after ``timeout`` seconds (bounded polling)."""
    end = time.monotonic() + timeout
    while (alive := [pid for pid in pids if not pid_gone(pid)]) and time.monotonic() < end:
        time.sleep(0.05)
    return alive


def test_a_group_left_running_is_ended_when_its_starter_exits() -> None:
    pids = run_parent(
        "leader = spawn([sys.executable, '-c', SLEEPER], 'http://127.0.0.1:1')\n"
        "end = time.monotonic() + 30\n"
        "while not leader.output().strip() and time.monotonic() < end:\n"
        "    time.sleep(0.02)\n"
        "print(leader.pid, leader.output().split()[0], flush=True)\n"
        "sys.exit(0)  # no leader.stop(): the exit hook ends the group\n")
    leader, child = pids
    assert wait_gone([leader, child]) == []


def test_a_group_stopped_by_its_owner_is_forgotten() -> None:
    pids = run_parent(
        "from bench.procs import end_own_groups\n"
        "proc = spawn([sys.executable, '-c', 'import time; time.sleep(60)'], 'http://127.0.0.1:1')\n"
        "other = spawn([sys.executable, '-c', 'import time; time.sleep(60)'], 'http://127.0.0.1:1')\n"
        "proc.stop()\n"
        "ended = end_own_groups()\n"
        "assert ended == [other.pid], (ended, proc.pid, other.pid)\n"
        "assert end_own_groups() == []  # each group once\n"
        "print(proc.pid, other.pid, flush=True)\n")
    assert wait_gone(pids) == []
