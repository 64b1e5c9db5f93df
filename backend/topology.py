"""A live change of the pool's layout, planned: which backends run on, which start, which stop, in
what order. Pure: the pool carries the plan out (`BackendPool.apply`).

The order keeps capacity up. Backends with new ids start first, one at a time, while everything
old still serves; old backends stop last. Two things force a stop before a start:
- a backend whose id stays but whose launch changes (command, env, cwd, port) is replaced in place:
  ids are unique in the pool (metrics, dispatch), so the old one must go before the new one comes;
- a new backend whose port an old, going backend still holds must wait until that one is stopped.
Those starts are ordered so that the fewest old backends are stopped early: a start whose port is
free goes first, so its stop frees the port another start is waiting for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backend.settings import BackendsConfig, BackendSpec

__all__ = ["Identity", "Member", "Plan", "Start", "Step", "Stop", "launch_identity", "plan_changes"]

Identity = tuple[object, ...]
Member = tuple[BackendSpec, Identity]  # a backend's spec, and what makes it the same process


@dataclass(frozen=True, kw_only=True)
class Start:
    spec: BackendSpec  # start a new backend of this spec and wait until it is ready (or failed)


@dataclass(frozen=True, kw_only=True)
class Stop:
    backend_id: str  # drain the old backend of this id, stop it and remove it from the pool


Step = Start | Stop


@dataclass(frozen=True, kw_only=True)
class Plan:
    keep: tuple[BackendSpec, ...]  # the new specs of backends that run on untouched
    steps: tuple[Step, ...]  # to be done one at a time, in this order

    @property
    def reduces_capacity_early(self) -> bool:
        """True when some old backend stops before every start is done (see the module docstring)."""
        starts = [i for i, step in enumerate(self.steps) if isinstance(step, Start)]
        stops = [i for i, step in enumerate(self.steps) if isinstance(step, Stop)]
        return bool(starts and stops) and min(stops) < max(starts)


def launch_identity(config: BackendsConfig, spec: BackendSpec, *, python: str) -> Identity:
    """What makes a running backend the one `spec` of `config` describes: id, URL and, for a managed
    one, its exact launch (argv, environment, working directory)."""
    if not spec.managed or spec.gpu is None:
        return (spec.id, spec.url, "external")
    argv = tuple(config.command_argv(port=spec.port, gpu=spec.gpu, index=spec.index, python=python, host=spec.host))
    env = tuple(sorted(config.environment(port=spec.port, gpu=spec.gpu, index=spec.index, python=python,
                                          host=spec.host).items()))
    return (spec.id, spec.url, "managed", argv, env, str(config.cwd))


def plan_changes(old: Sequence[Member], new: Sequence[Member]) -> Plan:
    """The steps from the `old` pool to the `new` layout (both in layout order)."""
    old_identity = {spec.id: identity for spec, identity in old}
    keep = tuple(spec for spec, identity in new if old_identity.get(spec.id) == identity)
    kept = {spec.id for spec in keep}
    going = {spec.id: spec for spec, _ in old if spec.id not in kept}  # old order
    stopped: set[str] = set()
    steps: list[Step] = []

    def holders(spec: BackendSpec) -> list[str]:
        """Old backends still running that hold the port `spec` needs (other than its own old self)."""
        if not spec.managed:
            return []
        return [gid for gid, g in going.items()
                if gid not in stopped and gid != spec.id and g.managed and g.port == spec.port]

    def stop(backend_id: str) -> None:
        if backend_id in going and backend_id not in stopped:
            stopped.add(backend_id)
            steps.append(Stop(backend_id=backend_id))

    pending = [spec for spec, _ in new if spec.id not in kept]
    # New ids on free ports: start while all the old backends still serve.
    for spec in list(pending):
        if spec.id not in going and not holders(spec):
            steps.append(Start(spec=spec))
            pending.remove(spec)
    # Replacements in place and starts blocked by a port: prefer one whose port is free already.
    while pending:
        spec = next((s for s in pending if not holders(s)), pending[0])
        pending.remove(spec)
        stop(spec.id)
        for holder in holders(spec):
            stop(holder)
        steps.append(Start(spec=spec))
    for backend_id in going:
        stop(backend_id)
    return Plan(keep=keep, steps=tuple(steps))
