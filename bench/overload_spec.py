"""What the overload benchmark runs and judges, shared by the runner (bench.overload) and the
report (bench.overload_report): tenants, arms and their priors, SLOs and the sidecar's deadline
tiers, the plan of a run and the results it gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import Record, Tenant
from bench.summary import MEDIUM_MAX_CHARS, SHORT_MAX_CHARS, RunSummary
from glmtts.emulator.timing import LONG_SECONDS, SHORT_SECONDS, ServiceModel
from glmtts.emulator.upstream import UpstreamConfig
from scheduler.core.deadlines import SEED_TIERS

TENANTS = (
    Tenant(name="heavy", key="bench-heavy-key-0123456789", share=0.6),
    Tenant(name="light-a", key="bench-light-a-key-0123456789", share=0.2),
    Tenant(name="light-b", key="bench-light-b-key-0123456789", share=0.2),
)
NGINX, SEED, HIGH, LOW, SLOTS1 = "nginx", "seed", "sidecar-high", "sidecar-low", "slots1"
ORACLES = tuple(f"oracle-slots{n}" for n in range(1, 5))
DEFAULT_ARMS = (NGINX, SEED, HIGH, LOW, *ORACLES)  # the default curve's arms
FLAT_ARMS = (HIGH, SLOTS1)  # the flat curve's
ARMS = (*DEFAULT_ARMS, SLOTS1)
SIDECAR_ARMS = ARMS[1:]
# Each arm's cost priors as a multiple of the emulator's true model.
PRIOR_ERROR = {SEED: 1.0, HIGH: 2.0, LOW: 0.5, SLOTS1: 2.0, **{arm: 1.0 for arm in ORACLES}}
ARM_SLOTS = {SEED: 13, SLOTS1: 1, **{arm: n for n, arm in enumerate(ORACLES, 1)}}  # backends.slots written
# Arms run by bench.fanout, not by this benchmark's command line: a sidecar arm above plus the
# production example's `fanout` section (bench.overload.production_fanout).
HIGH_FANOUT = f"{HIGH}+fanout"
FANOUT_ARMS = {HIGH_FANOUT: HIGH}
_UPSTREAM = UpstreamConfig()


def describe(arm: str) -> str:
    """What arm `arm` runs, in one line (the report's arm table)."""
    if arm == NGINX:
        return (f"nginx `least_conn` over the emulators; only upstream's own {_UPSTREAM.short_concurrency}/"
                f"{_UPSTREAM.long_concurrency} semaphores and {_UPSTREAM.short_timeout_s}/{_UPSTREAM.medium_timeout_s}/"
                f"{_UPSTREAM.long_timeout_s} s timeouts (scaled) inside each process")
    priors = "the true model" if PRIOR_ERROR[arm] == 1 else f"{PRIOR_ERROR[arm]:g}× the true model"
    slots = f"`backends.slots: {ARM_SLOTS[arm]}`" if arm in ARM_SLOTS else "the default slots"
    if arm == SEED:
        return (f"sidecar as the seed proposed: `queue.order: fifo`, deadlines = the SLO, `reject_unmeetable: false`, "
                f"{slots}, classes without caps, cost priors {priors}")
    return (f"sidecar, operator config (backends, deadlines = the SLO, tenants, cost priors {priors}), {slots}; "
            "everything else the sidecar's defaults")


CURVES = ("default", "flat")  # the emulator's in-process throughput curve, or `--throughput 1`
SLO_POLICIES = ("dynamic", "lenient")
DEFAULT_LOADS = (0.5, 1.0, 1.3, 2.5)
JITTER = 0.25  # log-normal sigma of every backend's service time
# The seed's dynamic timeouts at time scale 1: expected time x buffer, interpolated by length.
SEED_BUFFER = 1.5
SHORT_SLO_S = SHORT_SECONDS * 2 + 10.0  # <= SHORT_MAX_CHARS
LONG_SLO_S = LONG_SECONDS * SEED_BUFFER + 120.0  # > MEDIUM_MAX_CHARS
LENIENT_TIERS: tuple[tuple[int | None, float], ...] = tuple(  # the seed's fixed tiers
    (tier.max_chars, tier.timeout_s) for tier in SEED_TIERS)
# Seconds one run costs beyond its arrival window on a 2-core machine (start, warm-up, the tail of
# answers up to the largest SLO, settle, stop), as measured there at time scale 0.03: only for the
# estimate printed at the start; progress lines and the report give the measured times.
RUN_OVERHEAD_S = 10.0
CAP_MARGIN_S = 2.0  # the generator waits for answers until the window + the largest SLO + this


def slo_s(chars: int, policy: str, time_scale: float) -> float:
    """When a request of `chars` characters must be answered to count, seconds at `time_scale`."""
    if policy == "lenient":
        seconds = next(s for limit, s in LENIENT_TIERS if limit is None or chars <= limit)
    elif chars <= SHORT_MAX_CHARS:
        seconds = SHORT_SLO_S
    elif chars <= MEDIUM_MAX_CHARS:
        seconds = SEED_BUFFER * (SHORT_SECONDS + (LONG_SECONDS - SHORT_SECONDS) * chars / MEDIUM_MAX_CHARS)
    else:
        seconds = LONG_SLO_S
    return seconds * time_scale


def deadline_tiers(policy: str, time_scale: float) -> list[dict[str, Any]]:
    """The sidecar's `deadlines.tiers` giving every request a deadline equal to its SLO."""
    if policy == "lenient":
        return [{"max_chars": limit, "timeout_s": s * time_scale} for limit, s in LENIENT_TIERS]
    per_char = SEED_BUFFER * (LONG_SECONDS - SHORT_SECONDS) / MEDIUM_MAX_CHARS
    return [{"max_chars": SHORT_MAX_CHARS, "timeout_s": SHORT_SLO_S * time_scale},
            {"max_chars": MEDIUM_MAX_CHARS, "timeout_s": SEED_BUFFER * SHORT_SECONDS * time_scale,
             "per_char_s": per_char * time_scale},
            {"max_chars": None, "timeout_s": LONG_SLO_S * time_scale}]


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What every run shares: emulator time scale and noise, arrival window, SLO, trace seed."""

    time_scale: float = 0.02
    duration_s: float = 20.0  # seconds of arrivals measured
    # Seconds of the same trace offered before the measured window and not counted: a sidecar in
    # service has been running for days, so what its slots: auto and cost model learn in the first
    # seconds after a start is not its steady state. Every arm, nginx included, gets the same.
    preroll_s: float = 10.0
    slo: str = "dynamic"  # a SLO_POLICIES name
    jitter: float = JITTER
    seed: int = 20240611
    warmup_rounds: int = 2

    def slo_s(self, chars: int) -> float:
        return slo_s(chars, self.slo, self.time_scale)

    @property
    def max_slo_s(self) -> float:
        return max(self.slo_s(chars) for chars in (SHORT_MAX_CHARS, MEDIUM_MAX_CHARS, MEDIUM_MAX_CHARS + 1))

    def work_s(self, text_units: float) -> float:
        """A request's work: its solo service seconds by the emulator's model mean, scaled."""
        return ServiceModel().mean_seconds(text_units) * self.time_scale


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One pool, trace and throughput curve, and the arms and loads run on it."""

    backends: int
    trace: str  # a bench.loadgen.MIXES name
    curve: str  # a CURVES name
    arms: tuple[str, ...]
    loads: tuple[float, ...]
    oracle_loads: tuple[float, ...]  # where the oracle arms run

    @property
    def key(self) -> str:
        return f"{self.backends} backends, {self.trace}, {self.curve} curve"

    @property
    def gpus(self) -> list[str]:
        """One emulated GPU per backend (one process per GPU, as the seed deploys)."""
        return [str(i) for i in range(self.backends)]

    def points(self) -> list[tuple[str, float]]:
        """(arm, load) of every run, load by load."""
        return [(arm, load) for load in sorted({*self.loads, *self.oracle_loads}) for arm in self.arms
                if load in (self.oracle_loads if arm in ORACLES else self.loads)]


@dataclass(frozen=True, kw_only=True)
class Plan:
    setup: Setup
    cells: tuple[Cell, ...]

    @property
    def runs(self) -> int:
        return sum(len(c.points()) for c in self.cells)

    def estimate_s(self) -> float:
        return self.runs * (self.setup.preroll_s + self.setup.duration_s + RUN_OVERHEAD_S)


SMOKE = Plan(setup=Setup(time_scale=0.01, duration_s=2.5, preroll_s=1.0, warmup_rounds=1),
             cells=(Cell(backends=2, trace="bimodal", curve="default", arms=(NGINX, HIGH, ORACLES[0], ORACLES[1]),
                         loads=(0.5, 2.5), oracle_loads=(2.5,)),))


@dataclass
class RunResult:
    """One (arm, load) point: its summary, the raw records (for the plots) and how it ran."""

    summary: RunSummary
    records: list[Record] = field(repr=False)
    pids: list[int] = field(default_factory=list)  # every process the run started, all stopped
    slots: dict[str, float] = field(default_factory=dict)  # sidecar arms: each backend's slots at the end
    config_yaml: str | None = None  # sidecar arms: the whole file it ran with
    wall_s: float = 0.0
    fanout: dict[str, float] = field(default_factory=dict)  # sidecar arms: requests split and declined, by reason


@dataclass
class CellResult:
    cell: Cell
    mean_work_s: float  # work per request of the trace's mix
    runs: list[RunResult]
    skipped: dict[str, str] = field(default_factory=dict)  # arm -> why it did not run


@dataclass
class BenchResult:
    setup: Setup
    cells: list[CellResult]
    wall_s: float
    command: str


def arrival_rate(load: float, backends: int, work_s: float) -> float:
    """Requests per second offering `load` x the pool's capacity (`backends` work-seconds per second)."""
    return load * backends / work_s


def emulator_args(setup: Setup, curve: str) -> list[str]:
    flat = ["--throughput", "1"] if curve == "flat" else []
    return ["--time-scale", f"{setup.time_scale:g}", "--jitter", f"{setup.jitter:g}", *flat]
