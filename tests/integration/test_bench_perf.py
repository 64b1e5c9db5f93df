"""The processes-per-GPU, proxy-overhead and GPU benchmarks run end to end at their smoke size."""

from __future__ import annotations

import builtins
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import gpu, procs_per_gpu, proxy_overhead
from tests.integration.test_bench_smoke import PNG_MAGIC, markdown_table
from tests.support import pid_gone, wait_until


def _pngs(out: Path, *names: str) -> None:
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def _all_gone(pids: list[int]) -> None:
    assert pids
    wait_until(lambda: all(pid_gone(p) for p in pids), timeout=15, what="benchmark processes to exit")


# Throughput ratios: in the "serial" xdist group (tests/conftest.py), and slow as every benchmark
# smoke (each starts a dozen processes; ./scripts/test -m slow runs them).
@pytest.mark.slow
@pytest.mark.xdist_group("serial")
@pytest.mark.timeout(120)
def test_procs_per_gpu_smoke_reports_each_k_with_shared_gpu_scaling(tmp_path: Path) -> None:
    setup = procs_per_gpu.SMOKE
    points, pids, wall = procs_per_gpu.run(setup)
    procs_per_gpu.plot(points, tmp_path)
    text = procs_per_gpu.render(setup, points, wall, "python -m bench.procs_per_gpu --smoke")

    rows = markdown_table(text, procs_per_gpu.COLUMNS)
    assert [int(r[0]) for r in rows] == list(setup.ks)
    assert all(float(r[1]) > 0 for r in rows), rows
    by_k = {int(r[0]): float(r[2]) for r in rows}
    # Two processes on one GPU double the throughput; four get 2.9x, not 4x (the measured curve).
    assert 1.6 <= by_k[2] <= 2.4, rows
    assert 2.3 <= by_k[4] <= 3.5, rows
    assert "Reproduce: `python -m bench.procs_per_gpu --smoke`" in text
    _pngs(tmp_path, procs_per_gpu.THROUGHPUT_PLOT, procs_per_gpu.LATENCY_PLOT)
    _all_gone(pids)


# wrk saturates the CPU, and memory is measured: in the "serial" xdist group (tests/conftest.py).
@pytest.mark.slow
@pytest.mark.xdist_group("serial")
@pytest.mark.timeout(150)
def test_proxy_overhead_smoke_measures_every_path_and_the_memory(tmp_path: Path) -> None:
    proxy_overhead.main(["--smoke", "--out", str(tmp_path)])
    text = (tmp_path / proxy_overhead.REPORT).read_text()

    expected = [p for p in proxy_overhead.PATHS if p != "nginx" or shutil.which("nginx") or
                Path("/usr/sbin/nginx").exists()]
    latency = markdown_table(text, proxy_overhead.LATENCY_COLUMNS)
    assert [r[0] for r in latency] == expected, text
    assert all(float(r[2]) > 0 and float(r[3]) >= float(r[2]) for r in latency), latency
    saturation = markdown_table(text, proxy_overhead.SATURATION_COLUMNS)
    assert [r[0] for r in saturation] == expected, text
    # Errors would be the proxies' (a 5xx, a dropped connection): at most a stray wrk timeout on a busy machine.
    seconds = proxy_overhead.SMOKE.saturation_s
    assert all(float(r[1]) > 0 and int(r[2]) <= max(1, 0.01 * float(r[1]) * seconds) for r in saturation), saturation
    assert "**peak during**" in text
    assert "Reproduce: `python -m bench.proxy_overhead --smoke" in text
    _pngs(tmp_path, proxy_overhead.LATENCY_PLOT)
    summary = json.loads((tmp_path / "proxy-overhead.json").read_text())
    assert summary["memory"]["clients"] == proxy_overhead.SMOKE.memory_clients
    _all_gone(summary["pids"] + summary["memory"]["pids"])


def test_lua_body_escapes_every_byte_wrk_could_misread() -> None:
    literal = proxy_overhead.lua_string('a"b\\\r\n你'.encode())
    assert literal == '"a\\034b\\092\\013\\010\\228\\189\\160"'


# Four torch processes (raw and sidecar, k = 1, 2) keep both cores busy for half a minute or more.
@pytest.mark.slow
@pytest.mark.xdist_group("serial")
@pytest.mark.timeout(150)
@pytest.mark.torch
def test_gpu_dry_run_on_cpu_runs_raw_and_sidecar_for_each_k(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    gpu.main(["--device", "cpu", "--tiny", "--ks", "1", "2", "--out", str(tmp_path)])
    text = (tmp_path / gpu.REPORT).read_text()

    rows = markdown_table(text, gpu.COLUMNS)
    assert [(int(r[0]), r[1]) for r in rows] == [(1, "raw"), (1, "sidecar"), (2, "raw"), (2, "sidecar")], text
    assert all(float(r[2]) > 0 and float(r[6]) >= float(r[5]) for r in rows), rows
    _pngs(tmp_path, gpu.THROUGHPUT_PLOT, gpu.LATENCY_PLOT)
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert summary["skipped"] is None and summary["failure"] is None and summary["left_out"] == []
    _all_gone(summary["pids"])


def test_gpu_benchmark_keeps_what_it_measured_when_a_k_fails(tmp_path: Path, monkeypatch: Any) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    window = gpu.Window(clients=1, window_s=1.0, completed=2, failed=0, latencies_s=(0.5, 0.5))

    def run_k(setup: gpu.Setup, k: int, work: Path) -> tuple[list[gpu.Point], list[int]]:
        if k == 2:
            raise RuntimeError("backend gpu0-1 exited 1: CUDA out of memory")
        return [gpu.Point(k=k, path=p, window=window, load_s=1.0) for p in ("raw", "sidecar")], []

    monkeypatch.setattr(gpu, "run_k", run_k)
    with pytest.raises(SystemExit) as exited:
        gpu.main(["--device", "cpu", "--tiny", "--ks", "1", "2", "4", "--out", str(tmp_path)])
    assert exited.value.code == 1
    text = (tmp_path / gpu.REPORT).read_text()
    assert "**The run failed**" in text and "CUDA out of memory" in text
    assert "Left out after the failure: k = 4." in text
    assert [(int(r[0]), r[1]) for r in markdown_table(text, gpu.COLUMNS)] == [(1, "raw"), (1, "sidecar")]


def test_gpu_benchmark_without_cuda_is_skipped_with_the_reason(tmp_path: Path, monkeypatch: Any,
                                                               capsys: Any) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu.main(["--out", str(tmp_path)])
    text = (tmp_path / gpu.REPORT).read_text()
    assert gpu.NO_CUDA in text and gpu.NO_CUDA == "skipped: no CUDA device (torch.cuda.is_available() is false)"
    assert gpu.NO_CUDA in capsys.readouterr().err


def test_gpu_benchmark_without_torch_is_skipped_with_the_reason(tmp_path: Path, monkeypatch: Any) -> None:
    real_import = builtins.__import__

    def no_torch(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    gpu.main(["--out", str(tmp_path)])
    assert "skipped: torch not installed" in (tmp_path / gpu.REPORT).read_text()
