"""Callback URLs and allow entries: parsing, matching and what kind of address a host is.

Pure (no I/O, no event loop), so that both the configuration (which checks the
``tasks.callbacks.allow`` entries at load) and scheduler.runtime.callbacks (which checks each
callback URL and the addresses its host resolves to) use the same rules; that module says why
they are what they are.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import idna

__all__ = [
    "MAX_URL_CHARS",
    "AddressKind",
    "CallbackURL",
    "CallbackURLError",
    "IPAddress",
    "allowed_target",
    "classify",
    "entry_problem",
    "matches",
    "parse_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_CHARS = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_URL_CHARS = _UNRESERVED | frozenset(":/?#[]@!$&'()*+,;=%")  # RFC 3986: everything else must be encoded
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMERIC_LABEL = re.compile(r"0[xX][0-9A-Fa-f]*|[0-9]+")  # a host ending in one is an IPv4 address
_HEX = frozenset(string.hexdigits)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix embeds an IPv4 address
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible addresses
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")  # deprecated; treated as unique-local
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_PRIVATE_V4 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                          "100.64.0.0/10"))  # RFC 1918 and shared (CGNAT)


class CallbackURLError(ValueError):
    """Why a URL cannot be a callback URL or an allow entry: a clause that follows the URL's name
    ("X-Callback-URL has user information ...")."""


class AddressKind(enum.Enum):
    GLOBAL = "global"  # reachable across the internet: the only kind a host name may resolve to
    LOOPBACK = "loopback"  # 127.0.0.0/8, ::1: the sidecar's own machine
    LINK_LOCAL = "link-local"  # 169.254.0.0/16 (cloud metadata services), fe80::/10
    PRIVATE = "private"  # 10/8, 172.16/12, 192.168/16, 100.64/10 (shared address space)
    UNIQUE_LOCAL = "unique-local"  # fc00::/7 and the deprecated site-local fec0::/10
    MULTICAST = "multicast"  # 224.0.0.0/4, ff00::/8
    UNSPECIFIED = "unspecified"  # 0.0.0.0, ::
    RESERVED = "reserved"  # every other special-purpose range (documentation, benchmarking, 240/4, ...)


@dataclass(frozen=True, kw_only=True)
class CallbackURL:
    """A parsed, normalised callback URL or allow entry."""

    scheme: str  # "http" or "https"
    host: str  # a lower-case ASCII host name, or the literal address (IPv6 without brackets)
    address: IPAddress | None  # the literal address, when the host is one
    port: int  # explicit, else the scheme's default
    path: str  # starts with "/"; unreserved characters decoded, other escapes upper-case
    query: str  # after "?", as given; "" when there is none

    def __str__(self) -> str:
        return self.origin() + self.path + (f"?{self.query}" if self.query else "")

    def origin(self) -> str:
        host = f"[{self.host}]" if isinstance(self.address, ipaddress.IPv6Address) else self.host
        port = "" if _DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}"

    def for_log(self) -> str:
        """The URL without its query, which may carry a receiver's credentials."""
        return self.origin() + self.path


# --- parsing and matching ------------------------------------------------------------------------


def parse_url(text: str, *, entry: bool = False) -> CallbackURL:
    """Parse a callback URL (``entry=False``) or an allow entry; CallbackURLError says what is wrong.

    An entry may spell its host name in Unicode (converted to IDNA) and may not have a query."""
    if len(text) > MAX_URL_CHARS:
        raise CallbackURLError(f"is longer than {MAX_URL_CHARS} characters")
    _check_characters(text, unicode_ok=entry)
    scheme_match = _SCHEME.match(text)
    if scheme_match is None or not text[scheme_match.end():].startswith("//"):
        raise CallbackURLError("must start with http:// or https://")
    scheme = scheme_match.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        raise CallbackURLError(f"uses the scheme {scheme!r}; only http and https are allowed")
    if "#" in text:
        raise CallbackURLError("has a fragment (#...), which is not allowed")
    rest = text[scheme_match.end() + 2:]
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, rest = rest[:end], rest[end:]
    if "@" in authority:
        raise CallbackURLError("has user information (user@host), which is not allowed")
    host, address, port = _parse_authority(authority, scheme, unicode_ok=entry)
    path, has_query, query = rest.partition("?")
    if not path.isascii() or not query.isascii():
        raise CallbackURLError("has a non-ASCII character outside the host name")
    if "[" in rest or "]" in rest:
        raise CallbackURLError("has '[' or ']' outside a bracketed IPv6 host")
    if entry and has_query:
        raise CallbackURLError("has a query; an entry is scheme://host[:port][/path]")
    _check_escapes(query)
    return CallbackURL(scheme=scheme, host=host, address=address, port=port, path=_normalise_path(path),
                       query=query)


def matches(entry: CallbackURL, url: CallbackURL) -> bool:
    """Whether `url` falls under the allow `entry`: same scheme, host and port, path under its path."""
    if (entry.scheme, entry.host, entry.address, entry.port) != (url.scheme, url.host, url.address, url.port):
        return False
    prefix = entry.path.rstrip("/")
    return url.path == prefix or url.path.startswith(prefix + "/")


def allowed_target(allow: Sequence[str], url: str) -> CallbackURL:
    """`url` parsed, when it falls under one of the `allow` entries; else CallbackURLError."""
    target = parse_url(url)
    if not any(matches(parse_url(entry, entry=True), target) for entry in allow):
        raise CallbackURLError("is not under any entry of tasks.callbacks.allow")
    return target


def entry_problem(entry: str) -> str | None:
    """Why `entry` cannot be an allow entry, or None."""
    try:
        parsed = parse_url(entry, entry=True)
    except CallbackURLError as exc:
        return str(exc)
    if parsed.address is not None and (kind := classify(parsed.address)) in (AddressKind.UNSPECIFIED,
                                                                             AddressKind.MULTICAST):
        return f"names the {kind.value} address {parsed.host}, which cannot receive a callback"
    return None


def _check_characters(text: str, *, unicode_ok: bool) -> None:
    for char in text:
        if char in _URL_CHARS:
            continue
        if char.isspace():
            raise CallbackURLError("contains whitespace")
        if ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F:
            raise CallbackURLError("contains a control character")
        if char == "\\":
            raise CallbackURLError("contains a backslash")
        if not char.isascii():
            if unicode_ok and char.isprintable():
                continue  # only a host name may hold it; parse_url checks where it is
            raise CallbackURLError("contains a non-ASCII character (write an internationalised host name in "
                                   "its xn-- form)")
        raise CallbackURLError(f"contains {char!r}, which a URL may only carry percent-encoded")


def _parse_authority(authority: str, scheme: str, *, unicode_ok: bool) -> tuple[str, IPAddress | None, int]:
    address: IPAddress | None
    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise CallbackURLError("has an unclosed '[' in its host")
        if "%" in inside:
            raise CallbackURLError("has an IPv6 zone identifier, which is not allowed")
        try:
            address = ipaddress.IPv6Address(inside)
        except ValueError:
            raise CallbackURLError("has an invalid IPv6 address in brackets") from None
        if after and not after.startswith(":"):
            raise CallbackURLError("has characters after the bracketed IPv6 address")
        host, colon, port_text = str(address), after[:1], after[1:]
    else:
        if authority.count(":") > 1:
            raise CallbackURLError("has an IPv6 address without brackets, or more than one port")
        name, colon, port_text = authority.partition(":")
        host, address = _parse_host(name, unicode_ok=unicode_ok)
    if not colon:
        return host, address, _DEFAULT_PORTS[scheme]
    if not port_text:
        raise CallbackURLError("has an empty port after ':'")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) <= 65535):
        raise CallbackURLError("has an invalid port (1 to 65535)")
    return host, address, int(port_text)


def _parse_host(host: str, *, unicode_ok: bool) -> tuple[str, IPAddress | None]:
    if not host:
        raise CallbackURLError("has no host")
    if not host.isascii():
        if not unicode_ok:  # _check_characters refused it already; kept for a direct call
            raise CallbackURLError("has a non-ASCII host name (write it in its xn-- form)")
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise CallbackURLError(f"has a host name that is not valid IDNA ({exc})") from None
    host = host.lower()
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # Resolvers read 2130706433, 0x7f.1, 127.1 and 0177.0.0.1 as 127.0.0.1: only the canonical
        # dotted quad is an address here, so what is matched is what is connected to.
        if len(labels) != 4 or not all(label.isdigit() and str(int(label)) == label and int(label) <= 255
                                       for label in labels):
            raise CallbackURLError("has a numeric host that is not a canonical dotted-quad IPv4 address "
                                   "(forms like 2130706433, 0x7f.1 or 0177.0.0.1 are refused)")
        return host, ipaddress.IPv4Address(host)
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise CallbackURLError("has an invalid host name (dot-separated labels of letters, digits and inner "
                               "hyphens, at most 63 characters each, no trailing dot)")
    for label in labels:
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise CallbackURLError(f"has an invalid IDNA label {label!r} in its host name") from None
    return host, None


def _check_escapes(text: str) -> None:
    for i, char in enumerate(text):
        if char == "%" and not (len(text) >= i + 3 and text[i + 1] in _HEX and text[i + 2] in _HEX):
            raise CallbackURLError("has a malformed percent-escape ('%' must be followed by two hex digits)")


def _normalise_path(path: str) -> str:
    if not path:
        return "/"
    segments = path.split("/")[1:]  # path starts with "/": the authority ended there
    last = len(segments) - 1
    normalised = []
    for i, segment in enumerate(segments):
        segment = _normalise_segment(segment)
        if segment.split(";")[0] in (".", ".."):  # "..;" too: some servers drop path parameters first
            raise CallbackURLError("has a dot segment ('.' or '..') in its path")
        if not segment and i != last:
            raise CallbackURLError("has an empty segment ('//') in its path")
        normalised.append(segment)
    return "/" + "/".join(normalised)


def _normalise_segment(segment: str) -> str:
    """Unreserved characters decoded, other escapes upper-case; refuses encoded separators."""
    _check_escapes(segment)
    parts = segment.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        code = int(part[:2], 16)
        char = chr(code)
        if char in "/\\":
            raise CallbackURLError("has a percent-encoded slash or backslash in its path")
        if code < 0x20 or code == 0x7F:
            raise CallbackURLError("has a percent-encoded control character in its path")
        out.append((char if char in _UNRESERVED else f"%{part[:2].upper()}") + part[2:])
    return "".join(out)


# --- addresses -----------------------------------------------------------------------------------


def classify(address: IPAddress) -> AddressKind:
    """What kind of address this is; an IPv6 address embedding an IPv4 one (mapped, NAT64, 6to4) is
    that IPv4 address's kind."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return classify(embedded)
        if address.scope_id is not None:
            return AddressKind.LINK_LOCAL if address.is_link_local else AddressKind.RESERVED
    if address.is_unspecified:
        return AddressKind.UNSPECIFIED
    if address.is_loopback:
        return AddressKind.LOOPBACK
    if address.is_multicast:
        return AddressKind.MULTICAST
    if address.is_link_local:
        return AddressKind.LINK_LOCAL
    if isinstance(address, ipaddress.IPv6Address):
        if address in _UNIQUE_LOCAL or address in _SITE_LOCAL:
            return AddressKind.UNIQUE_LOCAL
        if address in _IPV4_COMPATIBLE:
            return AddressKind.RESERVED
    elif any(address in network for network in _PRIVATE_V4):
        return AddressKind.PRIVATE
    return AddressKind.GLOBAL if address.is_global else AddressKind.RESERVED
