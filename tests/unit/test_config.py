from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest

from scheduler import default_config as config_module
from scheduler.config import (
    BackendSpec,
    ClassConfig,
    ConfigError,
    CostConfig,
    DeadlinesConfig,
    LearnedDeadlineConfig,
    QueueConfig,
    SidecarConfig,
    TenantPolicy,
    default_config_path,
    default_config_text,
    load_config,
    parse_config,
)
from scheduler.core.concurrency import AdaptiveSettings, SlotPolicy
from scheduler.runtime.build import build_scheduler
from scheduler.runtime.control import Control

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [REPO / "config" / "sidecar.yaml", REPO / "config" / "glmtts-production.yaml"]
PRODUCTION_KEYS = {
    "GLMTTS_SIDECAR_KEY_EXAMPLE_APP": "prod-key-0123456789abcdef",
    "GLMTTS_SIDECAR_KEY_EXAMPLE_APP_NEXT": "prod-key-next-0123456789",
}
PRODUCTION_ADMIN_TOKEN = {"GLMTTS_SIDECAR_ADMIN_TOKEN": "admin-token-0123456789abcdef"}
EMULATOR_TIME_SCALE = 0.05


def problems_of(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


@pytest.fixture
def production_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**PRODUCTION_KEYS, **PRODUCTION_ADMIN_TOKEN}.items():
        monkeypatch.setenv(name, value)


# -- shipped files ------------------------------------------------------------------------------


def test_default_file_is_exactly_the_defaults_but_for_the_scaled_priors_and_deadlines() -> None:
    shipped = load_config(None)
    assert shipped.model_copy(update={"cost": CostConfig(), "deadlines": DeadlinesConfig()}) == SidecarConfig()
    assert shipped.cost != CostConfig()
    assert parse_config("{}") == parse_config("") == SidecarConfig()


def test_default_files_deadlines_are_the_built_in_ones_times_the_emulators_time_scale() -> None:
    shipped, built_in = load_config(None).deadlines, DeadlinesConfig()
    for chars in (1, 50, 51, 200, 201, 10_000):
        assert shipped.tier_for(chars) == pytest.approx(built_in.tier_for(chars) * EMULATOR_TIME_SCALE)
    for name in ("buffer_s", "min_s", "max_s"):
        assert getattr(shipped.learned, name) == pytest.approx(getattr(built_in.learned, name) * EMULATOR_TIME_SCALE)
    assert shipped.model_dump(exclude={"tiers", "learned"}) == built_in.model_dump(exclude={"tiers", "learned"})
    assert shipped.learned.factor == built_in.learned.factor


def test_default_file_names_the_built_in_value_of_every_scaled_key() -> None:
    """The file's header says keys marked "built-in:" differ from what a missing key becomes."""
    text = default_config_text()
    built_in = SidecarConfig()
    for value in (built_in.cost.base_s, built_in.cost.per_unit_s, built_in.cost.reload_s,
                  built_in.deadlines.learned.buffer_s, built_in.deadlines.learned.min_s,
                  built_in.deadlines.learned.max_s):
        assert f"built-in: {value!r}" in text
    assert "built-in: " + ", ".join(repr(t.timeout_s) for t in built_in.deadlines.tiers[:-1]) in text


def test_tiers_per_char_s_grows_the_deadline_with_the_text() -> None:
    config = parse_config("deadlines: {tiers: [{max_chars: 50, timeout_s: 17}, "
                          "{max_chars: 200, timeout_s: 5.25, per_char_s: 0.57375}, {max_chars: null, timeout_s: 240}]}")
    assert config.deadlines.tier_for(50) == 17.0
    assert config.deadlines.tier_for(100) == pytest.approx(5.25 + 57.375)
    assert config.deadlines.tier_for(201) == 240.0
    scheduler = build_scheduler(config)
    assert scheduler.deadlines.budget_s(chars=100, prediction=scheduler.cost.predict(100, (24000, False))) \
        == pytest.approx(5.25 + 57.375)
    assert problems_of("deadlines: {tiers: [{max_chars: null, timeout_s: 1, per_char_s: -0.1}]}") == (
        "deadlines.tiers[0].per_char_s: input should be greater than or equal to 0 (got -0.1)",)


def test_default_files_cost_priors_are_the_seeds_times_the_emulators_time_scale() -> None:
    shipped, seed = load_config(None), CostConfig()
    command = shipped.backends.command
    assert command[command.index("--time-scale") + 1] == str(EMULATOR_TIME_SCALE)
    for name in ("base_s", "per_unit_s", "reload_s"):
        assert getattr(shipped.cost, name) == pytest.approx(getattr(seed, name) * EMULATOR_TIME_SCALE)
    unscaled = {"base_s", "per_unit_s", "reload_s"}
    assert shipped.cost.model_dump(exclude=unscaled) == seed.model_dump(exclude=unscaled)
    # The seed: ~3.5 s at ~20 cost units, ~80 s at ~500.
    assert seed.base_s + seed.per_unit_s * 20 == pytest.approx(3.5)
    assert seed.base_s + seed.per_unit_s * 500 == pytest.approx(80.0)


def test_default_config_text_is_the_default_file() -> None:
    assert default_config_text() == (REPO / "config" / "sidecar.yaml").read_text(encoding="utf-8")
    assert default_config_path() == REPO / "config" / "sidecar.yaml"


def test_default_config_path_falls_back_to_package_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_SOURCE_TREE_DEFAULT", REPO / "no-such-dir" / "sidecar.yaml")
    path = default_config_path()
    assert path.name == "default_config.yaml"
    assert path.parent == Path(config_module.__file__).resolve().parent


@pytest.mark.usefixtures("production_env")
def test_production_example_loads_without_path_checks() -> None:
    production = load_config(REPO / "config" / "glmtts-production.yaml", check_paths=False)
    backends = production.backends
    assert backends.cwd == Path("/opt/GLM-TTS")
    assert [spec.id for spec in backends.layout()][:3] == ["gpu0-0", "gpu0-1", "gpu1-0"]
    assert len(backends.layout()) == 8
    assert backends.command_argv(port=18053, gpu="1", index=3, python="/py", host="127.0.0.1") == [
        "uvicorn", "tools.api_server:app", "--host", "127.0.0.1", "--port", "18053",
    ]
    assert "--workers" not in backends.command
    assert backends.environment(port=18053, gpu="1", index=3, python="/py", host="h") == {
        "CUDA_VISIBLE_DEVICES": "1", "PYTHONUNBUFFERED": "1",
    }
    assert backends.health.start_timeout_s == 600.0
    assert backends.warmup.enabled and backends.warmup.model_key == (24000, False)
    assert backends.restart.crash_loop.window_s == 600.0  # a start takes minutes there
    assert (backends.watchdog.min_s, backends.watchdog.unresponsive_s) == (60.0, 30.0)
    assert production.listen.host == "127.0.0.1"
    assert production.cost == CostConfig()  # the seed's priors, unscaled
    assert production.deadlines.policy == "learned"
    assert production.deadlines.tier_for(51) == 300.0
    assert production.class_of(201).max_in_service == 3
    by_key = production.tenants.by_key()
    assert set(by_key) == set(PRODUCTION_KEYS.values())
    assert {tenant.name for tenant in by_key.values()} == {"example-app"}


def test_production_example_names_its_missing_key_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*PRODUCTION_KEYS, *PRODUCTION_ADMIN_TOKEN]:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / "config" / "glmtts-production.yaml", check_paths=False)
    assert caught.value.problems == (
        *(f"tenants.list[0].keys[{i}]: environment variable {name} is not set"
          for i, name in enumerate(PRODUCTION_KEYS)),
        "admin.token: environment variable GLMTTS_SIDECAR_ADMIN_TOKEN is not set",
    )


@pytest.mark.usefixtures("production_env")
def test_production_paths_are_checked_against_this_machine(tmp_path: Path) -> None:
    text = (REPO / "config" / "glmtts-production.yaml").read_text(encoding="utf-8")
    missing = tmp_path / "GLM-TTS"
    with pytest.raises(ConfigError) as caught:
        parse_config(text.replace("/opt/GLM-TTS", str(missing)), "prod.yaml")
    assert caught.value.problems == (
        f"backends.cwd: not an existing directory: {missing}",
        f"prompts.allowed_dirs[0]: not an existing directory: {missing / 'examples' / 'prompt'}",
    )
    (missing / "examples" / "prompt").mkdir(parents=True)
    production = parse_config(text.replace("/opt/GLM-TTS", str(missing)))
    assert production.backends.cwd == missing
    assert production.prompts.allowed_dirs == (missing / "examples" / "prompt",)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_key_in_shipped_files_is_commented(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        commented_above = number > 0 and lines[number - 1].lstrip().startswith("#")
        assert "#" in line or commented_above, f"{path.name}:{number + 1} has no comment: {line}"


# -- values -------------------------------------------------------------------------------------


def test_empty_mapping_gives_documented_defaults() -> None:
    config = parse_config("{}")
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8049)
    assert config.backends.gpus == ("0", "1")
    assert config.backends.base_port == 18050
    assert config.backends.cwd is None
    assert config.backends.health.start_timeout_s == 120.0
    assert config.backends.restart.backoff_max_s == 30.0
    assert (config.backends.health.rise, config.backends.health.fall) == (2, 3)
    warmup = config.backends.warmup
    assert (warmup.enabled, warmup.text, warmup.index) == (True, "你好，欢迎使用语音合成服务。", "exampleA")
    assert (warmup.sample_rate, warmup.use_phoneme, warmup.timeout_s) == (24000, False, 600.0)
    crash_loop = config.backends.restart.crash_loop
    assert (crash_loop.max_failures, crash_loop.window_s, crash_loop.cooldown_s) == (5, 60.0, 300.0)
    outlier = config.backends.outlier
    assert (outlier.consecutive_failures, outlier.latency_ratio, outlier.min_requests) == (5, 4.0, 5)
    assert (outlier.base_ejection_s, outlier.max_ejection_s) == (10.0, 300.0)
    watchdog = config.backends.watchdog
    assert (watchdog.factor, watchdog.min_s, watchdog.unresponsive_s) == (5.0, 30.0, 10.0)
    assert config.limits.max_body_bytes == 20 * 1024 * 1024
    assert config.queue.max_size == 100
    assert config.logging.level == "INFO"
    assert config.logging.format == "text"


def test_watchdog_limit_is_factor_times_p95_but_never_below_min_s() -> None:
    watchdog = parse_config("backends: {watchdog: {factor: 5, min_s: 30}}").backends.watchdog
    assert watchdog.limit_s(2.0) == 30.0
    assert watchdog.limit_s(10.0) == 50.0


def test_conversions_at_load() -> None:
    config = parse_config(
        "backends:\n  gpus: [0, 3]\n  env: {OMP_NUM_THREADS: 4}\n"
        "  command: \"{python} -m x --port {port} --name 'a b'\"\n"
        "logging: {level: debug}\nlisten: {port: 0}\n"
    )
    assert config.backends.gpus == ("0", "3")
    assert config.backends.env == {"OMP_NUM_THREADS": "4"}
    assert config.backends.command == ("{python}", "-m", "x", "--port", "{port}", "--name", "a b")
    assert config.logging.level == "DEBUG"
    assert config.listen.port == 0


def test_relative_cwd_is_taken_from_the_config_files_directory(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    file = tmp_path / "conf.yaml"
    file.write_text("backends: {cwd: work}\n", encoding="utf-8")
    assert load_config(file).backends.cwd == tmp_path / "work"


def test_layout_ids_ports_and_externals() -> None:
    config = parse_config(
        "backends:\n  gpus: ['0', '1']\n  processes_per_gpu: 2\n  base_port: 20000\n"
        "  external: ['http://Other.example:9000/', 'https://tts.example']\n"
    )
    layout = config.backends.layout()
    assert [(s.id, s.index, s.gpu, s.port, s.managed) for s in layout] == [
        ("gpu0-0", 0, "0", 20000, True),
        ("gpu0-1", 1, "0", 20001, True),
        ("gpu1-0", 2, "1", 20002, True),
        ("gpu1-1", 3, "1", 20003, True),
        ("ext-0", 4, None, 9000, False),
        ("ext-1", 5, None, 443, False),
    ]
    assert layout[0] == BackendSpec(
        id="gpu0-0", index=0, gpu="0", host="127.0.0.1", port=20000, url="http://127.0.0.1:20000",
        managed=True,
    )
    assert [s.url for s in layout[4:]] == ["http://other.example:9000", "https://tts.example:443"]


def test_external_only_pool_and_ipv6_urls() -> None:
    config = parse_config("backends: {gpus: [], host: '::1', external: ['http://[::1]:7000']}")
    (spec,) = config.backends.layout()
    assert (spec.id, spec.host, spec.port, spec.url) == ("ext-0", "::1", 7000, "http://[::1]:7000")
    ipv6 = parse_config("backends: {gpus: ['0'], host: '::1'}").backends.layout()
    assert ipv6[0].url == "http://[::1]:18050"


def test_placeholder_substitution() -> None:
    config = parse_config(
        "backends:\n"
        "  command: ['{python}', '-c', 'print({{1: 2}})', '--port={port}', '--dev={gpu}',"
        " '{index}', '{host}']\n"
        "  env: {CUDA_VISIBLE_DEVICES: '{gpu}', LABEL: 'b{index}-{{x}}'}\n"
    )
    backends = config.backends
    argv = backends.command_argv(port=18051, gpu="1", index=1, python="/venv/bin/python", host="127.0.0.1")
    env = backends.environment(port=18051, gpu="1", index=1, python="/venv/bin/python", host="127.0.0.1")
    assert argv == [
        "/venv/bin/python", "-c", "print({1: 2})", "--port=18051", "--dev=1", "1", "127.0.0.1",
    ]
    assert env == {"CUDA_VISIBLE_DEVICES": "1", "LABEL": "b1-{x}"}


def test_config_is_frozen() -> None:
    config = parse_config("{}")
    with pytest.raises(pydantic.ValidationError):
        config.listen.port = 1
    with pytest.raises(pydantic.ValidationError):
        config.backends = config.backends
    with pytest.raises(pydantic.ValidationError):
        config.cost.base_s = 1.0
    with pytest.raises(pydantic.ValidationError):
        config.tenants.default.weight = 2.0
    with pytest.raises(AttributeError):
        config.backends.layout()[0].port = 1  # type: ignore[misc]


# -- scheduling policy --------------------------------------------------------------------------


def test_empty_mapping_gives_the_built_in_scheduling_policy() -> None:
    config = parse_config("{}")
    assert [(c.name, c.max_chars, c.max_in_service, c.band, c.extra_slots, c.min_share) for c in config.classes] == [
        ("short", 50, None, "highest", 1, 0.2), ("medium", 200, None, None, 0, 0.2), ("long", None, None, None, 0, 0.2),
    ]
    assert (config.cost.base_s, config.cost.per_unit_s, config.cost.reload_s) == (0.3125, 0.159375, 20.0)
    assert (config.cost.p95_ratio, config.cost.prior_weight, config.cost.window) == (1.3, 10.0, 256)
    assert (config.cost.slow_ratio, config.cost.slow_min_samples) == (1.5, 10)
    deadlines = config.deadlines
    assert deadlines.policy == "tiers"
    assert [(t.max_chars, t.timeout_s) for t in deadlines.tiers] == [(50, 60.0), (200, 300.0), (None, 600.0)]
    assert deadlines.learned == LearnedDeadlineConfig(factor=2.0, buffer_s=10.0, min_s=15.0, max_s=600.0)
    assert deadlines.client_header and deadlines.reject_unmeetable
    queue = config.queue
    assert (queue.max_size, queue.max_per_tenant, queue.order, queue.within_tenant) == (100, None, "fair", "fifo")
    assert (queue.aging_s, queue.band_aging_s) == (30.0, 60.0)
    assert config.priorities.bands == ("interactive", "standard", "batch")
    assert config.priorities.default == "standard"
    tenants = config.tenants
    assert (tenants.require_key, tenants.trust_header, tenants.list) == (False, False, ())
    assert tenants.default == TenantPolicy(weight=1.0, bands=None, max_queued=None)
    assert tenants.by_key() == {}
    retries = config.retries
    assert (retries.max_attempts, retries.budget_ratio, retries.budget_min) == (2, 0.2, 3)


@pytest.mark.parametrize(
    ("chars", "name", "timeout_s"),
    [(0, "short", 60.0), (1, "short", 60.0), (50, "short", 60.0), (51, "medium", 300.0),
     (200, "medium", 300.0), (201, "long", 600.0), (10_000, "long", 600.0)],
)
def test_class_of_and_tier_for_boundaries(chars: int, name: str, timeout_s: float) -> None:
    config = SidecarConfig()
    assert config.class_of(chars).name == name
    assert config.deadlines.tier_for(chars) == timeout_s


def test_custom_classes_and_tiers() -> None:
    config = parse_config(
        "classes:\n"
        "  - {name: tiny, max_chars: 10, max_in_service: 8}\n"
        "  - {name: rest, max_chars: null}\n"
        "deadlines: {tiers: [{max_chars: null, timeout_s: 42}]}\n"
    )
    assert config.class_of(10) == ClassConfig(name="tiny", max_chars=10, max_in_service=8)
    assert config.class_of(11) == ClassConfig(name="rest", max_chars=None)
    assert config.deadlines.tier_for(0) == config.deadlines.tier_for(10**6) == 42.0


def test_learned_deadline_is_clamped() -> None:
    learned = LearnedDeadlineConfig(factor=2.0, buffer_s=10.0, min_s=15.0, max_s=600.0)
    assert learned.deadline_s(1.0) == 15.0
    assert learned.deadline_s(20.0) == 50.0
    assert learned.deadline_s(1000.0) == 600.0


def test_tenant_bound_takes_the_most_specific_bound() -> None:
    queue = QueueConfig(max_size=100)
    assert queue.tenant_bound(TenantPolicy()) == 100
    per_tenant = QueueConfig(max_size=100, max_per_tenant=10)
    assert per_tenant.tenant_bound(TenantPolicy()) == 10
    assert per_tenant.tenant_bound(TenantPolicy(max_queued=30)) == 30


def test_tenants_with_literal_and_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_TTS_KEY", "acme-from-env-0123456789")
    config = parse_config(
        "queue: {max_per_tenant: 20}\n"
        "priorities: {bands: [high, low], default: low}\n"
        "tenants:\n"
        "  default: {weight: 0.5, bands: [low], max_queued: 5}\n"
        "  list:\n"
        "    - {name: acme, keys: ['env:ACME_TTS_KEY', acme-literal-0123456789], weight: 3, bands: [high, low]}\n"
        "    - {name: Other.team-2, keys: [other-0123456789abcdef], max_queued: 100}\n"
    )
    tenants = config.tenants
    acme, other = tenants.list
    assert tenants.by_key() == {
        "acme-from-env-0123456789": acme, "acme-literal-0123456789": acme, "other-0123456789abcdef": other,
    }
    assert (acme.weight, acme.bands, acme.max_queued) == (3.0, ("high", "low"), None)
    assert [key.get_secret_value() for key in acme.keys] == ["acme-from-env-0123456789", "acme-literal-0123456789"]
    assert config.queue.tenant_bound(acme) == 20
    assert config.queue.tenant_bound(other) == 100
    assert config.queue.tenant_bound(tenants.default) == 5


def test_keyless_tenants_are_allowed_when_the_header_is_trusted() -> None:
    tenants = parse_config("tenants: {trust_header: true, list: [{name: batch-jobs}]}").tenants
    assert tenants.list[0].keys == ()
    assert tenants.by_key() == {}


def test_env_key_must_be_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_KEY", "tooShort123")
    problems = problems_of("tenants: {list: [{name: a, keys: ['env:SHORT_KEY']}]}")
    assert problems == ("tenants.list[0].keys[0]: environment variable SHORT_KEY must hold at least 16 characters",)
    assert not any("tooShort123" in line for line in problems)


@pytest.mark.parametrize(
    "text",
    [
        "tenants: {list: [{name: a, keys: [tooShortKey42]}]}",
        "tenants: {list: [{name: a, keys: tooShortKey42}]}",
        "tenants: {list: [tooShortKey42]}",
        "tenants: {list: tooShortKey42}",
        "tenants: {list: [{name: a, keys: [tooShortKey42], weight: tooShortKey42}]}",
        "tenants: {list: [{name: a, keys: [0123456789abcdef]}, {name: b, keys: [0123456789abcdef]}]}",
    ],
)
def test_keys_never_appear_in_errors(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    message = str(caught.value)
    assert "tenants." in message
    assert "tooShortKey42" not in message
    assert "0123456789abcdef" not in message


def test_keys_never_appear_in_reprs() -> None:
    config = parse_config("tenants: {list: [{name: a, keys: [secret-0123456789abcdef]}]}")
    for shown in (repr(config), str(config), repr(config.tenants.list[0]), config.model_dump_json()):
        assert "secret-0123456789abcdef" not in shown
    assert "**********" in repr(config.tenants.list[0])


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour: red", r"^colour: unknown key \(known: listen, backends, .*\)$"),
        ("listen: {prot: 1}", r"^listen\.prot: unknown key \(did you mean 'port'\? known: host, port\)$"),
        ("backends: {health: {pth: /x}}", r"^backends\.health\.pth: unknown key"),
        ("listen: {port: abc}", r"^listen\.port: input should be a valid integer \(got 'abc'\)$"),
        ("listen: {port: '8049'}", r"^listen\.port: input should be a valid integer"),
        ("listen: {port: 70000}", r"^listen\.port: input should be less than or equal to 65535"),
        ("backends: {slots: 0}", r'^backends\.slots: must be a whole number >= 1 .* or "auto" .*\(got 0\)$'),
        ("backends: {slots: fast}", r'^backends\.slots: must be a whole number >= 1 .* or "auto" .*\(got \'fast\'\)$'),
        ("backends: {slots: 1.5}", r'^backends\.slots: must be a whole number >= 1 .* or "auto"'),
        ("backends: {slots: 6, max_slots: 4}", r"^backends\.max_slots: must be >= slots \(6\)$"),
        ("backends: {slots: auto, max_slots: 0}", r"^backends\.max_slots: input should be greater than or equal to 1"),
        ("backends: {adaptive: {min_gain: -0.1}}", r"^backends\.adaptive\.min_gain: input should be greater"),
        ("backends: {adaptive: {samples: 1}}", r"^backends\.adaptive\.samples: input should be greater"),
        ("backends: {adaptive: {latency_headroom: 1.5}}", r"^backends\.adaptive\.latency_headroom: input should be"),
        (
            "backends: {health: {interval_s: 0}}",
            r"^backends\.health\.interval_s: input should be greater than 0",
        ),
        (
            "limits: {max_body_bytes: 10}",
            r"^limits\.max_body_bytes: input should be greater than or equal to 1024",
        ),
        ("logging: {format: xml}", r"^logging\.format: input should be 'text' or 'json'"),
        (
            "listen: {port: 18051}",
            r"^backends\.base_port: backend ports 18050\.\.18051 include listen\.port 18051$",
        ),
        (
            "backends: {base_port: 65535}",
            r"^backends\.base_port: 2 backends need ports 65535\.\.65536, past 65535$",
        ),
        (
            "backends: {gpus: ['0', '1', 0]}",
            r"^backends\.gpus\[2\]: duplicate GPU id '0' \(also gpus\[0\]\)$",
        ),
        ("backends: {gpus: ['a b']}", r"^backends\.gpus\[0\]: GPU id 'a b' must be"),
        ("backends: {gpus: []}", r"^backends\.gpus: must list at least one GPU when there are no external"),
        ("backends: {external: ['ftp://x:1']}", r"^backends\.external\[0\]: 'ftp://x:1' must be an http"),
        ("backends: {external: ['http://x:1/api']}", r"^backends\.external\[0\]: .* \(no user, path"),
        ("backends: {external: ['http://x:99999']}", r"^backends\.external\[0\]: .* invalid port"),
        ("backends: {external: ['http://x:1', 'http://X:1/']}", r"^backends\.external\[1\]: duplicate"),
        (
            "backends: {external: ['http://127.0.0.1:8049']}",
            r"^backends\.external\[0\]: .* own listen address",
        ),
        (
            "backends: {external: ['http://127.0.0.1:18050']}",
            r"^backends\.external\[0\]: port 18050 is inside",
        ),
        (
            "backends: {command: ['x', '--port', '{port}', '{foo}']}",
            r"^backends\.command\[3\]: unknown placeholder \{foo\}",
        ),
        ("backends: {command: 'x {port} {'}", r"^backends\.command\[2\]: bad placeholder syntax"),
        ("backends: {command: 'x {port} {port.real}'}", r"^backends\.command\[2\]: unknown placeholder"),
        ("backends: {command: 'x --port 1'}", r"^backends\.command: must use \{port\}"),
        ("backends: {command: []}", r"^backends\.command: must name a program"),
        ("backends: {command: 'x \"unclosed'}", r"^backends\.command: cannot split the command string"),
        ("backends: {env: {GPU: '{gpux}'}}", r"^backends\.env\.GPU: unknown placeholder \{gpux\}"),
        (
            "backends: {env: {'BAD-NAME': x}}",
            r"^backends\.env\.BAD-NAME: not a valid environment variable name$",
        ),
        ("backends: {env: {FLAG: true}}", r"^backends\.env\.FLAG: input should be a valid string"),
        ("backends: {cwd: 5}", r"^backends\.cwd: must be a directory path or null"),
        (
            "backends: {restart: {backoff_initial_s: 5, backoff_max_s: 1}}",
            r"^backends\.restart\.backoff_max_s: must be >= backoff_initial_s \(5\.0\)$",
        ),
        ("backends: {health: {rise: 0}}", r"^backends\.health\.rise: input should be greater than or equal to 1"),
        ("backends: {health: {fall: 1.5}}", r"^backends\.health\.fall: input should be a valid integer"),
        ("backends: {warmup: {sample_rate: 16000}}", r"^backends\.warmup\.sample_rate: input should be 24000 or 32000"),
        ("backends: {warmup: {sample_rate: '24000'}}", r"^backends\.warmup\.sample_rate: input should be 24000 or"),
        ("backends: {warmup: {timeout_s: 0}}", r"^backends\.warmup\.timeout_s: input should be greater than 0"),
        ("backends: {warmup: {text: ''}}", r"^backends\.warmup\.text: string should have at least 1 character"),
        ("backends: {warmup: {enabled: sometimes}}", r"^backends\.warmup\.enabled: input should be a valid boolean"),
        ("backends: {warmup: {use_phonem: true}}", r"^backends\.warmup\.use_phonem: unknown key \(did you mean"),
        (
            "backends: {restart: {crash_loop: {max_failures: 0}}}",
            r"^backends\.restart\.crash_loop\.max_failures: input should be greater than or equal to 1",
        ),
        (
            "backends: {restart: {crash_loop: {cooldown_s: 0}}}",
            r"^backends\.restart\.crash_loop\.cooldown_s: input should be greater than 0",
        ),
        ("backends: {outlier: {latency_ratio: 1}}", r"^backends\.outlier\.latency_ratio: input should be greater than"),
        (
            "backends: {outlier: {base_ejection_s: 20, max_ejection_s: 10}}",
            r"^backends\.outlier\.max_ejection_s: must be >= base_ejection_s \(20\.0\)$",
        ),
        ("backends: {outlier: {min_requests: 0}}", r"^backends\.outlier\.min_requests: input should be greater than"),
        ("backends: {watchdog: {factor: 0.5}}", r"^backends\.watchdog\.factor: input should be greater than or equal"),
        ("backends: {watchdog: {unresponsive_s: 0}}", r"^backends\.watchdog\.unresponsive_s: input should be greater"),
        ("logging: {backend_output: maybe}", r"^logging\.backend_output: input should be a valid boolean"),
        ("listen: 5", r"^listen: input should be a valid dictionary"),
        # -- scheduling policy
        ("classes: []", r"^classes: must list at least one class$"),
        ("classes: [{name: Long, max_chars: null}]", r"^classes\[0\]\.name: string should match pattern"),
        ("classes: [{name: a, max_chars: 0}]", r"^classes\[0\]\.max_chars: input should be greater than or equal to 1"),
        ("classes: [{name: a}]", r"^classes\[0\]\.max_chars: field required$"),
        ("classes: [{name: a, max_chars: null, max_in_service: 0}]", r"^classes\[0\]\.max_in_service: input should be"),
        (
            "classes: [{name: a, max_chars: null}, {name: b, max_chars: null}]",
            r"^classes\[0\]\.max_chars: only the last class may have max_chars: null",
        ),
        (
            "classes: [{name: a, max_chars: 50}, {name: b, max_chars: 200}]",
            r"^classes\[1\]\.max_chars: the last class must have max_chars: null",
        ),
        (
            "classes: [{name: a, max_chars: 50}, {name: b, max_chars: 50}, {name: c, max_chars: null}]",
            r"^classes\[1\]\.max_chars: must be greater than the previous class's max_chars \(50\)$",
        ),
        (
            "classes: [{name: a, max_chars: 50}, {name: a, max_chars: null}]",
            r"^classes\[1\]\.name: duplicate class name 'a' \(also classes\[0\]\)$",
        ),
        (
            "classes: [{name: a, max_chars: null, max_inservice: 1}]",
            r"^classes\[0\]\.max_inservice: unknown key \(did you mean 'max_in_service'\?",
        ),
        ("cost: {base_s: -0.1}", r"^cost\.base_s: input should be greater than or equal to 0"),
        ("cost: {per_unit_s: 0}", r"^cost\.per_unit_s: input should be greater than 0"),
        ("cost: {p95_ratio: 0.9}", r"^cost\.p95_ratio: input should be greater than or equal to 1"),
        ("cost: {prior_weight: -1}", r"^cost\.prior_weight: input should be greater than or equal to 0"),
        ("cost: {window: 15}", r"^cost\.window: input should be greater than or equal to 16"),
        ("cost: {window: 100001}", r"^cost\.window: input should be less than or equal to 100000"),
        ("cost: {window: 20.0}", r"^cost\.window: input should be a valid integer"),
        ("cost: {reload_s: -1}", r"^cost\.reload_s: input should be greater than or equal to 0"),
        ("cost: {slow_ratio: 1}", r"^cost\.slow_ratio: input should be greater than 1"),
        ("cost: {slow_min_samples: 0}", r"^cost\.slow_min_samples: input should be greater than or equal to 1"),
        ("cost: {base_s: .inf}", r"^cost\.base_s: input should be a finite number"),
        ("cost: {per_unit_s: .nan}", r"^cost\.per_unit_s: input should be a finite number"),
        ("deadlines: {policy: fixed}", r"^deadlines\.policy: input should be 'tiers' or 'learned'"),
        ("deadlines: {tiers: []}", r"^deadlines\.tiers: must list at least one tier$"),
        (
            "deadlines: {tiers: [{max_chars: 50, timeout_s: 60}]}",
            r"^deadlines\.tiers\[0\]\.max_chars: the last tier must have max_chars: null",
        ),
        (
            "deadlines: {tiers: [{max_chars: 200, timeout_s: 1}, {max_chars: 50, timeout_s: 1},"
            " {max_chars: null, timeout_s: 1}]}",
            r"^deadlines\.tiers\[1\]\.max_chars: must be greater than the previous tier's max_chars \(200\)$",
        ),
        (
            "deadlines: {tiers: [{max_chars: null, timeout_s: 0}]}",
            r"^deadlines\.tiers\[0\]\.timeout_s: input should be greater than 0",
        ),
        ("deadlines: {learned: {factor: 0.5}}", r"^deadlines\.learned\.factor: input should be greater than or equal"),
        ("deadlines: {learned: {buffer_s: -1}}", r"^deadlines\.learned\.buffer_s: input should be greater than or"),
        ("deadlines: {learned: {min_s: 0}}", r"^deadlines\.learned\.min_s: input should be greater than 0"),
        (
            "deadlines: {learned: {min_s: 30, max_s: 20}}",
            r"^deadlines\.learned\.max_s: must be >= min_s \(30\.0\)$",
        ),
        ("deadlines: {client_header: yes please}", r"^deadlines\.client_header: input should be a valid boolean"),
        ("queue: {max_per_tenant: 0}", r"^queue\.max_per_tenant: input should be greater than or equal to 1"),
        ("queue: {max_size: 10, max_per_tenant: 11}", r"^queue\.max_per_tenant: must be <= max_size \(10\)$"),
        ("queue: {order: lifo}", r"^queue\.order: input should be 'fair' or 'fifo'"),
        ("queue: {within_tenant: longest_first}", r"^queue\.within_tenant: input should be 'fifo' or 'shortest_first'"),
        (
            "queue: {order: fifo, within_tenant: shortest_first}",
            r"^queue\.within_tenant: shortest_first needs order: fair",
        ),
        ("queue: {aging_s: 0}", r"^queue\.aging_s: input should be greater than 0"),
        ("queue: {band_aging_s: -1}", r"^queue\.band_aging_s: input should be greater than 0"),
        ("priorities: {bands: []}", r"^priorities\.bands: must list at least one band$"),
        ("priorities: {bands: [high, High]}", r"^priorities\.bands\[1\]: band name 'High' must match"),
        ("priorities: {bands: [high, low, high]}", r"^priorities\.bands\[2\]: duplicate band 'high' \(also bands\[0\]"),
        ("priorities: {bands: [high, low]}", r"^priorities\.default: 'standard' is not one of bands \(high, low\)$"),
        ("tenants: {default: {weight: 0}}", r"^tenants\.default\.weight: input should be greater than 0$"),
        ("tenants: {default: {bands: []}}", r"^tenants\.default\.bands: tuple should have at least 1 item"),
        ("tenants: {default: {max_queued: 0}}", r"^tenants\.default\.max_queued: input should be greater than or"),
        (
            "tenants: {default: {bands: [standard, urgent]}}",
            r"^tenants\.default\.bands\[1\]: 'urgent' is not in priorities\.bands \(interactive, standard, batch\)$",
        ),
        ("tenants: {default: {max_queued: 101}}", r"^tenants\.default\.max_queued: must be <= queue\.max_size \(100"),
        (
            "tenants: {list: [{name: a, keys: [0123456789abcdef], max_queued: 101}]}",
            r"^tenants\.list\[0\]\.max_queued: must be <= queue\.max_size \(100\)$",
        ),
        (
            "tenants: {list: [{name: a, keys: [0123456789abcdef], bands: [batch, bulk]}]}",
            r"^tenants\.list\[0\]\.bands\[1\]: 'bulk' is not in priorities\.bands",
        ),
        ("tenants: {list: [{keys: [0123456789abcdef]}]}", r"^tenants\.list\[0\]\.name: field required$"),
        ("tenants: {list: [{name: -a, keys: [0123456789abcdef]}]}", r"^tenants\.list\[0\]\.name: string should match"),
        (
            "tenants: {list: [{name: default, keys: [0123456789abcdef]}]}",
            r"^tenants\.list\[0\]\.name: 'default' is the tenant of requests without a key",
        ),
        (
            "tenants: {list: [{name: a, keys: [0123456789abcdef]}, {name: a, keys: [fedcba9876543210]}]}",
            r"^tenants\.list\[1\]\.name: duplicate tenant name 'a' \(also list\[0\]\)$",
        ),
        ("tenants: {list: [{name: a}]}", r"^tenants\.list\[0\]\.keys: must list at least one key"),
        ("tenants: {list: [{name: a, keys: 0123456789abcdef}]}", r"^tenants\.list\[0\]\.keys: must be a list of"),
        ("tenants: {list: [{name: a, keys: [1234567890123456789]}]}", r"^tenants\.list\[0\]\.keys\[0\]: must be a str"),
        (
            "tenants: {list: [{name: a, keys: ['0123456789 abcdef']}]}",
            r"^tenants\.list\[0\]\.keys\[0\]: must hold printable ASCII only, without spaces$",
        ),
        (
            "tenants: {list: [{name: a, keys: [0123456789abcdef, 0123456789abcdef]}]}",
            r"^tenants\.list\[0\]\.keys\[1\]: same key as keys\[0\]$",
        ),
        (
            "tenants: {list: [{name: a, keys: [0123456789abcdef]},"
            " {name: b, keys: [x123456789abcdef, 0123456789abcdef]}]}",
            r"^tenants\.list\[1\]\.keys\[1\]: same key as list\[0\]\.keys\[0\]$",
        ),
        (
            "tenants: {list: [{name: a, keys: ['env:9LIVES']}]}",
            r"^tenants\.list\[0\]\.keys\[0\]: '9LIVES' after env: is not a valid environment variable name$",
        ),
        (
            "tenants: {list: [{name: a, keys: [0123456789abcdef], wieght: 2}]}",
            r"^tenants\.list\[0\]\.wieght: unknown key \(did you mean 'weight'\? "
            r"known: weight, bands, max_queued, rate, name, keys\)$",
        ),
        ("tenants: {require_key: true}", r"^tenants\.require_key: no tenant is listed, so every request would get 401"),
        (
            "tenants: {require_key: true, trust_header: true, list: [{name: a, keys: [0123456789abcdef]}]}",
            r"^tenants\.trust_header: has no effect when require_key is true",
        ),
        ("retries: {max_attempts: 0}", r"^retries\.max_attempts: input should be greater than or equal to 1"),
        ("retries: {max_attempts: 11}", r"^retries\.max_attempts: input should be less than or equal to 10"),
        ("retries: {budget_ratio: 1.5}", r"^retries\.budget_ratio: input should be less than or equal to 1"),
        ("retries: {budget_ratio: -0.1}", r"^retries\.budget_ratio: input should be greater than or equal to 0"),
        ("retries: {budget_min: -1}", r"^retries\.budget_min: input should be greater than or equal to 0"),
        ("openai: {voices: {alloy: {index: ''}}}", r"^openai\.voices\.alloy\.index: string should have at least 1"),
        ("openai: {voices: {'bad name!': {index: a}}}", r"^openai\.voices\['bad name!'\]: a name is 1 to 64 letters"),
        ("openai: {voices: {x: {index: a, sample_rate: 16000}}}",
         r"^openai\.voices\.x\.sample_rate: must be one of 24000, 32000 \(got 16000\)$"),
        ("openai: {models: {tts-1: {sample_rate: 44100}}}",
         r"^openai\.models\.tts-1\.sample_rate: must be one of 24000"),
        ("openai: {models: {}}", r"^openai\.models: dictionary should have at least 1 item"),
        ("openai: {voices: {x: {index: a, pitch: 2}}}", r"^openai\.voices\.x\.pitch: unknown key"),
        ("- listen", r"^top level must be a mapping of sections, got a list$"),
        ("just text", r"^top level must be a mapping of sections, got a string$"),
    ],
)
def test_error_names_the_key_path(text: str, expected: str) -> None:
    problems = problems_of(text)
    assert any(re.search(expected, line) for line in problems), problems


def test_openai_defaults_map_openais_voices_to_the_packaged_prompts_and_a_file_replaces_them() -> None:
    openai = parse_config("{}").openai
    assert openai.enabled and set(openai.voices) == {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx",
                                                     "nova", "sage", "shimmer", "verse"}
    assert {v.index for v in openai.voices.values()} == {"exampleA", "exampleB"}
    assert {name: m.sample_rate for name, m in openai.models.items()} == {
        "glm-tts": None, "tts-1": 24000, "tts-1-hd": 32000, "gpt-4o-mini-tts": None}
    own = parse_config("openai: {voices: {narrator: {index: mine, sample_rate: 32000}}}").openai
    assert dict(own.voices) == {"narrator": own.voices["narrator"]} and own.voices["narrator"].index == "mine"
    assert own.models == openai.models


def test_every_problem_is_listed_in_the_message() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("listen: {port: abc}\nqueue: {max_size: 0}\nextra: 1\n", "my.yaml")
    error = caught.value
    assert error.source == "my.yaml"
    assert len(error.problems) == 3
    message = str(error)
    assert message.startswith("invalid configuration in my.yaml:\n")
    for key in ("listen.port: ", "queue.max_size: ", "extra: unknown key"):
        assert f"\n  {key}" in message


def test_cross_section_problems_are_listed_together() -> None:
    problems = problems_of(
        "listen: {port: 18050}\n"
        "tenants: {default: {bands: [urgent], max_queued: 500}}\n"
    )
    assert [line.split(":")[0] for line in problems] == [
        "backends.base_port", "tenants.default.bands[0]", "tenants.default.max_queued",
    ]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text("listen:\n  host: a\n  port: [1, 2\nqueue: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{file}:4:")
    assert "YAML syntax error" in problem
    assert "line 3" in problem


def test_duplicate_yaml_keys_are_errors() -> None:
    (problem,) = problems_of("listen:\n  port: 1\n  port: 2\n")
    assert problem.startswith("<string>:3:3: YAML syntax error: duplicate key 'port'")


def test_yaml_merge_keys_still_work() -> None:
    config = parse_config(
        "backends:\n  health:\n    <<: {interval_s: 5.0, timeout_s: 1.0}\n    timeout_s: 3.0\n"
    )
    assert (config.backends.health.interval_s, config.backends.health.timeout_s) == (5.0, 3.0)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml")
    assert caught.value.problems[0].startswith("cannot read the file:")


def test_admin_token_is_checked_in_constant_time_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config("{}").admin.allows(None)  # no token configured: open
    monkeypatch.setenv("ADMIN_TOKEN_FOR_TEST", "admin-secret-0123456789")
    admin = parse_config("admin: {token: env:ADMIN_TOKEN_FOR_TEST}").admin
    assert admin.allows("Bearer admin-secret-0123456789")
    assert admin.allows("bearer  admin-secret-0123456789 ")
    for wrong in (None, "", "Bearer", "Bearer admin-secret-012345678", "Basic admin-secret-0123456789"):
        assert not admin.allows(wrong)
    assert "admin-secret" not in repr(admin)
    problems = problems_of("admin: {token: short-secret}")
    assert problems == ("admin.token: must hold at least 16 characters",)
    assert "short-secret" not in "".join(problems)


def test_metrics_listen_is_optional_and_must_not_clash() -> None:
    assert parse_config("{}").metrics.listen is None
    listen = parse_config("metrics: {listen: {port: 9108}}").metrics.listen
    assert listen is not None and (listen.host, listen.port) == ("127.0.0.1", 9108)
    assert problems_of("metrics: {listen: {port: 8049}}") == (
        "metrics.listen.port: must differ from listen.port (8049)",)
    assert problems_of("metrics: {listen: {port: 18051}}") == (
        "metrics.listen.port: is in the backend ports 18050..18051",)
    assert problems_of("metrics: {listen: {host: 0.0.0.0}}") == ("metrics.listen.port: field required",)
    assert parse_config("listen: {port: 0}\nmetrics: {listen: {port: 0}}").metrics.listen is not None  # tests


# -- slots ----------------------------------------------------------------------------------------


def test_slots_is_a_number_or_auto_with_its_knobs() -> None:
    fixed = parse_config("backends: {slots: 6}").backends  # a number may pass the default bound of auto
    assert fixed.slot_policy() == SlotPolicy(fixed=6)
    assert parse_config("{}").backends.slot_policy() == SlotPolicy(fixed=None)
    assert parse_config("backends: {slots: 1}").backends.slot_policy() == SlotPolicy(fixed=1)
    auto = parse_config("backends: {slots: auto, max_slots: 3, adaptive: {min_gain: 0.2, samples: 5}}").backends
    assert auto.slot_policy() == SlotPolicy(fixed=None, adaptive=AdaptiveSettings(
        max_slots=3, min_gain=0.2, samples=5, reprobe_s=300.0, latency_headroom=1.0))
    assert auto.slot_policy().mode == "auto" and fixed.slot_policy().mode == "fixed"
    assert parse_config("backends: {slots: auto}").backends.slot_policy().adaptive.max_slots == 4


def test_a_class_band_must_name_a_priority_band() -> None:
    from scheduler.config import ConfigError, parse_config

    config = parse_config("classes:\n  - {name: short, max_chars: 50, band: interactive}\n"
                          "  - {name: rest, max_chars: null}\n", check_paths=False)
    assert config.classes[0].band == "interactive" and config.classes[1].band is None
    with pytest.raises(ConfigError, match=r"classes\[0\]\.band: 'urgent' is not in priorities\.bands"):
        parse_config("classes:\n  - {name: short, max_chars: 50, band: urgent}\n"
                     "  - {name: rest, max_chars: null}\n", check_paths=False)


# -- exposure: admin token, prompt paths ------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.10.0.1", "::1", "localhost", "LocalHost", "::ffff:127.0.0.1"])
def test_a_loopback_listener_needs_no_admin_token(host: str) -> None:
    config = parse_config(f"listen: {{host: '{host}'}}")
    assert config.listen.loopback and config.admin.token is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.10", "fe80::1", "tts.example.com",
                                  "::ffff:10.0.0.1", "128.0.0.1", "localhost.example.com"])
def test_a_listener_that_is_not_loopback_needs_an_admin_token(host: str) -> None:
    problems = problems_of(f"listen: {{host: '{host}'}}")
    assert len(problems) == 1
    assert problems[0].startswith(f"admin.token: must be set when listen.host ({host}) is not a loopback address")
    for key in ("set admin.token", "listen.host", "admin.allow_anonymous: true"):
        assert key in problems[0]
    assert parse_config(f"listen: {{host: '{host}'}}\nadmin: {{token: admin-token-0123456789}}").admin.token
    assert parse_config(f"listen: {{host: '{host}'}}\nadmin: {{allow_anonymous: true}}").admin.allow_anonymous


def test_a_reload_cannot_drop_the_token_of_a_public_listener_that_keeps_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """listen needs a restart, so a reload keeps the running listener: a new file that binds
    loopback without a token would leave the public one open."""
    running = parse_config("listen: {host: 0.0.0.0}\nadmin: {token: admin-token-0123456789}")
    file = tmp_path / "sidecar.yaml"
    file.write_text("listen: {host: 127.0.0.1}\n")
    assert load_config(file).exposure_problems() == []  # fine on its own, for a fresh start
    control = Control(SimpleNamespace(config=running), SimpleNamespace(), config_path=str(file))  # type: ignore[arg-type]
    applied: list[SidecarConfig] = []
    monkeypatch.setattr(control, "_apply", lambda old, new, changed: applied.append(new))
    result = control._reload()
    assert not result.ok and applied == []
    assert len(result.problems) == 1 and result.problems[0].startswith(
        "admin.token: must be set when listen.host (0.0.0.0) is not a loopback address")
    file.write_text("listen: {host: 127.0.0.1}\nadmin: {token: other-token-0123456789}\n")
    result = control._reload()
    assert (result.ok, result.ignored) == (True, ["listen"])
    assert applied[0].listen.host == "0.0.0.0" and applied[0].admin.token is not None


def test_allow_anonymous_with_a_token_is_a_contradiction() -> None:
    assert problems_of("admin: {token: admin-token-0123456789, allow_anonymous: true}") == (
        "admin.allow_anonymous: has no effect when token is set; set one of them",)
    assert parse_config("{}").admin.allow_anonymous is False


def test_one_problem_is_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("listen: {host: 0.0.0.0}", "my.yaml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("invalid configuration in my.yaml: admin.token: must be set")


def test_admin_token_authenticates_only_when_configured_and_never_raises() -> None:
    open_admin = parse_config("{}").admin
    assert open_admin.allows(None) and open_admin.allows("Bearer \udcff")
    assert not open_admin.authenticates(None) and not open_admin.authenticates("Bearer anything-0123456789")
    admin = parse_config("admin: {token: admin-token-0123456789}").admin
    assert admin.authenticates("Bearer admin-token-0123456789")
    for header in ("Bearer admin-token-0123456789\udcff", "Bearer \udcff", "\udcffBearer admin-token-0123456789",
                   "Bearer admin-token-012345678\ud800", "Bearer admin-token-012345678\u00e4"):
        assert not admin.authenticates(header) and not admin.allows(header)


def test_prompt_dirs_are_absolute_after_load(tmp_path: Path) -> None:
    assert parse_config("{}").prompts.allowed_dirs == ()
    (tmp_path / "voices").mkdir()
    (tmp_path / "abs").mkdir()
    config = parse_config(f"prompts: {{allowed_dirs: [voices, '{tmp_path / 'abs'}', './voices/../abs']}}",
                          base_dir=tmp_path)
    assert config.prompts.allowed_dirs == (tmp_path / "voices", tmp_path / "abs", tmp_path / "abs")
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text("prompts: {allowed_dirs: [voices]}\n")
    assert load_config(config_file).prompts.allowed_dirs == (tmp_path / "voices",)


def test_prompt_dirs_must_be_paths_and_exist(tmp_path: Path) -> None:
    assert problems_of("prompts: {allowed_dirs: ['', 3, null]}") == (
        "prompts.allowed_dirs[0]: must be a directory path", "prompts.allowed_dirs[1]: must be a directory path",
        "prompts.allowed_dirs[2]: must be a directory path")
    assert problems_of("prompts: {allowed_dirs: /one/dir}")[0].startswith("prompts.allowed_dirs: ")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as caught:
        parse_config(f"prompts: {{allowed_dirs: ['{tmp_path}', missing, file]}}", base_dir=tmp_path)
    assert caught.value.problems == (
        f"prompts.allowed_dirs[1]: not an existing directory: {tmp_path / 'missing'}",
        f"prompts.allowed_dirs[2]: not an existing directory: {tmp_path / 'file'}")
    assert parse_config("prompts: {allowed_dirs: [missing]}", base_dir=tmp_path, check_paths=False)


@pytest.fixture
def prompt_tree(tmp_path: Path) -> Path:
    """tmp/voices/{a.wav, sub/b.wav, escape -> /etc, passwd -> /etc/passwd}, tmp/voices2/c.wav,
    tmp/cwd (a backend's working directory), tmp/linked -> voices."""
    voices = tmp_path / "voices"
    (voices / "sub").mkdir(parents=True)
    (voices / "a.wav").write_bytes(b"RIFF")
    (voices / "sub" / "b.wav").write_bytes(b"RIFF")
    (voices / "escape").symlink_to("/etc")
    (voices / "passwd").symlink_to("/etc/passwd")
    (tmp_path / "voices2").mkdir()
    (tmp_path / "voices2" / "c.wav").write_bytes(b"RIFF")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "linked").symlink_to(voices)
    return tmp_path


@pytest.mark.parametrize(("path", "permitted"), [
    ("{root}/voices/a.wav", True),
    ("{root}/voices/sub/b.wav", True),
    ("{root}/voices/missing.wav", True),  # inside: the backend decides whether it exists
    ("{root}/voices/sub/../a.wav", True),
    ("{root}/linked/a.wav", True),  # a symlink into the allowed directory
    ("../voices/a.wav", True),  # relative: from the backend's working directory
    ("/etc/passwd", False),
    ("/nonexistent/file.wav", False),  # outside: refused whether or not it exists
    ("{root}/voices/../voices2/c.wav", False),
    ("{root}/voices/sub/../../voices2/c.wav", False),
    ("{root}/voices/missing/../../voices2/c.wav", False),
    ("{root}/voices2/c.wav", False),  # a sibling that shares the prefix
    ("{root}/voices/escape/passwd", False),  # a symlink out of the allowed directory
    ("{root}/voices/passwd", False),
    ("a.wav", False),  # relative to the working directory, not to the allowed one
    ("../voices2/c.wav", False),
    ("", False),
    ("{root}/voices/a.wav\0", False),
    ("{root}/voices/a\ud800.wav", False),
    ("{root}/voices", True),  # the directory itself: the backend finds no audio there
])
def test_prompt_paths_are_checked_after_following_symlinks(prompt_tree: Path, path: str, permitted: bool) -> None:
    prompts = parse_config("prompts: {allowed_dirs: [voices]}", base_dir=prompt_tree).prompts
    assert prompts.permits(path.format(root=prompt_tree), prompt_tree / "cwd") is permitted


def test_an_allowed_directory_reached_through_a_symlink_is_resolved_too(prompt_tree: Path) -> None:
    prompts = parse_config("prompts: {allowed_dirs: [linked]}", base_dir=prompt_tree).prompts
    assert prompts.permits(str(prompt_tree / "voices" / "a.wav"), prompt_tree)
    assert prompts.permits("linked/sub/b.wav", prompt_tree)
    assert not prompts.permits("linked/escape/passwd", prompt_tree)
    assert not prompts.permits(str(prompt_tree / "voices2" / "c.wav"), prompt_tree)


def test_no_prompt_dirs_means_no_check(prompt_tree: Path) -> None:
    assert parse_config("{}").prompts.permits("/etc/passwd", prompt_tree)


# -- cache.disk ---------------------------------------------------------------------------------


def test_the_cache_disk_copy_is_off_by_default_and_lives_under_the_tasks_state_dir(tmp_path: Path) -> None:
    assert parse_config("{}").cache.disk is False
    config = parse_config(f"tasks: {{state_dir: {tmp_path}}}\ncache: {{enabled: true, disk: true}}")
    assert config.cache.disk and config.cache_directory() == tmp_path / "cache"


def test_cache_disk_refuses_a_sidecar_without_tasks() -> None:
    problems = problems_of("tasks: {enabled: false}\ncache: {enabled: true, disk: true}")
    assert any(p.startswith("cache.disk: needs tasks.enabled") and "tasks.state_dir" in p for p in problems), problems
    assert parse_config("tasks: {enabled: false}\ncache: {enabled: true, disk: false}").cache.disk is False
    assert problems_of("cache: {disk: yes please}")  # strict: a boolean only
