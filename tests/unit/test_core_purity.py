"""The scheduling core is pure: importing any of it pulls in neither asyncio nor aiohttp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = ("queue", "dispatch", "admission", "scheduler", "cost", "deadlines", "tenants", "retry", "concurrency",
        "classes", "running", "dispatch_step", "forecast", "ratelimit", "makespan")
CHECK = """
import importlib, sys
importlib.import_module({module!r})
print(",".join(name for name in ("asyncio", "aiohttp") if name in sys.modules))
"""


@pytest.mark.parametrize("name", PURE)
def test_importing_the_core_pulls_in_no_event_loop(name: str) -> None:
    module = f"scheduler.core.{name}"
    done = subprocess.run([sys.executable, "-c", CHECK.format(module=module)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing {module} imported {done.stdout.strip()}"


def test_the_check_notices_asyncio() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK.format(module="asyncio")], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.stdout.strip() == "asyncio"


def test_every_module_of_the_core_is_checked() -> None:
    modules = {path.stem for path in (REPO / "scheduler" / "core").glob("*.py") if path.stem != "__init__"}
    assert modules == set(PURE)
