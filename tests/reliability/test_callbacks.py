"""Task callbacks against a real sidecar, with receivers on 127.0.0.1 named literally in
``tasks.callbacks.allow``: redirects are never followed (not to another local port, not to the
sidecar's own /admin/drain), URLs with user information are refused at submit, an entry naming
``localhost`` does not reach loopback, and every delivered body carries a signature the receiver
verifies with the shared secret."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from scheduler.runtime.callbacks import parse_url, post_pinned
from tests.contract_cases import multipart
from tests.reliability.support import assert_loop_lag_ok, record
from tests.support import Service, get_json, http, sidecar_config, start_sidecar

# One worker runs the whole module, so its module-scoped sidecar starts once.
pytestmark = pytest.mark.xdist_group("test_callbacks")

SECRET = "callback-secret-0123456789abcdef"
SHORT = "今天天气很好，我们去公园散步。"
ATTEMPTS = 2
FINAL_CALLBACK = {"delivered", "failed"}
FINISHED = {"succeeded", "failed", "expired", "cancelled"}


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1, in threads of the test process; records every request."""

    answer: Callable[[str], tuple[int, dict[str, str]]]
    requests: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 1 << 20))
                receiver.requests.append(Received(self.command, self.path,
                                                  {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = receiver.answer(self.path)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": "0"}.items():
                    self.send_header(name, value)
                self.end_headers()

            do_GET = do_PUT = do_DELETE = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"receiver-{self.port}", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@dataclass
class Rig:
    service: Service
    hook: Receiver  # verifies nothing itself; answers 204
    redirector: Receiver  # answers 307: /to-second to `second`, /to-drain to the sidecar's /admin/drain
    second: Receiver  # not in allow: must never hear from the sidecar
    named: Receiver  # allowed only as http://localhost:<port>/, a name that resolves to loopback


def no_redirect(_: str) -> tuple[int, dict[str, str]]:
    return 204, {}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("callbacks")
    locations: dict[str, str] = {}
    receivers = [Receiver(no_redirect), Receiver(lambda path: (307, {"Location": locations[path]})),
                 Receiver(no_redirect), Receiver(no_redirect)]
    hook, redirector, second, named = receivers
    try:
        allow = [f"{hook.url}/hooks", redirector.url, f"http://localhost:{named.port}/"]
        extra = (f"tasks: {{state_dir: {json.dumps(str(tmp / 'tasks'))}, callbacks: {{allow: {json.dumps(allow)}, "
                 f"secret: {SECRET}, attempts: {ATTEMPTS}, backoff_s: 0.05, timeout_s: 2.0}}}}\n")
        text, port = sidecar_config(backends=1, extra=extra)
        locations["/to-second"] = f"{second.url}/stolen"
        locations["/to-drain"] = f"http://127.0.0.1:{port}/admin/drain"
        service = start_sidecar(text, port, tmp)
        try:
            yield Rig(service, hook, redirector, second, named)
        finally:
            service.stop()
    finally:
        for receiver in receivers:
            receiver.stop()


def submit(service: Service, callback: str) -> tuple[int, dict[str, Any]]:
    content_type, body = multipart(("input_text", SHORT), ("index", "exampleA"))
    status, _, raw = http("POST", service.url + "/api/v1/tasks", body=body,
                          headers={"Content-Type": content_type, "X-Callback-URL": callback})
    return status, json.loads(raw)


def settle(service: Service, task_ids: list[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    """Each task's status once it finished and its callback reached a final state; the ones that
    did not within `timeout` are missing from the answer."""
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(task_ids) and time.monotonic() < deadline:
        for task_id in task_ids:
            if task_id not in final:
                status = get_json(f"{service.url}/api/v1/tasks/{task_id}")
                if status["status"] in FINISHED and status["callback"] in FINAL_CALLBACK:
                    final[task_id] = status
        time.sleep(0.05)
    return final


def run_tasks(rig: Rig, callbacks: list[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """Submit one task per callback URL; (the settled tasks, how many accepted tasks never settled)."""
    task_ids = []
    for callback in callbacks:
        status, accepted = submit(rig.service, callback)
        assert status == 202, accepted
        task_ids.append(accepted["task_id"])
    final = settle(rig.service, task_ids)
    return final, len(task_ids) - len(final)


def verify(secret: bytes, headers: dict[str, str], body: bytes, max_age_s: float = 300.0) -> bool:
    """The receiver's check, as docs/tasks.md shows it."""
    timestamp = headers.get("x-glmtts-timestamp", "")
    signature = headers.get("x-glmtts-signature", "")
    if not (timestamp.isascii() and timestamp.isdigit()) or abs(time.time() - int(timestamp)) > max_age_s:
        return False
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest("sha256=" + expected, signature)


def lag_ms(rig: Rig) -> float:
    """The case's worst event-loop lag in ms, asserted within the bound (the case ends here)."""
    return round(assert_loop_lag_ok(rig.service.url) * 1000, 1)


def test_a_redirect_to_another_local_port_is_not_followed(rig: Rig) -> None:
    before = len(rig.redirector.requests)
    final, lost = run_tasks(rig, [f"{rig.redirector.url}/to-second"] * 3)
    followed = len(rig.second.requests)
    record("callbacks: 307 to another local port", tasks=3, lost=lost, callback_states=sorted(
        t["callback"] for t in final.values()), redirect_answers=len(rig.redirector.requests) - before,
           second_port_received=followed, loop_lag_ms=lag_ms(rig))
    assert lost == 0
    assert [t["callback"] for t in final.values()] == ["failed"] * 3
    for task in final.values():  # the state only: no status code, error or timing per target
        assert [key for key in task if "callback" in key] == ["callback"], task
    assert len(rig.redirector.requests) - before == 3 * ATTEMPTS  # each attempt got the 307, none went on
    assert followed == 0, rig.second.requests


def test_a_redirect_to_the_sidecars_admin_drain_does_not_drain_it(rig: Rig) -> None:
    final, lost = run_tasks(rig, [f"{rig.redirector.url}/to-drain"])
    ready = get_json(rig.service.url + "/readyz")
    after, lost_after = run_tasks(rig, [f"{rig.hook.url}/hooks/after-drain-attempt"])  # still takes and runs tasks
    record("callbacks: 307 to the sidecar's /admin/drain", tasks=2, lost=lost + lost_after,
           callback_states=[t["callback"] for t in [*final.values(), *after.values()]],
           draining=ready.get("draining"), loop_lag_ms=lag_ms(rig))
    assert lost == lost_after == 0
    assert [t["callback"] for t in final.values()] == ["failed"]
    assert ready["draining"] is False, ready
    assert [(t["status"], t["callback"]) for t in after.values()] == [("succeeded", "delivered")]
    assert "drain" not in rig.service.output().lower().replace("/to-drain", "")


# name: (X-Callback-URL template, what the detail must say); each passed the former prefix check
BYPASSES = {
    "user information": ("http://127.0.0.1:{redirector}@127.0.0.1:{second}/x", "has user information"),
    "user information with a password": ("http://127.0.0.1:{redirector}:x@127.0.0.1:{second}/x",
                                         "has user information"),
    "backslash before @": ("http://127.0.0.1:{redirector}\\@127.0.0.1:{second}/x", "contains a backslash"),
    "encoded slashes": ("http://127.0.0.1:{redirector}/..%2f..%2fadmin/drain", "percent-encoded slash"),
    "dot segments": ("http://127.0.0.1:{redirector}/x/../../admin/drain", "dot segment"),
    "decimal IPv4": ("http://2130706433:{redirector}/x", "canonical dotted-quad"),
    "hex IPv4": ("http://0x7f.1:{redirector}/x", "canonical dotted-quad"),
    "fragment": ("http://127.0.0.1:{redirector}/x#frag", "has a fragment"),
    "space": ("http://127.0.0.1:{redirector}/x y", "contains whitespace"),
    "IPv4-mapped IPv6": ("http://[::ffff:127.0.0.1]:{redirector}/x", "is not under any entry"),
    "path past a segment boundary": ("http://127.0.0.1:{hook}/hooksx", "is not under any entry"),
}


def test_bypass_urls_are_refused_at_submit(rig: Rig) -> None:
    receivers = (rig.hook, rig.redirector, rig.second, rig.named)
    heard = [len(r.requests) for r in receivers]
    answers = {}
    for name, (template, _) in BYPASSES.items():
        url = template.format(redirector=rig.redirector.port, second=rig.second.port, hook=rig.hook.port)
        answers[name] = submit(rig.service, url)
    statuses = {name: status for name, (status, _) in answers.items()}
    record(f"callbacks: {len(BYPASSES)} bypass URLs at submit", lost=None, statuses=statuses,
           receivers_got=sum(len(r.requests) for r in receivers) - sum(heard), loop_lag_ms=lag_ms(rig))
    assert statuses == dict.fromkeys(BYPASSES, 400), answers
    for name, (_, body) in answers.items():
        assert body["reason"] == "callback_not_allowed", (name, body)
        assert body["detail"].startswith("X-Callback-URL ") and BYPASSES[name][1] in body["detail"], (name, body)
    assert [len(r.requests) for r in receivers] == heard
    status, body = submit(rig.service, f"http://127.0.0.1:{rig.redirector.port}@127.0.0.1:{rig.second.port}/x")
    assert (status, body) == (400, {"detail": "X-Callback-URL has user information (user@host), which is not "
                                              "allowed", "reason": "callback_not_allowed"})


def test_an_entry_naming_localhost_does_not_reach_loopback(rig: Rig) -> None:
    final, lost = run_tasks(rig, [f"http://localhost:{rig.named.port}/x"])
    record("callbacks: an entry naming localhost", tasks=1, lost=lost,
           callback_states=[t["callback"] for t in final.values()], receiver_got=len(rig.named.requests),
           loop_lag_ms=lag_ms(rig))
    assert lost == 0
    assert [t["callback"] for t in final.values()] == ["failed"]
    assert rig.named.requests == []
    assert "localhost resolves to 127.0.0.1 (loopback)" in rig.service.output()


def test_the_receiver_verifies_the_signature_with_the_secret(rig: Rig) -> None:
    before = len(rig.hook.requests)
    final, lost = run_tasks(rig, [f"{rig.hook.url}/hooks/done?ref=42"])
    delivered = rig.hook.requests[before:]
    verified = [verify(SECRET.encode(), r.headers, r.body) for r in delivered]
    record("callbacks: signed delivery", tasks=1, lost=lost, delivered=len(delivered), verified=sum(verified),
           loop_lag_ms=lag_ms(rig))
    assert lost == 0
    [task] = final.values()
    assert (task["status"], task["callback"]) == ("succeeded", "delivered")
    [received] = delivered
    assert (received.method, received.path) == ("POST", "/hooks/done?ref=42")
    assert received.headers["content-type"] == "application/json"
    assert verified == [True]
    payload = json.loads(received.body)
    assert payload["task_id"] == task["task_id"] and payload["status"] == "succeeded"
    # the check fails for a changed body, another secret or an old timestamp
    assert not verify(SECRET.encode(), received.headers, received.body + b" ")
    assert not verify(b"another-secret-0123456789", received.headers, received.body)
    assert not verify(SECRET.encode(), received.headers, received.body, max_age_s=-1)


def test_the_connection_goes_to_the_checked_address_under_the_url_host_name(rig: Rig) -> None:
    """No second lookup: a name that resolves nowhere (.invalid) still reaches the pinned address,
    and the receiver sees that name in Host."""
    before = len(rig.hook.requests)
    target = parse_url(f"http://callback.invalid:{rig.hook.port}/hooks/pinned")
    status = asyncio.run(post_pinned(target, [parse_url(rig.hook.url).address or pytest.fail("no address")],
                                     b"{}", {"Content-Type": "application/json"}, 5.0))
    received = rig.hook.requests[before:]
    record("callbacks: connection pinned to the checked address", status=status, requests=len(received), lost=None)
    assert status == 204
    assert [(r.path, r.headers["host"]) for r in received] == [("/hooks/pinned", f"callback.invalid:{rig.hook.port}")]
