"""Planning a live layout change: what runs on, what starts and stops, in an order that keeps capacity."""

from __future__ import annotations

import json

from backend.topology import Plan, Start, Stop, launch_identity, plan_changes
from scheduler.config import BackendsConfig, parse_config

EMULATOR = ["{python}", "-m", "glmtts.emulator", "--port", "{port}"]


def config(**backends: object) -> BackendsConfig:
    backends.setdefault("command", EMULATOR)
    backends.setdefault("base_port", 20000)
    return parse_config(json.dumps({"backends": backends})).backends


def plan(old: BackendsConfig, new: BackendsConfig) -> Plan:
    return plan_changes([(s, launch_identity(old, s, python="py")) for s in old.layout()],
                        [(s, launch_identity(new, s, python="py")) for s in new.layout()])


def steps(p: Plan) -> list[str]:
    return [f"start {s.spec.id}@{s.spec.port}" if isinstance(s, Start) else f"stop {s.backend_id}" for s in p.steps]


def test_same_config_keeps_everything() -> None:
    c = config(gpus=["0", "1"], external=["http://10.0.0.1:80"])
    p = plan(c, c)
    assert [s.id for s in p.keep] == ["gpu0-0", "gpu1-0", "ext-0"]
    assert p.steps == () and not p.reduces_capacity_early


def test_growing_starts_the_new_ones_and_shrinking_stops_them() -> None:
    two, three = config(gpus=["0", "1"]), config(gpus=["0", "1", "2"])
    grow = plan(two, three)
    assert [s.id for s in grow.keep] == ["gpu0-0", "gpu1-0"]
    assert steps(grow) == ["start gpu2-0@20002"]
    shrink = plan(three, two)
    assert [s.id for s in shrink.keep] == ["gpu0-0", "gpu1-0"]
    assert steps(shrink) == ["stop gpu2-0"]
    assert not grow.reduces_capacity_early and not shrink.reduces_capacity_early


def test_more_processes_per_gpu_start_first_on_free_ports_and_replace_moved_ones() -> None:
    # gpu1-0 moves from 20001 to 20002; the new gpu0-1 needs 20001, which the old gpu1-0 holds.
    p = plan(config(gpus=["0", "1"]), config(gpus=["0", "1"], processes_per_gpu=2))
    assert [s.id for s in p.keep] == ["gpu0-0"]
    assert steps(p) == ["start gpu1-1@20003", "stop gpu1-0", "start gpu1-0@20002", "start gpu0-1@20001"]
    assert p.reduces_capacity_early


def test_fewer_processes_per_gpu() -> None:
    p = plan(config(gpus=["0", "1"], processes_per_gpu=2), config(gpus=["0", "1"]))
    # gpu1-0 moves from 20002 to 20001, held by the going gpu0-1.
    assert steps(p) == ["stop gpu1-0", "stop gpu0-1", "start gpu1-0@20001", "stop gpu1-1"]


def test_a_base_port_shift_onto_running_ports_frees_each_port_before_it_is_used() -> None:
    p = plan(config(gpus=["0", "1"]), config(gpus=["0", "1"], base_port=20001))
    # gpu1-0 first: its new port 20002 is free, and stopping it frees 20001 for gpu0-0.
    assert steps(p) == ["stop gpu1-0", "start gpu1-0@20002", "stop gpu0-0", "start gpu0-0@20001"]


def test_swapped_ports_break_the_cycle() -> None:
    p = plan(config(gpus=["0", "1"]), config(gpus=["1", "0"]))
    # gpu1-0 now takes 20000 (the old gpu0-0's) and gpu0-0 takes 20001 (the old gpu1-0's).
    assert steps(p) == ["stop gpu1-0", "stop gpu0-0", "start gpu1-0@20000", "start gpu0-0@20001"]


def test_a_new_command_or_env_replaces_every_backend_in_place() -> None:
    old = config(gpus=["0", "1"])
    for new in (config(gpus=["0", "1"], command=[*EMULATOR, "--seed", "1"]),
                config(gpus=["0", "1"], env={"CUDA_VISIBLE_DEVICES": "{gpu}"}),
                config(gpus=["0", "1"], cwd="/tmp")):
        p = plan(old, new)
        assert p.keep == ()
        assert steps(p) == ["stop gpu0-0", "start gpu0-0@20000", "stop gpu1-0", "start gpu1-0@20001"]


def test_the_index_placeholder_makes_a_moved_index_a_new_launch() -> None:
    with_index = [*EMULATOR, "--seed", "{index}"]
    p = plan(config(gpus=["1"], command=with_index), config(gpus=["0", "1"], command=with_index, base_port=19999))
    # gpu1-0 keeps port 20000 but its index goes from 0 to 1: a new launch.
    assert p.keep == ()
    assert steps(p) == ["start gpu0-0@19999", "stop gpu1-0", "start gpu1-0@20000"]


def test_externals_are_kept_by_url_and_never_block_ports() -> None:
    old = config(gpus=["0"], external=["http://10.0.0.1:80", "http://10.0.0.2:80"])
    new = config(gpus=["0"], external=["http://10.0.0.2:80"])
    p = plan(old, new)
    assert [s.id for s in p.keep] == ["gpu0-0"]
    # ext-0 now names 10.0.0.2: the old ext-0 (10.0.0.1) goes first, then the new one starts.
    assert steps(p) == ["stop ext-0", "start ext-0@80", "stop ext-1"]


def test_every_step_is_a_start_or_stop_with_unique_ids_at_all_times() -> None:
    layouts = [config(gpus=g, processes_per_gpu=n, base_port=b) for g in (["0"], ["0", "1"], ["1", "0", "2"])
               for n in (1, 2) for b in (20000, 20001, 20003)]
    for old in layouts:
        for new in layouts:
            p = plan(old, new)
            running = {s.id: s.port for s in old.layout()}
            for step in p.steps:
                if isinstance(step, Stop):
                    assert step.backend_id in running
                    del running[step.backend_id]
                else:
                    assert step.spec.id not in running  # ids stay unique
                    assert step.spec.port not in running.values()  # a port is free before it is used
                    running[step.spec.id] = step.spec.port
            assert running == {s.id: s.port for s in new.layout()}
