"""Admin authentication against a real sidecar: every guarded endpoint, with every wrong way of
presenting (or hiding) the token and with path tricks, answers 401 or 404, nothing reaches a
backend (a recorder and an emulator), and the action never happens: no reload, no drain, no
backend restarted, no prompt written or cache cleared."""

from __future__ import annotations

import configparser
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glmtts.emulator.prompts import DEFAULT_PROMPTS
from tests.contract_cases import multipart
from tests.reliability.hostile import Costs, Target, raw, recorded_sidecar
from tests.reliability.support import (
    Outcome,
    Tally,
    assert_lag_within_bound,
    assert_loop_lag_ok,
    case_loop_lag_s,
    record,
)
from tests.support import ROOT, details, free_port, get_json, http

# One worker runs the whole module, so its module-scoped sidecar starts once.
pytestmark = pytest.mark.xdist_group("test_admin_auth")

TOKEN = "admin-token-0123456789abcdef"
EXTRA = f"admin: {{token: {TOKEN}}}\nlimits: {{body_timeout_s: 2.0, idle_timeout_s: 2.0}}"
FORM = b'--b\r\nContent-Disposition: form-data; name="index"\r\n\r\nevil\r\n--b--\r\n'

GUARDED = [
    ("POST", "/admin/reload"),
    ("POST", "/admin/drain"),
    ("POST", "/admin/backends/gpu0-0/restart"),
    ("POST", "/admin/backends/ext-0/restart"),
    ("POST", "/api/v1/prompts"),
    ("PUT", "/api/v1/prompts/exampleA"),
    ("DELETE", "/api/v1/prompts/exampleA"),
    ("POST", "/api/v1/clear_cache"),
]

# name: (Authorization header or None, query string)
CREDENTIALS: dict[str, tuple[str | None, str]] = {
    "no token": (None, ""),
    "wrong token": (f"Bearer {TOKEN[:-1]}x", ""),
    "empty Authorization": ("", ""),
    "Bearer with no value": ("Bearer", ""),
    "Bearer and a space": ("Bearer ", ""),
    "token without a scheme": (TOKEN, ""),
    "token as Basic": (f"Basic {TOKEN}", ""),
    "a prefix of the token": (f"Bearer {TOKEN[:-1]}", ""),
    "the token with more after it": (f"Bearer {TOKEN}x", ""),
    "token in ?token=": (None, f"?token={TOKEN}"),
    "token in ?access_token=": (None, f"?access_token={TOKEN}"),
    "token in ?token= with a wrong header": ("Bearer nope", f"?token={TOKEN}"),
}

PATH_TRICKS = ["/ADMIN/reload", "//admin/reload", "/admin/./reload", "/admin/%2e%2e/admin/reload",
               "/%61dmin/reload", "/admin/reload/", "/api/v1/../../admin/reload", "/admin//reload",
               "/admin/reload%00", "/admin/reload;x=1", "/admin/%72eload", "/./admin/reload",
               "/admin/backends/gpu0-0/../gpu0-0/restart", "/admin/drain?x=/admin/reload"]


def request(method: str, target: str, authorization: str | None) -> bytes:
    auth = "" if authorization is None else f"Authorization: {authorization}\r\n"
    return (f"{method} {target} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(FORM)}\r\n{auth}\r\n").encode() + FORM


@pytest.fixture(scope="module")
def prompt_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """voices/ (prompts.allowed_dirs) with a voice, a symlink out to secret/ and one to /etc;
    secret/ beside it."""
    root = tmp_path_factory.mktemp("prompts")
    (root / "voices").mkdir()
    (root / "secret").mkdir()
    (root / "voices" / "voice.wav").write_bytes(Path(DEFAULT_PROMPTS["exampleA"].prompt_audio_path).read_bytes())
    (root / "secret" / "x.wav").write_bytes(b"RIFF")
    (root / "voices" / "leak.wav").symlink_to(root / "secret" / "x.wav")
    (root / "voices" / "etc").symlink_to("/etc")
    return root


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, prompt_tree: Path) -> Iterator[Target]:
    extra = f"{EXTRA}\nprompts: {{allowed_dirs: [{json.dumps(str(prompt_tree / 'voices'))}]}}"
    with recorded_sidecar(tmp_path_factory.mktemp("admin"), extra=extra, managed=1) as (service, recorder):
        yield Target(service, recorder, 20 * 1024 * 1024)


def state(target: Target) -> dict[str, Any]:
    """Everything an admin action would change, read from the sidecar and the emulator."""
    health = details(target.service, "/api/v1/health")
    emulator = next(b for b in health["backends"] if b["id"] == "gpu0-0")
    stats = get_json(emulator["url"] + "/emulator/stats")
    _, _, metrics = http("GET", target.service.url + "/metrics")
    return {
        "backends": [(b["id"], b["state"], b["pid"]) for b in health["backends"]],
        "ready": get_json(target.service.url + "/readyz"),
        "reloads": re.findall(r"^glmtts_sidecar_config_reloads_total\{.*$", metrics.decode(), re.MULTILINE),
        "emulator": {k: stats[k] for k in ("tts_received", "model_loads", "started_at")},
        "prompts": get_json(emulator["url"] + "/api/v1/prompts"),
    }


def attempt(target: Target, method: str, path: str, authorization: str | None) -> tuple[int | None, Any]:
    got = raw(target.port, request(method, path, authorization), until=1, timeout=10)
    answered = got.responses()
    assert len(answered) == 1, got.data[:300]
    status, headers, body = answered[0]
    payload = json.loads(body)
    if status == 401:
        assert payload["reason"] == "unauthorized" and headers["www-authenticate"] == "Bearer", payload
    elif status == 404:
        assert payload == {"detail": "Not Found"}
    return status, payload


def tally_of(statuses: list[int | None]) -> Tally:
    """Each status is the whole answer to a whole request; None: none came."""
    tally = Tally()
    for status in statuses:
        if status is None:
            tally.fail(Outcome.NO_ANSWER)
        else:
            tally.answer(status)
    return tally


def check_untouched(target: Target, name: str, before: dict[str, Any], statuses: list[int | None],
                    costs: Costs, **figures: Any) -> None:
    costs.done()
    after = state(target)
    lag = case_loop_lag_s(target.service.url)
    seen = target.recorder.seen()
    tally = tally_of(statuses)
    record(name, status=sorted(set(statuses), key=str), requests=len(statuses), backend_saw=len(seen),
           rss_growth_mib=round(costs.rss_growth_mib, 1), cpu_s=round(costs.cpu_s, 3), lost=tally.lost,
           loop_lag_ms=round(lag * 1000, 1), **figures)
    assert all(s in (401, 403, 404) for s in statuses), statuses
    assert seen == [], seen
    assert after == before
    assert after["ready"]["draining"] is False
    assert target.service.output().count("drain") == 0, "a drain started"
    assert_lag_within_bound(lag)


@pytest.mark.parametrize("method,path", GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
def test_every_wrong_credential_is_refused(target: Target, method: str, path: str) -> None:
    before = state(target)
    costs = Costs(target.service.pid)
    statuses = []
    for authorization, query in CREDENTIALS.values():
        status, _ = attempt(target, method, path + query, authorization)
        statuses.append(status)
    assert statuses == [401] * len(CREDENTIALS), dict(zip(CREDENTIALS, statuses, strict=True))
    check_untouched(target, f"admin auth: {method} {path}, {len(CREDENTIALS)} wrong credentials", before,
                    statuses, costs)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token"], ids=["no token", "wrong token"])
def test_path_tricks_never_reach_an_admin_action(target: Target, authorization: str | None) -> None:
    before = state(target)
    costs = Costs(target.service.pid)
    statuses = {path: attempt(target, "POST", path, authorization)[0] for path in PATH_TRICKS}
    check_untouched(target, f"admin auth: {len(PATH_TRICKS)} path tricks on /admin, "
                    f"{'no' if authorization is None else 'wrong'} token", before, list(statuses.values()), costs,
                    by_path=statuses)


def test_the_right_token_does_act(target: Target) -> None:
    """The control: what the other cases watch for does change when the token is right."""
    before = state(target)
    status, payload = attempt(target, "POST", "/admin/reload", f"Bearer {TOKEN}")
    assert (status, payload["reloaded"]) == (200, True), payload
    assert state(target)["reloads"] != before["reloads"]
    assert target.recorder.seen() == []  # a reload is the sidecar's own business
    lag = assert_loop_lag_ok(target.service.url)
    record("admin auth: the right token reloads (control)", status=status, backend_saw=0, lost=tally_of([status]).lost,
           loop_lag_ms=round(lag * 1000, 1))


# --- an Authorization header that is not ASCII ------------------------------------------------------

NOT_ASCII = [b"Bearer \xff\xfe", b"Bearer " + TOKEN.encode() + b"\xff", b"\xffBearer " + TOKEN.encode(),
             b"Bearer " + TOKEN.encode()[:-2] + "é".encode()]


def with_raw_authorization(method: str, path: str, authorization: bytes) -> bytes:
    return request(method, path, None).replace(b"Host: sidecar\r\n",
                                               b"Host: sidecar\r\nAuthorization: " + authorization + b"\r\n", 1)


@pytest.mark.parametrize("method,path", GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
def test_an_authorization_that_is_not_ascii_is_400_naming_the_header(target: Target, method: str,
                                                                       path: str) -> None:
    before = state(target)
    tally = Tally()
    answers = []
    for authorization in NOT_ASCII:
        got = raw(target.port, with_raw_authorization(method, path, authorization), until=1, timeout=10)
        answered = got.responses()
        assert len(answered) == 1, got.data[:300]
        status, headers, body = answered[0]
        tally.answer(status, headers, body)
        answers.append((status, json.loads(body)))
    lag = case_loop_lag_s(target.service.url)
    record(f"admin auth: {method} {path}, {len(NOT_ASCII)} Authorization headers not ASCII",
           status=sorted({s for s, _ in answers}), backend_saw=len(target.recorder.seen()), lost=tally.lost,
           loop_lag_ms=round(lag * 1000, 1))
    for status, payload in answers:
        assert status == 400 and payload["reason"] == "bad_authorization", payload
        assert "Authorization" in payload["detail"], payload
    assert target.recorder.seen() == []
    assert state(target) == before
    assert_lag_within_bound(lag)


# --- prompt writes and prompts.allowed_dirs ---------------------------------------------------------


def prompt_write(method: str, path: str, audio_path: str, *, encoding: str) -> bytes:
    fields = ([("index", "evil")] if method == "POST" else []) + [("prompt_audio_path", audio_path),
                                                                  ("prompt_text", "x")]
    if encoding == "urlencoded":
        content_type, body = "application/x-www-form-urlencoded", urllib.parse.urlencode(fields).encode()
    else:
        content_type, body = multipart(*fields)
    return (f"{method} {path} HTTP/1.1\r\nHost: sidecar\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


ESCAPES = {
    "/etc/passwd": "/etc/passwd",
    "a file that does not exist": "/nonexistent/voice.wav",
    "dot-dot out of the allowed directory": "{root}/voices/../secret/x.wav",
    "dot-dot through a missing directory": "{root}/voices/missing/../../secret/x.wav",
    "a symlink to a file outside": "{root}/voices/leak.wav",
    "a symlink to /etc": "{root}/voices/etc/passwd",
    "a sibling sharing the prefix": "{root}/voices2/x.wav",
    "relative, out of the working directory": "../../../../../../../../etc/passwd",
    "relative, not from the allowed directory": "voice.wav",
    "a NUL byte": "{root}/voices/voice.wav\0.txt",
}


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
@pytest.mark.parametrize("method,path", [("POST", "/api/v1/prompts"), ("PUT", "/api/v1/prompts/exampleA")])
def test_prompt_paths_outside_the_allowed_dirs_never_reach_a_backend(target: Target, prompt_tree: Path,
                                                                    method: str, path: str, encoding: str) -> None:
    before = state(target)
    costs = Costs(target.service.pid)
    tally = Tally()
    answers: dict[str, tuple[int, Any]] = {}
    for name, audio_path in ESCAPES.items():
        got = raw(target.port, prompt_write(method, path, audio_path.format(root=prompt_tree), encoding=encoding),
                  until=1, timeout=10)
        answered = got.responses()
        assert len(answered) == 1, (name, got.data[:300])
        status, headers, body = answered[0]
        tally.answer(status, headers, body)
        answers[name] = (status, json.loads(body))
    costs.done()
    lag = case_loop_lag_s(target.service.url)
    record(f"admin auth: {method} {path} ({encoding}), {len(ESCAPES)} prompt paths outside allowed_dirs",
           status=sorted({s for s, _ in answers.values()}), backend_saw=len(target.recorder.seen()),
           lost=tally.lost, cpu_s=round(costs.cpu_s, 3), loop_lag_ms=round(lag * 1000, 1))
    # One answer for all: whether the file exists is not told.
    assert {json.dumps(a, sort_keys=True) for a in answers.values()} == {json.dumps(
        [403, {"detail": "prompt_audio_path is outside the directories prompts.allowed_dirs permits",
               "reason": "prompt_path_not_allowed"}], sort_keys=True)}, answers
    assert target.recorder.seen() == []
    assert state(target) == before
    assert_lag_within_bound(lag)


def test_a_prompt_write_the_path_check_cannot_read_is_refused_as_upstream_would(target: Target,
                                                                              prompt_tree: Path) -> None:
    """Two prompt_audio_path fields (one allowed, one not), or none: upstream's 400 and 422, from the
    sidecar; nothing reaches a backend."""
    before = state(target)
    tally = Tally()
    allowed = str(prompt_tree / "voices" / "voice.wav")
    twice = urllib.parse.urlencode([("index", "evil"), ("prompt_audio_path", allowed),
                                    ("prompt_audio_path", "/etc/passwd"), ("prompt_text", "x")]).encode()
    missing = urllib.parse.urlencode([("index", "evil"), ("prompt_text", "x")]).encode()
    statuses = []
    for body in (twice, missing):
        status, headers, raw_body = http("POST", target.service.url + "/api/v1/prompts", body=body, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-www-form-urlencoded"})
        tally.answer(status, headers, raw_body)
        statuses.append((status, json.loads(raw_body)["detail"]))
    record("admin auth: prompt writes with a duplicate or missing prompt_audio_path", status=statuses,
           backend_saw=len(target.recorder.seen()), lost=tally.lost)
    assert statuses[0] == (400, "Duplicate form field 'prompt_audio_path'")
    assert statuses[1][0] == 422 and statuses[1][1][0]["loc"] == ["body", "prompt_audio_path"]
    assert target.recorder.seen() == []
    assert state(target) == before


# --- no admin token on a public address: refused at start -----------------------------------------


def test_a_public_listener_without_an_admin_token_is_refused_with_exit_2(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "public.yaml"
    # Never binds: the refusal comes before any socket is opened.
    config.write_text(f"listen: {{host: 0.0.0.0, port: {port}}}\nbackends: {{gpus: ['0']}}\n")
    runs = {}
    for args in (["--config", str(config)], ["--config", str(config), "--check-config"]):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "scheduler", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        runs[" ".join(args[2:]) or "start"] = (done.returncode, round(time.monotonic() - started, 2))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1, lines
        for key in ("admin.token", "listen.host", "admin.allow_anonymous"):
            assert key in lines[0], lines[0]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    record("admin auth: public listener without a token refused at start", runs=runs, lost=None)
    # Saying so explicitly is accepted (checked only: a test binds loopback only).
    config.write_text(config.read_text() + "admin: {allow_anonymous: true}\n")
    checked = subprocess.run([sys.executable, "-m", "scheduler", "--config", str(config), "--check-config"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert checked.returncode == 0, checked.stderr
    # systemd must not restart a refusal: restarting cannot fix the configuration.
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.read_string((ROOT / "systemd" / "glmtts-sidecar.service").read_text())
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert "2" in service["RestartPreventExitStatus"].split()
