"""Callback URLs: strict parsing, allow-list matching, address classification, the pinned resolver,
signing, and delivery with retries (lookup, sender, clock and sleep are fakes: no sockets)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Mapping, Sequence

import aiohttp
import pytest

from scheduler.config import CallbacksConfig, ConfigError, parse_config
from scheduler.runtime.callbacks import (
    MAX_URL_CHARS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AddressKind,
    AddressRefused,
    CallbackURL,
    CallbackURLError,
    IPAddress,
    PinnedResolver,
    checked_addresses,
    classify,
    deliver,
    matches,
    parse_url,
    sign,
)

SECRET = "callback-secret-0123456789"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def refusal(url: str) -> str:
    with pytest.raises(CallbackURLError) as caught:
        parse_url(url)
    return str(caught.value)


def allows(entry: str, url: str) -> bool:
    return matches(parse_url(entry, entry=True), parse_url(url))


# --- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "scheme", "host", "port", "path", "query"), [
    ("http://hooks.example.com", "http", "hooks.example.com", 80, "/", ""),
    ("https://hooks.example.com/tts/done", "https", "hooks.example.com", 443, "/tts/done", ""),
    ("HTTPS://Hooks.Example.COM:8443/TTS/?id=7&x=%41", "https", "hooks.example.com", 8443, "/TTS/", "id=7&x=%41"),
    ("http://hooks.example.com/%74ts/%7e%2a", "http", "hooks.example.com", 80, "/tts/~%2A", ""),
    ("http://127.0.0.1:9000/x", "http", "127.0.0.1", 9000, "/x", ""),
    ("http://[::1]:9000/x", "http", "::1", 9000, "/x", ""),
    ("http://[0:0::1]/", "http", "::1", 80, "/", ""),
    ("http://xn--bcher-kva.example/", "http", "xn--bcher-kva.example", 80, "/", ""),
    ("http://1.example.com/", "http", "1.example.com", 80, "/", ""),
    ("http://hooks.example.com/a/b@c;d=e", "http", "hooks.example.com", 80, "/a/b@c;d=e", ""),
])
def test_accepted_urls_are_normalised(url: str, scheme: str, host: str, port: int, path: str, query: str) -> None:
    parsed = parse_url(url)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.path, parsed.query) == (scheme, host, port, path, query)
    assert parse_url(str(parsed)) == parsed  # the canonical form reads back the same


def test_the_canonical_form_omits_default_ports_and_brackets_ipv6() -> None:
    assert str(parse_url("https://h.example:443/a?q")) == "https://h.example/a?q"
    assert str(parse_url("http://[::1]:9000/a")) == "http://[::1]:9000/a"
    assert parse_url("http://h.example/a?token=s3cret").for_log() == "http://h.example/a"


@pytest.mark.parametrize(("url", "problem"), [
    # user information: the host is after the @
    ("http://127.0.0.1:18720@127.0.0.1:18721/x", "user information"),
    ("http://allowed.example.com:80@evil/", "user information"),
    ("http://user:pass@allowed.example.com/", "user information"),
    ("http://@allowed.example.com/", "user information"),
    # backslashes, which some parsers read as slashes
    ("http://allowed.example.com\\@evil/", "backslash"),
    ("http://evil\\allowed.example.com/", "backslash"),
    ("http://allowed.example.com/tts\\..\\admin", "backslash"),
    # encoded separators and dot segments
    ("http://allowed.example.com/tts%2fadmin", "percent-encoded slash"),
    ("http://allowed.example.com/tts%2Fadmin", "percent-encoded slash"),
    ("http://allowed.example.com/tts%5cadmin", "percent-encoded slash or backslash"),
    ("http://allowed.example.com/tts/../admin", "dot segment"),
    ("http://allowed.example.com/tts/./x", "dot segment"),
    ("http://allowed.example.com/tts/%2e%2e/admin", "dot segment"),
    ("http://allowed.example.com/tts/.%2E/admin", "dot segment"),
    ("http://allowed.example.com/tts/..", "dot segment"),
    ("http://allowed.example.com/tts/..;/admin", "dot segment"),
    ("http://allowed.example.com/tts/%2e%2e;x=1/admin", "dot segment"),
    ("http://allowed.example.com/tts//x", "empty segment"),
    ("http://allowed.example.com//tts", "empty segment"),
    ("http://allowed.example.com/tts/%00", "control character"),
    ("http://allowed.example.com/tts/%zz", "malformed percent-escape"),
    ("http://allowed.example.com/tts/%4", "malformed percent-escape"),
    ("http://allowed.example.com/tts?x=%g1", "malformed percent-escape"),
    # IPv6 zones and malformed brackets
    ("http://[fe80::1%25eth0]:9000/", "zone identifier"),
    ("http://[fe80::1%eth0]/", "zone identifier"),
    ("http://[::1/", "unclosed"),
    ("http://[::1]x/", "after the bracketed"),
    ("http://[not-an-address]/", "invalid IPv6"),
    ("http://[v1.x]/", "invalid IPv6"),
    ("http://::1/", "without brackets"),
    ("http://a.example.com/x]", "outside a bracketed"),
    # numeric hosts a resolver reads as 127.0.0.1
    ("http://2130706433/", "canonical dotted-quad"),
    ("http://0x7f.1/", "canonical dotted-quad"),
    ("http://0x7f000001/", "canonical dotted-quad"),
    ("http://0177.0.0.1/", "canonical dotted-quad"),
    ("http://127.1/", "canonical dotted-quad"),
    ("http://127.0.0.01/", "canonical dotted-quad"),
    ("http://127.0.0.1.1/", "canonical dotted-quad"),
    ("http://256.0.0.1/", "canonical dotted-quad"),
    ("http://example.0x7f/", "canonical dotted-quad"),
    # hosts and ports
    ("http:///x", "no host"),
    ("http://:80/x", "no host"),
    ("http://a.example.com./", "invalid host name"),
    ("http://a..example.com/", "invalid host name"),
    ("http://-a.example.com/", "invalid host name"),
    ("http://a_b.example.com/", "invalid host name"),
    ("http://a.example.com%2f@b/", "user information"),
    ("http://a%2eexample.com/", "invalid host name"),
    (f"http://{'a' * 64}.example.com/", "invalid host name"),
    ("http://xn--zz.example/", "invalid IDNA label"),
    ("http://a.example.com:/x", "empty port"),
    ("http://a.example.com:0/x", "invalid port"),
    ("http://a.example.com:65536/x", "invalid port"),
    ("http://a.example.com:+80/x", "invalid port"),
    ("http://a.example.com:80:81/x", "more than one port"),
    # schemes, fragments and characters
    ("ftp://a.example.com/", "scheme 'ftp'"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("gopher://a.example.com/", "scheme 'gopher'"),
    ("a.example.com/x", "must start with http:// or https://"),
    ("http:a.example.com/x", "must start with http:// or https://"),
    ("//a.example.com/x", "must start with http:// or https://"),
    ("http://a.example.com/x#frag", "fragment"),
    ("http://a.example.com/x#", "fragment"),
    ("http://a.example.com/x y", "whitespace"),
    (" http://a.example.com/", "whitespace"),
    ("http://a.example.com/\tx", "whitespace"),
    ("http://a.example.com/x\r\nHost: evil", "whitespace"),
    ("http://a.example.com/\x00", "control character"),
    ("http://a.example.com/\x7f", "control character"),
    ("http://a.example.com/\x85", "whitespace"),
    ("http://bücher.example/", "non-ASCII"),
    ("http://a.example.com/ü", "non-ASCII"),
    ("http://a.example.com\u3002evil.net/", "non-ASCII"),
    ("http://a.example.com/<script>", "percent-encoded"),
    ("http://a.example.com/x\"y", "percent-encoded"),
    ("http://a.example.com/{x}", "percent-encoded"),
    ("", "must start with"),
])
def test_refused_urls_say_why(url: str, problem: str) -> None:
    assert problem in refusal(url)


def test_over_long_urls_are_refused() -> None:
    base = "http://a.example.com/"
    assert parse_url(base + "x" * (MAX_URL_CHARS - len(base))).path.startswith("/x")
    assert f"longer than {MAX_URL_CHARS}" in refusal(base + "x" * (MAX_URL_CHARS - len(base) + 1))


def test_entries_may_spell_a_host_in_unicode_but_have_no_query() -> None:
    entry = parse_url("https://Bücher.Example/tts", entry=True)
    assert entry.host == "xn--bcher-kva.example"
    with pytest.raises(CallbackURLError, match="has a query"):
        parse_url("https://hooks.example.com/tts?x=1", entry=True)
    with pytest.raises(CallbackURLError, match="not valid IDNA"):
        parse_url("https://\u2603.example/", entry=True)  # a snowman: no letter, not IDNA 2008
    with pytest.raises(CallbackURLError, match="non-ASCII character outside the host"):
        parse_url("https://hooks.example.com/bücher", entry=True)


# --- matching --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "url", "allowed"), [
    ("https://hooks.example.com/tts", "https://hooks.example.com/tts", True),
    ("https://hooks.example.com/tts", "https://hooks.example.com/tts/", True),
    ("https://hooks.example.com/tts", "https://hooks.example.com/tts/done?id=1", True),
    ("https://hooks.example.com/tts/", "https://hooks.example.com/tts/done", True),
    ("https://hooks.example.com/tts", "https://hooks.example.com/ttsx", False),
    ("https://hooks.example.com/tts/", "https://hooks.example.com/ttsx", False),
    ("https://hooks.example.com/tts", "https://hooks.example.com/", False),
    ("https://hooks.example.com/tts", "https://hooks.example.com/TTS", False),  # paths are case-sensitive
    ("https://hooks.example.com/tts", "https://hooks.example.com/%74ts/x", True),  # the same path, encoded
    ("https://hooks.example.com", "https://hooks.example.com/anything/at/all", True),
    ("https://HOOKS.example.com/tts", "https://hooks.EXAMPLE.com/tts", True),
    ("https://hooks.example.com/tts", "HTTPS://hooks.example.com/tts", True),
    ("https://bücher.example/", "https://xn--bcher-kva.example/x", True),
    # host suffixes and prefixes are other hosts
    ("http://allowed.example.com/", "http://allowed.example.com.evil.net/", False),
    ("http://allowed.example.com/", "http://evil-allowed.example.com/", False),
    ("http://allowed.example.com/", "http://sub.allowed.example.com/", False),
    # ports: explicit or the scheme's default; never a prefix of a longer port
    ("http://127.0.0.1:18720/", "http://127.0.0.1:18720/x", True),
    ("http://127.0.0.1:80/", "http://127.0.0.1/x", True),
    ("https://hooks.example.com/", "https://hooks.example.com:443/x", True),
    ("http://127.0.0.1:1872/", "http://127.0.0.1:18720/x", False),
    ("http://127.0.0.1/", "http://127.0.0.1:8080/x", False),
    ("https://hooks.example.com/", "https://hooks.example.com:8443/x", False),
    ("https://hooks.example.com/", "http://hooks.example.com/x", False),
    ("http://hooks.example.com/", "https://hooks.example.com/x", False),
    # literal addresses match only the same address, written any way
    ("http://[::1]:9000/", "http://[0:0:0:0:0:0:0:1]:9000/x", True),
    ("http://127.0.0.1:9000/", "http://[::ffff:127.0.0.1]:9000/", False),
    ("http://127.0.0.1:9000/", "http://127.0.0.2:9000/", False),
    ("http://localhost:9000/", "http://127.0.0.1:9000/", False),
    ("http://127.0.0.1:9000/", "http://localhost:9000/", False),
])
def test_matching(entry: str, url: str, allowed: bool) -> None:
    assert allows(entry, url) is allowed


# --- configuration ---------------------------------------------------------------------------------


def callbacks_config(**keys: object) -> CallbacksConfig:
    return parse_config(json.dumps({"tasks": {"callbacks": keys}})).tasks.callbacks


def config_problems(**keys: object) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        callbacks_config(**keys)
    return caught.value.problems


def test_config_refuses_entries_that_are_not_strict_urls() -> None:
    problems = config_problems(allow=["http://127.0.0.1:9000/", "http://127.0.0.1:18720@127.0.0.1:18721/",
                                      "http://hooks.example.com/a/../b", "hooks.example.com", "http://0x7f.1/",
                                      "http://hooks.example.com/?x=1", "http://0.0.0.0:9000/", "http://[ff02::1]/"],
                               secret=SECRET)
    assert [p.split(":")[0] for p in problems] == [f"tasks.callbacks.allow[{i}]" for i in range(1, 8)]
    assert "'http://127.0.0.1:18720@127.0.0.1:18721/' has user information" in problems[0]
    assert "dot segment" in problems[1]
    assert "must start with http:// or https://" in problems[2]
    assert "canonical dotted-quad" in problems[3]
    assert "has a query" in problems[4]
    assert "unspecified address" in problems[5] and "multicast address" in problems[6]


def test_config_requires_a_secret_when_receivers_are_allowed() -> None:
    problems = config_problems(allow=["https://hooks.example.com/tts"])
    assert len(problems) == 1 and problems[0].startswith("tasks.callbacks.secret: must be set when allow")
    assert callbacks_config(allow=[]).secret is None  # no receivers, nothing to sign
    assert callbacks_config(allow=["https://hooks.example.com/tts"], secret=SECRET).allow


def test_the_secret_is_read_like_the_admin_token_and_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBACK_SECRET", "from-the-environment-0123")
    config = callbacks_config(allow=["https://hooks.example.com/"], secret="env:CALLBACK_SECRET")
    assert config.secret is not None and config.secret.get_secret_value() == "from-the-environment-0123"
    assert "from-the-environment" not in repr(config)
    short = "short-secret"
    assert config_problems(secret=short) == ("tasks.callbacks.secret: must hold at least 16 characters",)
    spaced = "a secret with spaces in it"
    problems = config_problems(secret=spaced)
    assert problems == ("tasks.callbacks.secret: must hold printable ASCII only, without spaces",)
    assert config_problems(secret="env:NO_SUCH_CALLBACK_SECRET") == (
        "tasks.callbacks.secret: environment variable NO_SUCH_CALLBACK_SECRET is not set",)
    assert config_problems(secret=12345678901234567) == ("tasks.callbacks.secret: must be a string",)


def test_refusal_is_one_clause_naming_the_problem_or_none() -> None:
    config = callbacks_config(allow=["http://127.0.0.1:18720/hooks"], secret=SECRET)
    assert config.refusal("http://127.0.0.1:18720/hooks/done") is None
    assert config.refusal("http://127.0.0.1:18720@127.0.0.1:18721/hooks") == (
        "has user information (user@host), which is not allowed")
    assert config.refusal("http://127.0.0.1:18720/hooksx") == "is not under any entry of tasks.callbacks.allow"
    assert config.refusal("http://127.0.0.1:18721/hooks") == "is not under any entry of tasks.callbacks.allow"
    assert config.refusal("http://127.0.0.1:18720/hooks/../admin/drain") is not None
    assert callbacks_config().refusal("http://127.0.0.1:18720/hooks") == (
        "is not under any entry of tasks.callbacks.allow")


# --- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "kind"), [
    ("8.8.8.8", AddressKind.GLOBAL),
    ("2606:4700::1111", AddressKind.GLOBAL),
    ("::ffff:8.8.8.8", AddressKind.GLOBAL),
    ("127.0.0.1", AddressKind.LOOPBACK),
    ("127.255.0.9", AddressKind.LOOPBACK),
    ("::1", AddressKind.LOOPBACK),
    ("::ffff:127.0.0.1", AddressKind.LOOPBACK),  # IPv4-mapped
    ("64:ff9b::7f00:1", AddressKind.LOOPBACK),  # NAT64 of 127.0.0.1
    ("2002:7f00:1::", AddressKind.LOOPBACK),  # 6to4 of 127.0.0.1
    ("10.1.2.3", AddressKind.PRIVATE),
    ("172.16.0.1", AddressKind.PRIVATE),
    ("172.31.255.255", AddressKind.PRIVATE),
    ("192.168.1.1", AddressKind.PRIVATE),
    ("100.64.0.1", AddressKind.PRIVATE),
    ("::ffff:10.0.0.1", AddressKind.PRIVATE),
    ("64:ff9b::a00:1", AddressKind.PRIVATE),
    ("169.254.169.254", AddressKind.LINK_LOCAL),
    ("fe80::1", AddressKind.LINK_LOCAL),
    ("fe80::1%2", AddressKind.LINK_LOCAL),
    ("fc00::1", AddressKind.UNIQUE_LOCAL),
    ("fd12:3456::1", AddressKind.UNIQUE_LOCAL),
    ("fec0::1", AddressKind.UNIQUE_LOCAL),
    ("224.0.0.1", AddressKind.MULTICAST),
    ("233.252.0.1", AddressKind.MULTICAST),
    ("ff02::1", AddressKind.MULTICAST),
    ("ff0e::1", AddressKind.MULTICAST),
    ("0.0.0.0", AddressKind.UNSPECIFIED),
    ("::", AddressKind.UNSPECIFIED),
    ("::ffff:0.0.0.0", AddressKind.UNSPECIFIED),
    ("0.1.2.3", AddressKind.RESERVED),
    ("192.0.2.1", AddressKind.RESERVED),
    ("198.18.0.1", AddressKind.RESERVED),
    ("240.0.0.1", AddressKind.RESERVED),
    ("255.255.255.255", AddressKind.RESERVED),
    ("2001:db8::1", AddressKind.RESERVED),
    ("::7f00:1", AddressKind.RESERVED),  # deprecated IPv4-compatible
    ("2001::1", AddressKind.RESERVED),  # Teredo
    ("100::1", AddressKind.RESERVED),  # discard-only
])
def test_classify(address: str, kind: AddressKind) -> None:
    assert classify(ip(address)) is kind


class FakeLookup:
    def __init__(self, answers: Mapping[str, Sequence[str]] | None = None, error: OSError | None = None) -> None:
        self.answers = answers or {}
        self.error = error
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append((host, port))
        if self.error is not None:
            raise self.error
        return [ip(a) for a in self.answers.get(host, ())]


async def test_a_name_must_resolve_to_global_addresses_only() -> None:
    lookup = FakeLookup({"hooks.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
                         "mixed.example.com": ["93.184.215.14", "10.0.0.7"],
                         "mapped.example.com": ["::ffff:127.0.0.1"],
                         "metadata.example.com": ["169.254.169.254"],
                         "localhost": ["127.0.0.1", "::1"]})
    good = await checked_addresses(parse_url("https://hooks.example.com/"), lookup)
    assert good == [ip("93.184.215.14"), ip("2606:2800:21f:cb07:6820:80da:af6b:8b2c")]
    assert lookup.asked == [("hooks.example.com", 443)]
    for host, why in [("mixed.example.com", "10.0.0.7 (private)"), ("mapped.example.com", "(loopback)"),
                      ("metadata.example.com", "169.254.169.254 (link-local)"), ("localhost", "127.0.0.1 (loopback)"),
                      ("nothing.example.com", "resolves to no address")]:
        with pytest.raises(AddressRefused, match=why.replace("(", r"\(").replace(")", r"\)")):
            await checked_addresses(parse_url(f"http://{host}/"), lookup)


async def test_a_literal_address_is_its_own_answer_and_a_failed_lookup_refuses() -> None:
    lookup = FakeLookup(error=socket.gaierror(-2, "Name or service not known"))
    assert await checked_addresses(parse_url("http://127.0.0.1:9000/"), lookup) == [ip("127.0.0.1")]
    assert await checked_addresses(parse_url("http://[::1]:9000/"), lookup) == [ip("::1")]
    assert lookup.asked == []
    with pytest.raises(AddressRefused, match="does not resolve"):
        await checked_addresses(parse_url("http://hooks.example.com/"), lookup)


async def test_the_pinned_resolver_answers_only_the_checked_addresses() -> None:
    resolver = PinnedResolver("hooks.example.com", [ip("93.184.215.14"), ip("2606:2800::1")])
    both = await resolver.resolve("hooks.example.com", 443, family=socket.AF_UNSPEC)
    assert [(r["host"], r["port"], r["family"], r["hostname"]) for r in both] == [
        ("93.184.215.14", 443, socket.AF_INET, "hooks.example.com"),
        ("2606:2800::1", 443, socket.AF_INET6, "hooks.example.com")]
    assert all(r["flags"] & socket.AI_NUMERICHOST for r in both)
    assert [r["host"] for r in await resolver.resolve("hooks.example.com", 443, family=socket.AF_INET6)] == [
        "2606:2800::1"]
    for other in ("evil.example.com", "HOOKS.example.com.evil", "127.0.0.1"):
        with pytest.raises(OSError, match="no checked address"):
            await resolver.resolve(other, 443, family=socket.AF_UNSPEC)
    with pytest.raises(OSError, match="no checked address of family"):
        await PinnedResolver("h.example", [ip("93.184.215.14")]).resolve("h.example", 80, family=socket.AF_INET6)
    await resolver.close()


# --- signing and delivery --------------------------------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"task_id":"abc","status":"succeeded"}'
    # openssl dgst -sha256 -hmac callback-secret-0123456789 over '1700000000.' + body
    expected = "sha256=b4cef3bcd526788d04e0c325080f71e53c554009eef13c1d8c202db2cf2454f1"
    assert sign(SECRET, 1700000000, body) == expected
    assert sign(SECRET, 1700000001, body) != expected
    assert sign(SECRET, 1700000000, body + b" ") != expected
    assert sign(SECRET + "x", 1700000000, body) != expected


class FakeSender:
    """Answers each POST with the next status (or raises the next exception); records every call."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[CallbackURL, list[IPAddress], bytes, dict[str, str], float]] = []

    async def __call__(self, target: CallbackURL, addresses: Sequence[IPAddress], body: bytes,
                       headers: Mapping[str, str], timeout_s: float) -> int:
        self.calls.append((target, list(addresses), body, dict(headers), timeout_s))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def delivery_config(**more: object) -> CallbacksConfig:
    keys: dict[str, object] = {"allow": ["http://127.0.0.1:18720/hooks", "https://hooks.example.com/tts",
                                         "http://localhost:18722/"],
                               "secret": SECRET, "attempts": 4, "backoff_s": 0.5, "timeout_s": 3.0, **more}
    return callbacks_config(**keys)


PAYLOAD = {"task_id": "abc", "status": "succeeded", "reason": "déjà vu"}


async def test_a_delivered_callback_is_signed_json_sent_to_the_checked_addresses() -> None:
    send, sleeps = FakeSender(204), Sleeps()
    lookup = FakeLookup({"hooks.example.com": ["93.184.215.14"]})
    delivered = await deliver(delivery_config(), "https://hooks.example.com/tts/done?t=1", PAYLOAD, lookup=lookup,
                              send=send, clock=lambda: 1700000000.9, sleep=sleeps)
    assert delivered and sleeps.delays == []
    [(target, addresses, body, headers, timeout_s)] = send.calls
    assert str(target) == "https://hooks.example.com/tts/done?t=1" and addresses == [ip("93.184.215.14")]
    assert json.loads(body) == PAYLOAD and timeout_s == 3.0
    assert headers["Content-Type"] == "application/json" and headers[TIMESTAMP_HEADER] == "1700000000"
    mac = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == f"sha256={mac}"


async def test_a_redirect_is_a_failed_attempt_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    send, sleeps = FakeSender(307, 302, 500, 301), Sleeps()
    with caplog.at_level(logging.WARNING, logger="glmtts_sidecar.callbacks"):
        delivered = await deliver(delivery_config(), "http://127.0.0.1:18720/hooks?token=s3cret", PAYLOAD,
                                  label="task abc", lookup=FakeLookup(), send=send, sleep=sleeps)
    assert not delivered
    assert len(send.calls) == 4 and sleeps.delays == [0.5, 1.0, 2.0]
    assert "task abc: callback attempt 1 of 4 to http://127.0.0.1:18720/hooks failed (HTTP 307; redirects are " \
           "not followed)" in caplog.text
    assert "s3cret" not in caplog.text  # the query may carry a receiver's credentials


async def test_connection_errors_are_retried_until_an_answer() -> None:
    send, sleeps = FakeSender(aiohttp.ClientConnectionError("refused"), OSError("unreachable"), 200), Sleeps()
    assert await deliver(delivery_config(), "http://127.0.0.1:18720/hooks", PAYLOAD, lookup=FakeLookup(),
                         send=send, sleep=sleeps)
    assert len(send.calls) == 3 and sleeps.delays == [0.5, 1.0]


async def test_a_name_resolving_to_loopback_is_never_contacted(caplog: pytest.LogCaptureFixture) -> None:
    send, sleeps = FakeSender(), Sleeps()
    lookup = FakeLookup({"localhost": ["127.0.0.1"]})
    with caplog.at_level(logging.WARNING, logger="glmtts_sidecar.callbacks"):
        delivered = await deliver(delivery_config(attempts=2), "http://localhost:18722/x", PAYLOAD, lookup=lookup,
                                  send=send, sleep=sleeps)
    assert not delivered and send.calls == []
    assert lookup.asked == [("localhost", 18722)] * 2  # looked up again at each attempt
    assert "localhost resolves to 127.0.0.1 (loopback)" in caplog.text


@pytest.mark.parametrize("url", ["http://127.0.0.1:18720@127.0.0.1:18721/hooks", "http://127.0.0.1:18721/hooks",
                                 "http://127.0.0.1:18720/hooks/../admin/drain", "http://127.0.0.1:18720/hooksx"])
async def test_a_refused_url_gets_no_attempt(url: str) -> None:
    send, sleeps, lookup = FakeSender(), Sleeps(), FakeLookup()
    assert not await deliver(delivery_config(), url, PAYLOAD, lookup=lookup, send=send, sleep=sleeps)
    assert send.calls == [] and sleeps.delays == [] and lookup.asked == []


async def test_nothing_is_sent_without_allow_entries() -> None:
    send = FakeSender()
    assert not await deliver(callbacks_config(), "http://127.0.0.1:18720/hooks", PAYLOAD, lookup=FakeLookup(),
                             send=send, sleep=Sleeps())
    assert send.calls == []

