"""What the sidecar shows to whom, against a real sidecar with an admin token, tenants and a
separate metrics listener: every answer -- the handlers', aiohttp's own 400s, the metrics
listener's -- says ``Server: uvicorn`` and nothing about Python or aiohttp; anonymous callers get
upstream's health and the public part of the queue; the admin token or the metrics port get the
details; X-Tenant cannot claim a tenant that has keys; an anonymous X-Priority cannot jump the
default band."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from glmtts.emulator.prompts import DEFAULT_PROMPTS
from tests.contract_cases import multipart
from tests.reliability.hostile import raw
from tests.reliability.support import Tally, assert_loop_lag_ok, record
from tests.support import (
    Service,
    backend_details,
    free_port,
    get_json,
    http,
    sidecar_config,
    start_sidecar,
    wait_until,
)

# One worker runs the whole module, so its module-scoped sidecar starts once.
pytestmark = pytest.mark.xdist_group("test_exposure")

TOKEN = "exposure-admin-token-0123456789"
KEY = "acme-key-0123456789abcdef"
KEYED, KEYLESS = "acme-corp", "guest-team"
UPSTREAM_HEALTH = {"status", "model_loaded", "model_sample_rate", "model_use_phoneme", "prompt_cache_count"}
PUBLIC_QUEUE = {"depth", "max_size", "oldest_wait_s", "by_band", "by_class", "in_service", "in_service_by_class"}
SHORT = "今天天气很好。"


@dataclass
class Exposed:
    service: Service
    metrics_url: str  # the operator's listener: /metrics and the detailed health and queue
    voices: Path  # prompts.allowed_dirs

    @property
    def port(self) -> int:
        return int(self.service.url.rsplit(":", 1)[1])

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposed]:
    metrics_port = free_port()
    voices = tmp_path_factory.mktemp("voices")
    shutil.copy(DEFAULT_PROMPTS["exampleB"].prompt_audio_path, voices / "voice.wav")
    (voices / "sub").mkdir()
    extra = (f"admin: {{token: {TOKEN}}}\n"
             f"prompts: {{allowed_dirs: [{json.dumps(str(voices))}]}}\n"
             f"metrics: {{listen: {{host: 127.0.0.1, port: {metrics_port}}}}}\n"
             "logging: {format: json}\n"
             "tenants:\n"
             "  trust_header: true\n"
             "  list:\n"
             f"    - {{name: {KEYED}, keys: [{KEY}]}}\n"
             f"    - {{name: {KEYLESS}}}\n")
    text, port = sidecar_config(backends=1, extra=extra)
    service = start_sidecar(text, port, tmp_path_factory.mktemp("exposure"))
    try:
        yield Exposed(service, f"http://127.0.0.1:{metrics_port}", voices)
    finally:
        service.stop()


def tts(exposed: Exposed, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    content_type, body = multipart(("input_text", SHORT), ("index", "exampleA"))
    return http("POST", exposed.service.url + "/api/v1/tts", body=body,
                headers={"Content-Type": content_type, **(headers or {})})


def received(exposed: Exposed) -> int:
    """TTS requests the emulator behind the sidecar has received."""
    stats = get_json(backend_details(exposed.service)[0]["url"] + "/emulator/stats")
    return int(stats["tts_received"])


def access_entry(exposed: Exposed, request_id: str) -> dict[str, Any]:
    """The sidecar's access-log entry (JSON logging) of the request with this X-Request-ID."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        for line in exposed.service.output().splitlines():
            if line.startswith("{") and f'"{request_id}"' in line:
                entry = json.loads(line)
                if entry.get("id") == request_id and "band" in entry:
                    found.append(entry)
                    return True
        return False

    wait_until(logged, timeout=10, what=f"the access log entry of {request_id}")
    return found[0]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], bytes]:
    status, _, body = http("GET", url, headers=headers)
    return status, json.loads(body), body


# --- Server: every answer, including the ones aiohttp makes itself ------------------------------------


def request(method: str, path: str, headers: str = "", body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: sidecar\r\n{headers}{length}\r\n".encode() + body


FORM_TYPE, FORM = multipart(("input_text", SHORT), ("index", "exampleA"))
MAIN = {
    "health": (request("GET", "/api/v1/health"), 200),
    "queue": (request("GET", "/api/v1/queue"), 200),
    "healthz": (request("GET", "/healthz"), 200),
    "readyz": (request("GET", "/readyz"), 200),
    "tts": (request("POST", "/api/v1/tts", f"Content-Type: {FORM_TYPE}\r\n", FORM), 200),
    "tts, invalid form": (request("POST", "/api/v1/tts", "Content-Type: text/plain\r\n", b"x"), 422),
    "unknown path": (request("GET", "/nope"), 404),
    "wrong method": (request("GET", "/api/v1/tts"), 405),
    "admin without the token": (request("POST", "/admin/drain"), 401),
    "admin, Authorization not ASCII": (request("POST", "/admin/drain").replace(
        b"\r\n\r\n", b"\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"), 400),
    "parser: Content-Length with Transfer-Encoding": (request(
        "POST", "/api/v1/tts", "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n") + b"0\r\n\r\n", 400),
    "parser: unknown method": (b"HZ / HTTP/1.1\r\nHost: sidecar\r\n\r\n", 400),
    "parser: TLS on the plain port": (bytes.fromhex("160301020001000200030300") + b"\0" * 64, 400),
    "parser: header line over 8190 bytes": (request("GET", "/healthz", f"X-Long: {'a' * 9000}\r\n"), 400),
    "parser: NUL in a header": (request("GET", "/healthz").replace(b"\r\n\r\n", b"\r\nX-Bad: a\0b\r\n\r\n"), 400),
    "parser: HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
}
METRICS = {
    "metrics": (request("GET", "/metrics"), 200),
    "health": (request("GET", "/api/v1/health"), 200),
    "queue": (request("GET", "/api/v1/queue"), 200),
    "unknown path": (request("GET", "/nope"), 404),
    "wrong method": (request("POST", "/metrics"), 405),
    "parser: unknown method": (b"HZ / HTTP/1.1\r\nHost: sidecar\r\n\r\n", 400),
    "parser: Content-Length with Transfer-Encoding": (request(
        "POST", "/metrics", "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n") + b"0\r\n\r\n", 400),
}


@pytest.mark.parametrize("listener", ["main", "metrics"])
def test_every_answer_says_server_uvicorn_and_nothing_more(exposed: Exposed, listener: str) -> None:
    cases, port = (MAIN, exposed.port) if listener == "main" else (METRICS, exposed.metrics_port)
    tally = Tally()
    seen: dict[str, tuple[int | None, str | None]] = {}
    for name, (data, status) in cases.items():
        got = raw(port, data, until=1, timeout=10)
        answered = got.responses()
        assert answered, (name, got.data[:300])
        code, headers, body = answered[0]
        tally.answer(code, headers, body)
        seen[name] = (code, headers.get("server"))
        head = got.data.split(b"\r\n\r\n", 1)[0].lower()
        assert (code, headers.get("server")) == (status, "uvicorn"), (name, got.data[:400])
        assert b"python" not in head and b"aiohttp" not in head, (name, head)
    record(f"exposure: Server header on {len(cases)} kinds of answer, {listener} listener", by_case=seen,
           lost=tally.lost, **tally.figures())
    assert tally.lost in (None, 0)
    assert_loop_lag_ok(exposed.metrics_url)


# --- health and queue: anonymous, with the token, on the metrics port ----------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", f"Bearer {KEY}", "Basic x",
                                           f"Bearer {TOKEN}x"],
                         ids=["none", "wrong token", "a tenant key", "Basic", "token with more"])
def test_anonymous_health_is_upstreams_shape(exposed: Exposed, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    status, body, raw_body = get(exposed.service.url + "/api/v1/health", headers)
    assert status == 200 and set(body) == UPSTREAM_HEALTH, body
    assert body["status"] == "healthy"
    for secret in (b"gpu0-0", b"127.0.0.1", b"pid", b"backends"):
        assert secret not in raw_body
    record(f"exposure: anonymous health ({'no' if authorization is None else 'other'} Authorization)",
           status=status, keys=sorted(body), lost=None)


def test_health_details_need_the_token_or_the_metrics_port(exposed: Exposed) -> None:
    status, body, _ = get(exposed.service.url + "/api/v1/health", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and set(body) == UPSTREAM_HEALTH | {"backends"}
    assert [(b["id"], b["state"]) for b in body["backends"]] == [("gpu0-0", "ready")]
    assert body["backends"][0]["pid"] > 0
    status, on_metrics, _ = get(exposed.metrics_url + "/api/v1/health")
    assert status == 200 and set(on_metrics) == UPSTREAM_HEALTH | {"backends"}
    assert on_metrics["backends"][0]["pid"] == body["backends"][0]["pid"]
    # An Authorization header that is not ASCII: anonymous, never a 500.
    got = raw(exposed.port, request("GET", "/api/v1/health").replace(
        b"\r\n\r\n", b"\r\nAuthorization: Bearer \xff\r\n\r\n"), until=1)
    code, _, raw_body = got.responses()[0]
    assert code == 200 and set(json.loads(raw_body)) == UPSTREAM_HEALTH
    record("exposure: health details with the token and on the metrics port", lost=None)


def test_anonymous_queue_shows_depth_and_estimates_only(exposed: Exposed) -> None:
    status, body, raw_body = get(exposed.service.url + "/api/v1/queue")
    assert status == 200
    assert set(body) == PUBLIC_QUEUE | {"policy", "estimates"}, sorted(body)
    assert body["policy"] == {"bands": ["interactive", "standard", "batch"]}
    assert set(body["estimates"]) == {"short", "long"}
    assert all(set(e) == {"chars", "wait_s", "service_s", "deadline_s"} for e in body["estimates"].values())
    for secret in (KEYED.encode(), KEYLESS.encode(), b"gpu0-0", b"127.0.0.1", b"slots", b"cost", b"tenant"):
        assert secret not in raw_body, secret
    status, stats, raw_stats = get(exposed.service.url + "/api/v1/stats/concurrency")
    assert status == 200 and set(stats["queue"]) == PUBLIC_QUEUE
    for secret in (KEYED.encode(), KEYLESS.encode(), b"by_tenant", b"admitted"):
        assert secret not in raw_stats, secret
    record("exposure: anonymous queue and concurrency stats", keys=sorted(body), lost=None)


def test_queue_details_need_the_token_or_the_metrics_port(exposed: Exposed) -> None:
    for url, headers in ((exposed.service.url, {"Authorization": f"Bearer {TOKEN}"}), (exposed.metrics_url, {})):
        status, body, _ = get(url + "/api/v1/queue", headers)
        assert status == 200
        assert {"by_tenant", "admitted", "cost", "slots", "backends", "slow_backends"} <= set(body), sorted(body)
        assert body["policy"]["tenants"] == ["default", KEYED, KEYLESS]
        assert [b["id"] for b in body["backends"]] == ["gpu0-0"]
    _, stats, _ = get(exposed.service.url + "/api/v1/stats/concurrency", {"Authorization": f"Bearer {TOKEN}"})
    assert "by_tenant" in stats["queue"] and "admitted" in stats["queue"]
    record("exposure: queue details with the token and on the metrics port", lost=None)


# --- tenants and bands --------------------------------------------------------------------------------


def test_x_tenant_cannot_claim_a_tenant_that_has_keys(exposed: Exposed) -> None:
    tally = Tally()
    before = received(exposed)
    for name in (KEYED, f" {KEYED} "):
        status, headers, body = tts(exposed, {"X-Tenant": name, "X-Priority": "interactive"})
        tally.answer(status, headers, body)
        assert status == 401 and json.loads(body)["reason"] == "unauthorized", body
        assert "X-Backend" not in headers
    assert received(exposed) == before  # refused at the edge
    # Its key still works, and a tenant without keys may still be named.
    status, headers, body = tts(exposed, {"Authorization": f"Bearer {KEY}", "X-Tenant": KEYED,
                                          "X-Request-ID": "claim-with-key"})
    tally.answer(status, headers, body)
    assert status == 200 and access_entry(exposed, "claim-with-key")["tenant"] == KEYED
    status, headers, body = tts(exposed, {"X-Tenant": KEYLESS, "X-Request-ID": "claim-keyless"})
    tally.answer(status, headers, body)
    assert status == 200 and access_entry(exposed, "claim-keyless")["tenant"] == KEYLESS
    # A key that is not ASCII is an unknown key: 401, never a 500.
    got = raw(exposed.port, request("POST", "/api/v1/tts", f"Content-Type: {FORM_TYPE}\r\n", FORM).replace(
        b"Host: sidecar\r\n", b"Host: sidecar\r\nAuthorization: Bearer acme-key-\xff\xfe0123456789\r\n"), until=1)
    code, got_headers, got_body = got.responses()[0]
    tally.answer(code, got_headers, got_body)
    assert (code, json.loads(got_body)["reason"]) == (401, "unauthorized")
    assert received(exposed) == before + 2
    record("exposure: X-Tenant naming a keyed tenant without its key", lost=tally.lost, **tally.figures())
    assert tally.lost == 0
    assert_loop_lag_ok(exposed.metrics_url)


def test_an_anonymous_client_cannot_ask_for_a_band_above_the_default(exposed: Exposed) -> None:
    tally = Tally()
    bands = {}
    for rid, headers in {
        "anon-interactive": {"X-Priority": "interactive"},
        "anon-batch": {"X-Priority": "batch"},
        "anon-none": {},
        "keyed-interactive": {"X-Priority": "interactive", "Authorization": f"Bearer {KEY}"},
        "keyless-interactive": {"X-Priority": "interactive", "X-Tenant": KEYLESS},
    }.items():
        status, answer_headers, body = tts(exposed, {**headers, "X-Request-ID": rid})
        tally.answer(status, answer_headers, body)
        assert status == 200, body
        bands[rid] = access_entry(exposed, rid)["band"]
    assert bands == {"anon-interactive": "standard", "anon-batch": "batch", "anon-none": "standard",
                     "keyed-interactive": "interactive", "keyless-interactive": "interactive"}
    record("exposure: anonymous X-Priority interactive is served as standard", bands=bands, lost=tally.lost,
           **tally.figures())
    assert tally.lost == 0
    assert_loop_lag_ok(exposed.metrics_url)


# --- prompt writes inside prompts.allowed_dirs ----------------------------------------------------------


def test_a_prompt_write_inside_the_allowed_dirs_reaches_every_backend(exposed: Exposed) -> None:
    """The control of the refusals in test_admin_auth: a file inside the allowed directory (named
    through a path with a dot-dot that stays inside) is written, used, and removed."""
    admin = {"Authorization": f"Bearer {TOKEN}"}
    tally = Tally()
    audio = f"{exposed.voices}/sub/../voice.wav"
    content_type, body = multipart(("index", "allowed"), ("prompt_audio_path", audio), ("prompt_text", "允许"))
    status, headers, raw_body = http("POST", exposed.service.url + "/api/v1/prompts", body=body,
                                     headers={"Content-Type": content_type, **admin})
    tally.answer(status, headers, raw_body)
    assert status == 200, raw_body
    emulator = backend_details(exposed.service)[0]["url"]
    assert get_json(emulator + "/api/v1/prompts/allowed")["config"]["prompt_audio_path"] == audio
    content_type, form = multipart(("input_text", SHORT), ("index", "allowed"))
    status, headers, raw_body = http("POST", exposed.service.url + "/api/v1/tts", body=form,
                                     headers={"Content-Type": content_type})
    tally.answer(status, headers, raw_body)
    assert status == 200 and json.loads(raw_body)["success"] is True
    status, headers, raw_body = http("DELETE", exposed.service.url + "/api/v1/prompts/allowed", headers=admin)
    tally.answer(status, headers, raw_body)
    assert status == 200
    record("exposure: a prompt write inside prompts.allowed_dirs (control)", lost=tally.lost, **tally.figures())
    assert tally.lost == 0
    assert_loop_lag_ok(exposed.metrics_url)
