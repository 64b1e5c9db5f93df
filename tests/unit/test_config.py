from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest

from scheduler import config as config_module
from scheduler.config import (
    BackendSpec,
    ConfigError,
    SidecarConfig,
    default_config_path,
    default_config_text,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [REPO / "config" / "sidecar.yaml", REPO / "config" / "glmtts-production.yaml"]


def problems_of(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


# -- shipped files ------------------------------------------------------------------------------


def test_default_file_is_exactly_the_defaults() -> None:
    assert load_config(None) == SidecarConfig()
    assert load_config(default_config_path()) == parse_config("{}") == parse_config("")


def test_default_config_text_is_the_default_file() -> None:
    assert default_config_text() == (REPO / "config" / "sidecar.yaml").read_text(encoding="utf-8")
    assert default_config_path() == REPO / "config" / "sidecar.yaml"


def test_default_config_path_falls_back_to_package_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_SOURCE_TREE_DEFAULT", REPO / "no-such-dir" / "sidecar.yaml")
    path = default_config_path()
    assert path.name == "default_config.yaml"
    assert path.parent == Path(config_module.__file__).resolve().parent


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
    assert production.listen.host == "127.0.0.1"


def test_production_cwd_is_checked_against_this_machine(tmp_path: Path) -> None:
    text = (REPO / "config" / "glmtts-production.yaml").read_text(encoding="utf-8")
    missing = tmp_path / "GLM-TTS"
    with pytest.raises(ConfigError) as caught:
        parse_config(text.replace("/opt/GLM-TTS", str(missing)), "prod.yaml")
    assert caught.value.problems == (f"backends.cwd: not an existing directory: {missing}",)
    missing.mkdir()
    assert parse_config(text.replace("/opt/GLM-TTS", str(missing))).backends.cwd == missing


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
    assert config.limits.max_body_bytes == 20 * 1024 * 1024
    assert config.queue.max_size == 100
    assert config.logging.level == "INFO"
    assert config.logging.format == "text"


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
    with pytest.raises(AttributeError):
        config.backends.layout()[0].port = 1  # type: ignore[misc]


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
        ("backends: {slots: 0}", r"^backends\.slots: input should be greater than or equal to 1"),
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
        ("logging: {backend_output: maybe}", r"^logging\.backend_output: input should be a valid boolean"),
        ("listen: 5", r"^listen: input should be a valid dictionary"),
        ("- listen", r"^top level must be a mapping of sections, got a list$"),
        ("just text", r"^top level must be a mapping of sections, got a string$"),
    ],
)
def test_error_names_the_key_path(text: str, expected: str) -> None:
    problems = problems_of(text)
    assert any(re.search(expected, line) for line in problems), problems


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
