"""The outer layer of docs/scale-out.md with real processes: config/nginx-outer.conf (rendered by
bench.outer_nginx) terminating TLS with a self-signed certificate in front of two sidecars, each
with one emulator of its own (``backends.external``, so an emulator outlives its sidecar and
tells how many TTS requests reached it)."""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bench.nginx import nginx_binary
from bench.outer_nginx import render_outer, self_signed, start_outer
from tests.contract_cases import multipart
from tests.support import (
    ADMIN_TOKEN,
    Service,
    get_json,
    http,
    sidecar_config,
    start_emulator,
    start_sidecar,
    wait_http,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed"),
]

SHORT = "今天天气很好，我们去公园散步。"
FLAT = ("--load-seconds", "0", "--cold-factor", "1")  # every request as long as its text says


@dataclass
class Cluster:
    emulators: list[Service]
    sidecars: list[Service]
    nginx: Service
    tls: ssl.SSLContext  # trusts the self-signed certificate only
    prefix: Path

    def received(self) -> list[int]:
        """TTS requests each sidecar's emulator received, in sidecar order."""
        return [get_json(e.url + "/emulator/stats")["tts_received"] for e in self.emulators]

    def call(self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        """One request to nginx over HTTPS, the certificate verified."""
        parts = urlsplit(self.nginx.url)
        conn = httpclient.HTTPSConnection(parts.hostname or "127.0.0.1", parts.port, context=self.tls,
                                          timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def tts(self, text: str = SHORT, *, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
        content_type, body = multipart(("input_text", text), ("index", "exampleA"))
        headers = {"Content-Type": content_type, **({"X-Request-ID": request_id} if request_id else {})}
        status, _, raw = self.call("POST", "/api/v1/tts", body=body, headers=headers)
        return status, json.loads(raw)

    def upstreams(self) -> list[str]:
        """$upstream_addr of every request nginx logged so far ("a, b" when it tried two)."""
        log = (self.prefix / "access.log").read_text()
        return [_upstream_field(line) for line in log.splitlines()]


def _upstream_field(line: str) -> str:
    # log_format glmtts: ... "$request" $status $bytes $request_time $upstream_addr $upstream_status ...
    after_request = line.split('" ', 1)[1].split(" ")
    addresses: list[str] = []
    for token in after_request[3:]:
        addresses.append(token.rstrip(","))
        if not token.endswith(","):
            break
    return ", ".join(addresses)


def ok(result: tuple[int, dict[str, Any]]) -> bool:
    status, body = result
    return status == 200 and body.get("success") is True and bool(body.get("audio_base64"))


def direct_tts(sidecar: Service, text: str = SHORT, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    content_type, body = multipart(("input_text", text), ("index", "exampleA"))
    status, _, raw = http("POST", sidecar.url + "/api/v1/tts", body=body, headers={"Content-Type": content_type},
                          timeout=timeout)
    return status, json.loads(raw)


def refuses(sidecar: Service) -> bool:
    """Whether a new connection to the sidecar's port is refused."""
    parts = urlsplit(sidecar.url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


@contextlib.contextmanager
def cluster(tmp_path: Path, *, emulator_args: tuple[str, ...] = (), time_scale: float = 0.01,
            unready_s: float = 5.0, rate_per_s: float | None = None, burst: int | None = None) -> Iterator[Cluster]:
    """Two emulators, two sidecars (one emulator each), nginx with TLS in front; all stopped at exit."""
    started: list[Service] = []
    try:
        emulators = [start_emulator("--seed", str(i), *emulator_args, time_scale=time_scale, wait=False)
                     for i in range(2)]
        started += emulators
        for emulator in emulators:
            wait_http(emulator, "/api/v1/health")
        sidecars = []
        for i, emulator in enumerate(emulators):
            text, port = sidecar_config(backends=0, slots=2, time_scale=time_scale,
                                        backend_extra=f"external: [{json.dumps(emulator.url)}]",
                                        extra=f"shutdown: {{drain_timeout_s: 30.0, unready_s: {unready_s}}}")
            work = tmp_path / f"sidecar{i}"
            work.mkdir()
            sidecars.append(start_sidecar(text, port, work, wait_ready=False))
            started.append(sidecars[-1])
        for sidecar in sidecars:
            wait_http(sidecar, "/readyz", timeout=60.0)
        cert, key = self_signed(tmp_path / "tls")
        prefix = tmp_path / "nginx"
        nginx = start_outer(prefix, [urlsplit(s.url).netloc for s in sidecars], cert=cert, key=key,
                            rate_per_s=rate_per_s, burst=burst)
        started.append(nginx)
        yield Cluster(emulators, sidecars, nginx, ssl.create_default_context(cafile=str(cert)), prefix)
    finally:
        for service in reversed(started):
            service.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster the tests that leave it as it was share."""
    with cluster(tmp_path_factory.mktemp("outer")) as running:
        yield running


def test_the_committed_config_renders_for_tls_and_plain_http(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    for tls in ((cert, key), (None, None)):
        conf = tmp_path / "nginx.conf"
        conf.write_text(render_outer(prefix=tmp_path, port=1, sidecars=["127.0.0.1:2", "127.0.0.1:3"],
                                     cert=tls[0], key=tls[1], rate_per_s=0.5, burst=7))
        text = conf.read_text()
        assert "server 127.0.0.1:2 max_fails=3 fail_timeout=10s;" in text and "10.0.1.11" not in text
        assert "rate=30r/m" in text and "burst=7 nodelay" in text
        assert ("listen 127.0.0.1:1 ssl;" in text) == (tls[0] is not None)
        assert "proxy_next_upstream error timeout;" in text and "non_idempotent" not in text.split("#")[0]
        binary = nginx_binary()
        assert binary is not None
        checked = subprocess.run([binary, "-t", "-c", str(conf), "-p", str(tmp_path), "-e",
                                  str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
    with pytest.raises(ValueError, match="both cert and key"):
        render_outer(prefix=tmp_path, port=1, sidecars=["127.0.0.1:2"], cert=cert, key=None)


@pytest.mark.slow  # two sidecars, their emulators and nginx
def test_https_requests_reach_both_sidecars(shared: Cluster) -> None:
    before = shared.received()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: shared.tts(SHORT * 3 + str(i)), range(12)))
    assert all(ok(r) for r in results)
    gained = [now - then for now, then in zip(shared.received(), before, strict=True)]
    assert sum(gained) == 12 and min(gained) >= 1, gained  # least_conn spread them over both
    # The client's X-Request-ID reaches the backend through nginx and the sidecar.
    assert ok(shared.tts(request_id="outer-request-id-1"))
    last = [get_json(e.url + "/emulator/stats")["last_request_id"] or "" for e in shared.emulators]
    assert any(rid.startswith("outer-request-id-1") for rid in last), last
    # Without the certificate as a trust anchor the connection is refused: it is TLS, verified.
    parts = urlsplit(shared.nginx.url)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn = httpclient.HTTPSConnection(parts.hostname or "", parts.port, timeout=10,
                                          context=ssl.create_default_context())
        try:
            conn.request("GET", "/healthz")
        finally:
            conn.close()


@pytest.mark.slow  # two sidecars, their emulators and nginx
def test_per_sidecar_endpoints_are_not_reachable_through_nginx(shared: Cluster) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert shared.call("POST", "/admin/drain", headers=auth)[0] == 404
    assert shared.call("GET", "/metrics")[0] == 404
    assert shared.call("POST", "/api/v1/clear_cache", headers=auth)[0] == 404
    assert shared.call("DELETE", "/api/v1/prompts/exampleA", headers=auth)[0] == 403
    assert shared.call("GET", "/api/v1/prompts/exampleA")[0] == 200  # reads go through
    assert all(http("GET", s.url + "/readyz")[0] == 200 for s in shared.sidecars)  # nobody drained


@pytest.mark.slow  # two sidecars, their emulators and nginx
def test_limit_req_answers_429_past_the_burst(tmp_path: Path, shared: Cluster) -> None:
    cert, key = self_signed(tmp_path / "tls")
    sidecars = [urlsplit(s.url).netloc for s in shared.sidecars]
    nginx = start_outer(tmp_path / "nginx", sidecars, cert=cert, key=key, rate_per_s=0.2, burst=3)
    try:
        limited = Cluster(shared.emulators, shared.sidecars, nginx, ssl.create_default_context(cafile=str(cert)),
                          tmp_path / "nginx")
        answers = [limited.call("GET", "/healthz") for _ in range(8)]
        statuses = [status for status, _, _ in answers]
        assert statuses[:4] == [200] * 4, statuses  # one, then the burst of three
        assert statuses[4:] == [429] * 4, statuses  # one every 5 s after that
        _, headers, body = answers[-1]
        assert headers.get("Retry-After") == "1" and "Too many requests" in json.loads(body)["detail"]
    finally:
        nginx.stop()


@pytest.mark.slow  # two sidecars, their emulators and nginx
def test_a_post_whose_sidecar_dies_is_not_sent_to_the_other(tmp_path: Path) -> None:
    # ~1 s of synthesis per request: long enough to kill the sidecar while it waits for it.
    with cluster(tmp_path, time_scale=0.3, emulator_args=FLAT) as c:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.tts)
            wait_until(lambda: sum(c.received()) == 1, timeout=20, what="the request to reach a backend")
            victim = c.received().index(1)
            c.sidecars[victim].stop(signal.SIGKILL)
            status, body = pending.result(timeout=30)
        assert status in (502, 503) and "detail" in body  # nginx's own answer, not a second attempt
        time.sleep(1.0)  # anything re-sent would have reached the other emulator by now
        assert c.received()[1 - victim] == 0
        assert len(c.upstreams()) == 1 and "," not in c.upstreams()[0]  # one sidecar tried, once
        # New requests find the dead sidecar's port refused and go to the other.
        assert all(ok(c.tts()) for _ in range(3))
        assert c.received() == ([1, 3] if victim == 0 else [3, 1])


@pytest.mark.slow  # two sidecars, their emulators and nginx
def test_a_draining_sidecar_closes_its_listener_and_nginx_goes_elsewhere(tmp_path: Path) -> None:
    unready_s = 1.5
    with cluster(tmp_path, time_scale=0.3, unready_s=unready_s, emulator_args=FLAT) as c:
        draining, other = c.sidecars
        # Keep-alive connections from nginx to both sidecars exist before the drain.
        with ThreadPoolExecutor(4) as pool:
            assert all(ok(r) for r in pool.map(lambda _: c.tts(), range(4)))
        assert min(c.received()) >= 1
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(direct_tts, draining, SHORT * 8)  # ~6 s: the drain waits for it
            wait_until(lambda: get_json(c.emulators[0].url + "/emulator/stats")["in_flight"] == 1, timeout=10,
                       what="the long request to run")
            started = time.monotonic()
            status, _, _ = http("POST", draining.url + "/admin/drain",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert status == 202
            assert http("GET", draining.url + "/readyz")[0] == 503  # at once
            assert not refuses(draining)  # still accepting until unready_s
            wait_until(lambda: refuses(draining), timeout=10, what="the listener to close")
            assert time.monotonic() - started >= unready_s - 0.2
            before = c.received()
            with ThreadPoolExecutor(6) as clients:
                results = list(clients.map(lambda _: c.tts(), range(6)))
            assert all(ok(r) for r in results), results
            assert not running.done()  # all that while the drained sidecar was still at work
            after = c.received()
            assert after[0] == before[0] and after[1] == before[1] + 6  # all to the other sidecar
            # Each was answered by the other sidecar, some after a refused connection to this one.
            assert all(u.endswith(urlsplit(other.url).netloc) for u in c.upstreams()[-6:]), c.upstreams()
            assert ok(running.result(timeout=30))  # the admitted request still got its answer
        assert draining.proc.wait(30) == 0
        assert http("GET", other.url + "/readyz")[0] == 200


@pytest.mark.slow  # two sidecars, their emulators and nginx
def test_with_unready_s_0_the_listener_closes_at_once_and_open_connections_still_answer(tmp_path: Path) -> None:
    with cluster(tmp_path, time_scale=0.3, unready_s=0.0, emulator_args=FLAT) as c:
        draining = c.sidecars[0]
        parts = urlsplit(draining.url)
        kept = httpclient.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        try:
            kept.request("GET", "/readyz")
            first = kept.getresponse()
            first.read()  # read whole: the connection stays open for the next request
            assert first.status == 200
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(direct_tts, draining, SHORT * 8)
                wait_until(lambda: get_json(c.emulators[0].url + "/emulator/stats")["in_flight"] == 1, timeout=10,
                           what="the long request to run")
                started = time.monotonic()
                assert http("POST", draining.url + "/admin/drain",
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})[0] == 202
                wait_until(lambda: refuses(draining), timeout=5, what="the listener to close")
                assert time.monotonic() - started < 1.0
                # The idle keep-alive connection was closed with the listener: nothing more on it.
                with pytest.raises((ConnectionError, httpclient.HTTPException)):
                    kept.request("GET", "/readyz")
                    kept.getresponse().read()
                assert ok(running.result(timeout=30))  # the request in progress still got its answer
        finally:
            kept.close()
        assert draining.proc.wait(30) == 0
