"""Crash-loop detection: more than max_failures failures inside a sliding window of time."""

from __future__ import annotations

from backend.crashloop import CrashLoop
from scheduler.config import CrashLoopConfig

CONFIG = CrashLoopConfig(max_failures=3, window_s=10.0, cooldown_s=60.0)


def test_more_than_max_failures_within_the_window_is_a_crash_loop() -> None:
    loop = CrashLoop(CONFIG)
    assert [loop.record(t) for t in (0.0, 1.0, 2.0)] == [False, False, False]
    assert loop.record(3.0) is True
    assert loop.count(3.0) == 4


def test_failures_spread_wider_than_the_window_never_are() -> None:
    loop = CrashLoop(CONFIG)
    assert not any(loop.record(t * 4.0) for t in range(20))  # at most 3 within any 10 s
    assert loop.count(76.0) == 3
    assert loop.count(200.0) == 0


def test_the_window_edge_forgets_a_failure_exactly_window_s_old() -> None:
    loop = CrashLoop(CONFIG)
    for t in (0.0, 5.0, 6.0):
        loop.record(t)
    assert loop.record(10.0) is False  # the failure at 0.0 has left the window
    assert loop.record(10.5) is True


def test_reset_starts_a_new_count_and_config_can_change() -> None:
    loop = CrashLoop(CONFIG)
    for t in (0.0, 1.0, 2.0):
        loop.record(t)
    loop.reset()
    assert loop.count(2.0) == 0
    assert loop.record(3.0) is False
    loop.config = CrashLoopConfig(max_failures=1, window_s=10.0, cooldown_s=1.0)
    assert loop.record(4.0) is True
