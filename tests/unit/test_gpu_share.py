"""Shared-GPU emulation: the curve, the rate arithmetic on a fake clock, the busy-process registry."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmtts.emulator.gpu import (
    GpuCurve,
    GpuCurveError,
    GpuRegistry,
    GpuShare,
    gpu_directory,
    gpu_id_from,
    process_start_time,
)
from glmtts.emulator.timing import ProcessorShares


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the curve -------------------------------------------------------------------------------


def test_the_default_curve_is_the_measured_one_interpolated_and_flat_after_the_last_point() -> None:
    curve = GpuCurve()
    assert [curve(n) for n in (1, 2, 4, 8, 16, 24)] == [1.0, 2.0, 2.9, 5.5, 8.7, 10.0]
    assert curve(3) == pytest.approx(2.45)
    assert curve(6) == pytest.approx(4.2)
    assert curve(20) == pytest.approx(9.35)
    assert curve(25) == curve(100) == 10.0
    assert curve(0) == 0.0
    assert curve.speed(1) == 1.0 and curve.speed(0) == 1.0
    assert curve.speed(2) == pytest.approx(1.0)
    assert curve.speed(4) == pytest.approx(0.725)
    assert curve.speed(48) == pytest.approx(10 / 48)


def test_a_curve_parses_from_the_flag_and_implies_one_process_alone() -> None:
    curve = GpuCurve.parse("2:1.2, 4:1.6")
    assert curve.points == ((1, 1.0), (2, 1.2), (4, 1.6))
    assert curve(3) == pytest.approx(1.4)
    assert GpuCurve.parse(curve.as_text()) == curve
    assert GpuCurve.parse(GpuCurve().as_text()) == GpuCurve()
    assert GpuCurve.parse("1:1").speed(5) == pytest.approx(0.2)  # one process's worth, shared


@pytest.mark.parametrize(("text", "problem"), [
    ("", "'' is not PROCESSES:THROUGHPUT"),
    ("1:1,2", "'2' is not PROCESSES:THROUGHPUT"),
    ("1:1,two:2", "process count 'two' in 'two:2' is not a whole number"),
    ("1:1,2.5:2", "process count '2.5'"),
    ("1:1,2:fast", "throughput 'fast' in '2:fast' is not a number"),
    ("1:1,4:3,2:2", "process counts must increase: 2 comes after 4"),
    ("1:1,2:0", "throughput at 2 processes must be a positive number"),
    ("1:1,2:nan", "throughput at 2 processes must be a positive number"),
    ("1:1,2:2.5", "throughput at 2 processes (2.5) exceeds 2"),
    ("1:0.5,2:1", "throughput at 1 process must be 1"),
    ("0:1", "process count 0 must be >= 1"),
])
def test_a_bad_curve_is_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(GpuCurveError) as excinfo:
        GpuCurve.parse(text)
    assert problem in str(excinfo.value)


def test_the_gpu_id_comes_from_the_flag_else_cuda_visible_devices() -> None:
    assert gpu_id_from("3", {"CUDA_VISIBLE_DEVICES": "1"}) == "3"
    assert gpu_id_from(None, {"CUDA_VISIBLE_DEVICES": "1,0"}) == "1"
    assert gpu_id_from(None, {"CUDA_VISIBLE_DEVICES": " GPU-5f2a , 1"}) == "GPU-5f2a"
    assert gpu_id_from("", {"CUDA_VISIBLE_DEVICES": "1"}) is None  # '' turns sharing off
    assert gpu_id_from(None, {"CUDA_VISIBLE_DEVICES": ""}) is None
    assert gpu_id_from(None, {}) is None


def test_any_gpu_id_gets_its_own_safe_directory(tmp_path: Path) -> None:
    assert gpu_directory(tmp_path, "0") == tmp_path / "gpu-0"
    assert gpu_directory(tmp_path, "GPU-5f2a.b_c") == tmp_path / "gpu-GPU-5f2a.b_c"
    odd = [gpu_directory(tmp_path, gpu) for gpu in ("../x", ".._x", "a/b", "a b", "a_b")]
    assert all(path.parent == tmp_path and "/" not in path.name for path in odd)
    assert len(set(odd)) == len(odd)


# --- the rate arithmetic ------------------------------------------------------------------------


def test_progress_integrates_over_changes_of_gpu_speed() -> None:
    clock = FakeClock()
    shares = ProcessorShares((1.0, 1.3), clock)
    job = shares.add(10.0)
    clock.now += 2
    assert shares.remaining(job) == pytest.approx(8.0)
    shares.set_speed(0.5)  # a second process got busy on this GPU
    assert shares.rate() == pytest.approx(0.5)
    clock.now += 4
    assert shares.remaining(job) == pytest.approx(6.0)
    shares.set_speed(1.0)
    clock.now += 1
    assert shares.remaining(job) == pytest.approx(5.0)


def test_in_process_sharing_and_gpu_sharing_multiply() -> None:
    clock = FakeClock()
    shares = ProcessorShares((1.0, 1.3, 1.4, 1.5), clock)
    curve = GpuCurve()
    first, second = shares.add(10.0), shares.add(10.0)
    shares.set_speed(curve.speed(4))
    assert shares.rate() == pytest.approx(1.3 / 2 * 2.9 / 4)
    clock.now += 2
    assert shares.remaining(first) == shares.remaining(second) == pytest.approx(10 - 2 * 0.65 * 0.725)
    shares.remove(second)
    clock.now += 1
    assert shares.remaining(first) == pytest.approx(10 - 2 * 0.65 * 0.725 - 0.725)
    assert shares.speed == pytest.approx(0.725)
    with pytest.raises(ValueError, match="speed must be > 0"):
        shares.set_speed(0)


def test_an_idle_processor_keeps_no_debt() -> None:
    clock = FakeClock()
    shares = ProcessorShares((1.0,), clock)
    shares.set_speed(0.25)
    clock.now += 50
    assert shares.rate() == 0.0
    job = shares.add(1.0)
    clock.now += 2
    assert shares.remaining(job) == pytest.approx(0.5)


# --- the registry of busy processes -------------------------------------------------------------


class FakeProcesses:
    """pid -> start time of the processes that exist; anything else is gone."""

    def __init__(self, **alive: int) -> None:
        self.alive = {int(pid.lstrip("p")): start for pid, start in alive.items()}

    def __call__(self, pid: int) -> int | None:
        return self.alive.get(pid)


def test_the_registry_counts_live_busy_processes_and_removes_the_dead(tmp_path: Path) -> None:
    procs = FakeProcesses(p10=500, p11=600, p12=700)
    me, other, third = (GpuRegistry(tmp_path / "gpu-0", pid=pid, start_time_of=procs) for pid in (10, 11, 12))
    assert me.busy() == set()  # no directory yet
    me.mark_busy()
    other.mark_busy()
    third.mark_busy()
    (tmp_path / "gpu-0" / "notes.txt").write_text("not a marker")
    assert me.busy() == {"10.500", "11.600", "12.700"}
    third.mark_idle()
    third.mark_idle()  # twice is harmless
    assert me.busy() == {"10.500", "11.600"}
    del procs.alive[11]  # killed mid-request: its file stays behind
    assert me.busy() == {"10.500"}
    assert not (tmp_path / "gpu-0" / "11.600").exists()
    (tmp_path / "gpu-0" / "12.650").touch()  # pid 12 now belongs to a younger process
    assert me.busy() == {"10.500"}
    assert sorted(p.name for p in (tmp_path / "gpu-0").iterdir()) == ["10.500", "notes.txt"]


def test_process_start_time_tells_live_from_dead_and_zombie(tmp_path: Path) -> None:
    import os

    mine = process_start_time(os.getpid())
    assert isinstance(mine, int) and mine == process_start_time(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while process_start_time(child.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_start_time(child.pid) is None  # exited, not yet reaped: a zombie
    finally:
        child.wait()
    assert process_start_time(child.pid) is None


async def test_processes_on_one_gpu_follow_each_other(tmp_path: Path) -> None:
    procs = FakeProcesses(p1=1, p2=2, p3=3)
    curve = GpuCurve.parse("1:1,2:1.2,4:1.6")
    shares = {pid: GpuShare("0", curve, GpuRegistry(tmp_path, pid=pid, start_time_of=procs), poll_s=3600)
              for pid in (1, 2, 3)}
    heard: list[float] = []
    shares[1].on_speed(heard.append)
    async with shares[1].busy():
        assert (shares[1].busy_processes, shares[1].speed) == (1, 1.0)
        async with shares[2].busy(), shares[3].busy():
            assert shares[3].busy_processes == 3
            assert shares[3].speed == pytest.approx(1.4 / 3)
            shares[1].refresh()  # what its poll does
            assert heard == [pytest.approx(1.4 / 3)]
            async with shares[1].busy():  # a second request in the same process counts once
                assert shares[1].busy_processes == 3
            del procs.alive[3]  # process 3 dies without leaving
            shares[1].refresh()
            assert shares[1].busy_processes == 2 and heard[-1] == pytest.approx(0.6)
        shares[1].refresh()
        assert heard[-1] == 1.0 and shares[1].busy_processes == 1
        (tmp_path / "1.1").unlink()  # someone removed its marker: it puts it back
        shares[1].refresh()
        assert (tmp_path / "1.1").exists()
    assert not (tmp_path / "1.1").exists()
    assert shares[1].busy_processes == 0 and shares[1].as_json()["gpu_busy_processes"] == 0


async def test_an_unusable_state_directory_leaves_the_process_alone(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    share = GpuShare("0", GpuCurve(), GpuRegistry(blocker / "gpu-0"), poll_s=3600)
    async with share.busy():
        assert share.speed == 1.0
