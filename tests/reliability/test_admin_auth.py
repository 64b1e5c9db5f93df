"""Admin authentication against a real sidecar: every guarded endpoint, with every wrong way of
presenting (or hiding) the token and with path tricks, answers 401 or 404, nothing reaches a
backend (a recorder and an emulator), and the action never happens: no reload, no drain, no
backend restarted, no prompt written or cache cleared."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.reliability.hostile import Costs, Target, raw, recorded_sidecar
from tests.reliability.support import assert_loop_lag_ok, loop_lag_max_s, record
from tests.support import get_json, http

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
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with recorded_sidecar(tmp_path_factory.mktemp("admin"), extra=EXTRA, managed=1) as (service, recorder):
        yield Target(service, recorder, 20 * 1024 * 1024)


def state(target: Target) -> dict[str, Any]:
    """Everything an admin action would change, read from the sidecar and the emulator."""
    health = get_json(target.service.url + "/api/v1/health")
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


def check_untouched(target: Target, name: str, before: dict[str, Any], statuses: list[int | None],
                    costs: Costs, **figures: Any) -> None:
    costs.done()
    after = state(target)
    lag = loop_lag_max_s(target.service.url)
    seen = target.recorder.seen()
    record(name, status=sorted(set(statuses), key=str), requests=len(statuses), backend_saw=len(seen),
           rss_growth_mib=round(costs.rss_growth_mib, 1), cpu_s=round(costs.cpu_s, 3), lost=0,
           loop_lag_ms=round(lag * 1000, 1), **figures)
    assert all(s in (401, 403, 404) for s in statuses), statuses
    assert seen == [], seen
    assert after == before
    assert after["ready"]["draining"] is False
    assert target.service.output().count("drain") == 0, "a drain started"
    assert_loop_lag_ok(target.service.url)


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
    record("admin auth: the right token reloads (control)", status=status, backend_saw=0, lost=0)
