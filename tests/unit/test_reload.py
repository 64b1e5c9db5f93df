"""What a reload applies and what it leaves for a restart (scheduler.runtime.control.RELOAD).

For every section of the file, a changed value is either applied (it is in the configuration the
sidecar runs on afterwards, and whatever holds on to it is told) or reported as needing a restart
(``ignored``) and kept at its running value: never half of each.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from scheduler.config import BackendsConfig, SidecarConfig, TasksConfig, load_config
from scheduler.runtime.build import build_scheduler, build_tenants
from scheduler.runtime.control import RELOAD, Control, ReloadResult, reloadable
from scheduler.runtime.metrics import Metrics


@dataclass(frozen=True)
class Change:
    """``text`` added to the base file changes one thing; ``ignored``: what the reload must say
    needs a restart ([]: applied)."""

    section: str
    text: str
    ignored: list[str]


CHANGES = [
    Change("listen", "listen: {port: 8123}\n", ["listen"]),
    Change("backends", "backends: {request_timeout_s: 100.0}\n", []),
    Change("limits", "limits: {max_text_chars: 500}\n", []),
    Change("limits", "limits: {body_timeout_s: 5.0}\n", []),
    Change("limits", "limits: {max_body_bytes: 4096}\n", ["limits.max_body_bytes"]),
    Change("limits", "limits: {idle_timeout_s: 10.0}\n", ["limits.idle_timeout_s"]),
    Change("classes", "classes: [{name: short, max_chars: 20}, {name: rest, max_chars: null}]\n", []),
    Change("cost", "cost: {base_s: 1.0}\n", []),
    Change("deadlines", "deadlines: {client_header: false}\n", []),
    Change("queue", "queue: {max_size: 7}\n", []),
    Change("priorities", "priorities: {default: batch}\n", []),
    Change("tenants", "tenants: {default: {weight: 2.0}}\n", []),
    Change("retries", "retries: {max_attempts: 3}\n", []),
    Change("tasks", "  max_per_tenant: 5\n", []),
    Change("tasks", "  ttl_s: 60.0\n  deadline_s: 30.0\n  sweep_interval_s: 1.0\n", []),
    Change("tasks", "  max_bytes_per_tenant: 2097152\n  min_free_bytes: 0\n", []),
    Change("tasks", "  callbacks: {timeout_s: 1.0, attempts: 2}\n", []),
    Change("tasks", "  enabled: false\n", ["tasks.enabled"]),
    Change("tasks", "  state_dir: {other}\n", ["tasks.state_dir"]),
    Change("admin", "admin: {token: admin-token-0123456789}\n", []),
    Change("prompts", "prompts: {allowed_dirs: [{voices}]}\n", []),
    Change("shutdown", "shutdown: {drain_timeout_s: 5.0}\n", ["shutdown"]),
    Change("logging", "logging: {level: DEBUG}\n", ["logging"]),
    Change("metrics", "metrics: {listen: {port: 9123}}\n", ["metrics"]),
    Change("openai", "openai: {voices: {narrator: {index: exampleB, sample_rate: 32000}}}\n", []),
    Change("openai", "openai: {models: {glm-tts: {sample_rate: 32000}}}\n", []),
    Change("openai", "openai: {enabled: false}\n", ["openai.enabled"]),
    Change("cache", "cache: {enabled: true}\n", []),
    Change("cache", "cache: {max_bytes: 1024, ttl_s: 5.0, shared: true}\n", []),
    Change("cache", "cache: {disk: true}\n", ["cache.disk"]),  # opened and read back at start
    Change("fanout", "fanout: {enabled: true, max_chars: 120, pause_s: 0.1, crossfade_s: 0.0}\n", []),  # read at use
]


def file_text(tmp_path: Path, change: str = "") -> str:
    """The base file (tasks stored under ``tmp_path``) plus ``change``. Lines indented by two
    spaces go into the tasks section (a state_dir there replaces the base one); ``{other}`` and
    ``{voices}`` name directories under ``tmp_path``."""
    tasks = "tasks:\n" if "  state_dir:" in change else f"tasks:\n  state_dir: {tmp_path / 'state'}\n"
    text = tasks + change  # top-level sections follow the tasks section; indented lines continue it
    return text.replace("{other}", str(tmp_path / "other-state")).replace("{voices}", str(tmp_path / "voices"))


def load(tmp_path: Path, change: str = "") -> SidecarConfig:
    (tmp_path / "voices").mkdir(exist_ok=True)
    path = tmp_path / "sidecar.yaml"
    path.write_text(file_text(tmp_path, change))
    return load_config(path)


def test_the_table_covers_every_section_and_names_only_real_keys() -> None:
    assert list(RELOAD) == list(SidecarConfig.model_fields)
    for name, how in RELOAD.items():
        assert not (how.restart and (how.restart_keys or how.then)), name  # nothing to apply if it waits
        if how.restart_keys:
            section = SidecarConfig.model_fields[name].annotation
            assert isinstance(section, type)
            assert set(how.restart_keys) <= set(section.model_fields), name


def test_the_changes_below_cover_every_section() -> None:
    assert {change.section for change in CHANGES} == set(SidecarConfig.model_fields)


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: f"{c.section}:{c.text.strip()}")
def test_a_changed_value_is_applied_or_needs_a_restart(tmp_path: Path, change: Change) -> None:
    old = load(tmp_path)
    new = load(tmp_path, change.text)
    assert getattr(new, change.section) != getattr(old, change.section)  # the change is real
    effective, ignored = reloadable(old, new)
    assert ignored == change.ignored
    for name in SidecarConfig.model_fields:
        if name != change.section:
            assert getattr(effective, name) == getattr(old, name), name
    running, wanted, result = (getattr(c, change.section) for c in (old, new, effective))
    if not ignored:
        assert result == wanted
    elif ignored == [change.section]:
        assert result == running
    else:  # one key of the section: it keeps its running value, and nothing else of it changed
        key = ignored[0].split(".", 1)[1]
        assert getattr(result, key) == getattr(running, key) != getattr(wanted, key)
        assert result == running


def test_a_section_with_live_and_restart_keys_applies_the_live_ones_only(tmp_path: Path) -> None:
    old = load(tmp_path)
    new = load(tmp_path, "  state_dir: {other}\n  max_per_tenant: 5\n  enabled: false\n")
    effective, ignored = reloadable(old, new)
    assert ignored == ["tasks.enabled", "tasks.state_dir"]
    assert effective.tasks.max_per_tenant == 5
    assert (effective.tasks.enabled, effective.tasks.state_dir) == (True, tmp_path / "state")
    both = load(tmp_path, "limits: {max_text_chars: 500, max_body_bytes: 4096}\n")
    effective, ignored = reloadable(old, both)
    assert ignored == ["limits.max_body_bytes"]
    assert (effective.limits.max_text_chars, effective.limits.max_body_bytes) == (500, old.limits.max_body_bytes)


def test_ignored_sections_come_in_file_order(tmp_path: Path) -> None:
    old = load(tmp_path)
    new = load(tmp_path, "listen: {port: 8123}\nlogging: {level: DEBUG}\nlimits: {idle_timeout_s: 10.0}\n"
                         "queue: {max_size: 7}\n")
    effective, ignored = reloadable(old, new)
    assert ignored == ["listen", "limits.idle_timeout_s", "logging"]
    assert effective.queue.max_size == 7


# --- Control: the result it reports, what it tells the parts that hold on to settings ---------


class FakeRuntime:
    """What Control uses of scheduler.runtime.context.Runtime, recording each reconfiguration."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.scheduler = build_scheduler(config)
        self.tenants = build_tenants(config)
        self.metrics = Metrics()
        self.reconfigured: list[SidecarConfig] = []

    def reconfigure(self, config: SidecarConfig, scheduler: Any, tenants: Any) -> None:
        self.config, self.scheduler, self.tenants = config, scheduler, tenants
        self.reconfigured.append(config)


class FakePool:
    def __init__(self) -> None:
        self.applied: list[tuple[BackendsConfig, float]] = []

    async def apply(self, config: BackendsConfig, *, drain_timeout_s: float) -> None:
        self.applied.append((config, drain_timeout_s))


class FakeTasks:
    def __init__(self) -> None:
        self.configs: list[TasksConfig] = []

    def reconfigure(self, config: TasksConfig) -> None:
        self.configs.append(config)


@dataclass
class Rig:
    control: Control
    runtime: FakeRuntime
    pool: FakePool
    tasks: FakeTasks
    path: Path

    async def reload(self, change: str) -> ReloadResult:
        self.path.write_text(file_text(self.path.parent, change))
        result = await self.control.reload("test")
        await asyncio.sleep(0)  # let a topology change start
        return result


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    config = load(tmp_path)
    runtime, pool, tasks = FakeRuntime(config), FakePool(), FakeTasks()
    control = Control(runtime, pool, config_path=str(tmp_path / "sidecar.yaml"),  # type: ignore[arg-type]
                      tasks=tasks)  # type: ignore[arg-type]
    return Rig(control, runtime, pool, tasks, tmp_path / "sidecar.yaml")


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: f"{c.section}:{c.text.strip()}")
async def test_control_reports_and_runs_on_what_applies(rig: Rig, change: Change) -> None:
    old = rig.runtime.config
    result = await rig.reload(change.text)
    assert (result.ok, result.changed, result.ignored, result.problems) == (True, [change.section], change.ignored, [])
    assert rig.runtime.reconfigured == [reloadable(old, load(rig.path.parent, change.text))[0]]
    assert rig.control.reloads == 1 and rig.control.reload_failures == 0


async def test_a_new_backends_section_goes_to_the_pool(rig: Rig) -> None:
    await rig.reload("queue: {max_size: 7}\n")
    assert rig.pool.applied == []
    await rig.reload("queue: {max_size: 7}\nbackends: {request_timeout_s: 100.0}\n")
    assert [(c.request_timeout_s, t) for c, t in rig.pool.applied] == [(100.0, 30.0)]
    # A new drain timeout needs a restart: the topology change drains with the running one.
    await rig.reload("backends: {request_timeout_s: 50.0}\nshutdown: {drain_timeout_s: 5.0}\n")
    assert [(c.request_timeout_s, t) for c, t in rig.pool.applied] == [(100.0, 30.0), (50.0, 30.0)]


async def test_the_task_service_gets_the_live_keys_and_never_a_restart_key(rig: Rig) -> None:
    await rig.reload("queue: {max_size: 7}\n")
    assert rig.tasks.configs == []
    await rig.reload("  state_dir: {other}\n")  # needs a restart, and nothing else changed
    assert rig.tasks.configs == []
    result = await rig.reload("  state_dir: {other}\n  max_per_tenant: 5\n  enabled: false\n")
    assert result.ignored == ["tasks.enabled", "tasks.state_dir"]
    assert len(rig.tasks.configs) == 1
    given = rig.tasks.configs[0]
    assert (given.max_per_tenant, given.enabled, given.state_dir) == (5, True, rig.path.parent / "state")
    assert rig.runtime.config.tasks == given


async def test_new_classes_and_tenants_get_their_metric_series(rig: Rig) -> None:
    def series() -> str:
        return generate_latest(rig.runtime.metrics.registry).decode()

    assert 'class="tiny"' not in series() and 'tenant="acme"' not in series()
    await rig.reload("classes: [{name: tiny, max_chars: 20}, {name: rest, max_chars: null}]\n"
                     "tenants: {trust_header: true, list: [{name: acme}]}\n")
    assert 'class="tiny"' in series() and 'tenant="acme"' in series()


async def test_a_refused_file_changes_nothing(rig: Rig) -> None:
    result = await rig.reload("queue: {max_size: -1}\n")
    assert not result.ok and result.problems and result.changed == []
    assert rig.runtime.reconfigured == [] and rig.pool.applied == [] and rig.tasks.configs == []
    assert (rig.control.reloads, rig.control.reload_failures) == (0, 1)
