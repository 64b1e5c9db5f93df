"""Passive outlier detection with an injected clock: verdicts, ejection lengths, release and decay."""

from __future__ import annotations

import pytest

from backend.outlier import OutlierDetector
from scheduler.config import OutlierConfig

CONFIG = OutlierConfig(consecutive_failures=3, latency_ratio=4.0, min_requests=5, base_ejection_s=10.0,
                       max_ejection_s=35.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector() -> tuple[OutlierDetector, Clock]:
    clock = Clock()
    return OutlierDetector(CONFIG, clock=clock), clock


def test_consecutive_failures_make_an_outlier_and_a_success_resets_them() -> None:
    d, _ = detector()
    assert d.record(ok=False, latency_ratio=None) is None
    assert d.record(ok=False, latency_ratio=None) is None
    assert d.record(ok=True, latency_ratio=1.0) is None  # the streak is broken
    assert d.record(ok=False, latency_ratio=None) is None
    assert d.record(ok=False, latency_ratio=None) is None
    assert d.record(ok=False, latency_ratio=None) == "3 requests failed in a row"


def test_median_latency_ratio_over_the_last_min_requests() -> None:
    d, _ = detector()
    for ratio in [9.0, 9.0, 9.0, 9.0]:
        assert d.record(ok=True, latency_ratio=ratio) is None  # fewer than min_requests: no verdict
    verdict = d.record(ok=True, latency_ratio=1.0)
    assert verdict == "median latency 9.0x its prediction over its last 5 requests (limit 4x)"
    # One slow request among fast ones is not an outlier: the median ignores it.
    d2, _ = detector()
    for ratio in [1.0, 1.1, 50.0, 0.9, 1.0]:
        assert d2.record(ok=True, latency_ratio=ratio) is None
    # Only the latest min_requests count: fast requests push the slow ones out.
    for _ in range(3):
        d.record(ok=True, latency_ratio=1.0)
    assert d.verdict() is None


def test_exactly_at_the_limit_is_not_an_outlier_and_failures_carry_no_ratio() -> None:
    d, _ = detector()
    for _ in range(5):
        d.record(ok=True, latency_ratio=4.0)
    assert d.verdict() is None
    d.record(ok=False, latency_ratio=99.0)  # a failure's ratio means nothing
    assert d.verdict() is None


def test_ejections_double_up_to_the_cap_and_end_on_time() -> None:
    d, clock = detector()
    assert not d.ejected and d.ejected_until is None
    lengths = []
    for _ in range(4):
        lengths.append(d.eject())
        assert d.ejected
        clock.now += lengths[-1] - 0.001
        assert d.ejected
        clock.now += 0.001
        assert not d.ejected and d.ejected_until is not None  # expired, not yet released
        d.release()
        assert d.ejected_until is None
        clock.now += 1.0
    assert lengths == [10.0, 20.0, 35.0, 35.0]


def test_the_ejection_count_decays_after_a_whole_max_ejection_without_one() -> None:
    d, clock = detector()
    assert d.eject() == 10.0
    clock.now += 10.0
    d.release()
    clock.now += 34.0
    assert d.eject() == 20.0
    clock.now += 20.0
    d.release()
    clock.now += 35.0
    assert d.eject() == 10.0


def test_outcomes_while_ejected_are_ignored_and_release_forgets_the_window() -> None:
    d, clock = detector()
    for _ in range(3):
        d.record(ok=False, latency_ratio=None)
    assert d.verdict() is not None
    d.eject()
    assert d.record(ok=False, latency_ratio=None) is None  # sent before the ejection
    clock.now += 10.0
    d.release()
    assert d.verdict() is None
    assert d.record(ok=False, latency_ratio=None) is None  # a clean slate: one failure is not three


def test_reset_keeps_the_ejection_count_and_new_config_resizes_the_window() -> None:
    d, clock = detector()
    d.eject()
    clock.now += 10.0
    d.release()
    d.reset()
    assert d.eject() == 20.0
    clock.now += 20.0
    d.release()
    for ratio in [1.0, 1.0, 9.0, 9.0, 9.0]:
        d.record(ok=True, latency_ratio=ratio)
    assert d.verdict() is not None
    d.config = CONFIG.model_copy(update={"min_requests": 3})
    assert d.verdict() is not None  # the latest three: all slow
    d.config = CONFIG.model_copy(update={"min_requests": 3, "latency_ratio": 10.0})
    assert d.verdict() is None


@pytest.mark.parametrize("failures", [1, 2])
def test_fewer_failures_than_the_threshold_are_fine(failures: int) -> None:
    d, _ = detector()
    for _ in range(failures):
        assert d.record(ok=False, latency_ratio=None) is None
