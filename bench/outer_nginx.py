"""The outer nginx of docs/scale-out.md, run from the committed config/nginx-outer.conf.

Tests and benchmarks run that very file: `render_outer` replaces only its marked blocks
("# >>> glmtts:NAME" .. "# <<< glmtts:NAME") -- the process settings (foreground, two workers,
pid and logs in a temp directory), the listen address and certificate, the sidecars -- and keeps
everything else as an operator gets it: least_conn, passive health, failover, limit_req, timeouts, headers. nginx
runs in the foreground in its own process group and is stopped by its pid (bench.procs.Proc).
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.nginx import launch
from bench.procs import ROOT, Proc

OUTER_CONF = ROOT / "config" / "nginx-outer.conf"
BLOCKS = ("process", "logs", "rate", "sidecars", "redirect", "listen", "burst")
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_outer(*, prefix: Path, port: int, sidecars: Sequence[str], cert: Path | None, key: Path | None,
                 rate_per_s: float | None = None, burst: int | None = None) -> str:
    """config/nginx-outer.conf made runnable here: nginx in the
    foreground with its pid, logs and temp files under `prefix`, listening on 127.0.0.1:`port` --
    HTTPS with `cert` and `key`, plain HTTP when both are None -- in front of `sidecars`
    (host:port each) with the committed server parameters (max_fails, fail_timeout).
    ``rate_per_s``/``burst``: the per-address limit_req instead of the committed one. The port-80
    redirect server is left out. ValueError when a marked block is missing."""
    if (cert is None) != (key is None):
        raise ValueError("give both cert and key (HTTPS) or neither (plain HTTP)")
    if not sidecars:
        raise ValueError("at least one sidecar")
    text = OUTER_CONF.read_text()
    blocks: dict[str, Callable[[str], str]] = {
        "process": lambda _: "\n".join([
            "daemon off;",
            f"pid {prefix / 'nginx.pid'};",
            f"error_log {prefix / 'error.log'} warn;",
            "worker_processes 2;  # more than one: the workers share the upstream zone, as in production",
        ]),
        "logs": lambda _: "\n".join([
            f"access_log {prefix / 'access.log'} glmtts;",
            *(f"{kind}_temp_path {prefix / ('tmp-' + kind)};" for kind in _TEMP_KINDS),
        ]),
        "rate": lambda body: body if rate_per_s is None else _set_rate(body, rate_per_s),
        "sidecars": lambda body: _servers(body, sidecars),
        "redirect": lambda _: "# (the port-80 redirect is left out here)",
        "listen": lambda _: _listen(port, cert, key),
        "burst": lambda body: body if burst is None else _replace_once(body, r"burst=\d+", f"burst={int(burst)}"),
    }
    for name, make in blocks.items():
        text = _replace_block(text, name, make)
    return text


def _replace_block(text: str, name: str, make: Callable[[str], str]) -> str:
    """`text` with the lines between the markers of block `name` replaced by make(those lines),
    indented as the opening marker is; the markers stay."""
    pattern = re.compile(rf"^([ \t]*)# >>> glmtts:{name}\n(.*?)^[ \t]*# <<< glmtts:{name}\n", re.M | re.S)
    found = pattern.search(text)
    if found is None:
        raise ValueError(f"config/nginx-outer.conf has no marked block {name!r}")
    indent, body = found[1], found[2]
    lines = [indent + line if line else line for line in make(body).strip("\n").splitlines()]
    new = f"{indent}# >>> glmtts:{name}\n" + "\n".join(lines) + f"\n{indent}# <<< glmtts:{name}\n"
    return text[:found.start()] + new + text[found.end():]


def _replace_once(body: str, pattern: str, value: str) -> str:
    new, count = re.subn(pattern, value, body, count=1)
    if count != 1:
        raise ValueError(f"no {pattern!r} in the marked block:\n{body}")
    return new.strip()


def _set_rate(body: str, per_s: float) -> str:
    """limit_req_zone's rate: nginx takes whole requests per second or per minute."""
    if per_s <= 0:
        raise ValueError("rate_per_s must be > 0")
    rate = f"{int(per_s)}r/s" if float(per_s).is_integer() else f"{max(1, round(per_s * 60))}r/m"
    return _replace_once(body, r"rate=\d+r/[sm]", f"rate={rate}")


def _servers(body: str, sidecars: Sequence[str]) -> str:
    """One ``server`` line per sidecar, with the parameters of the committed ones."""
    found = re.search(r"^\s*server\s+\S+((?:\s+[^;\s]+)*)\s*;", body, re.M)
    if found is None:
        raise ValueError(f"no server line in the sidecars block:\n{body}")
    return "\n".join(f"server {address}{found[1]};" for address in sidecars)


def _listen(port: int, cert: Path | None, key: Path | None) -> str:
    if cert is None or key is None:
        return f"listen 127.0.0.1:{port};"
    return "\n".join([f"listen 127.0.0.1:{port} ssl;", f"ssl_certificate {cert};", f"ssl_certificate_key {key};"])


def start_outer(prefix: Path, sidecars: Sequence[str], *, cert: Path | None = None, key: Path | None = None,
                rate_per_s: float | None = None, burst: int | None = None, timeout: float = 30.0) -> Proc:
    """nginx on a free loopback port with the rendered outer config (written to
    `prefix`/nginx.conf), once it accepts connections; its url is https:// with a certificate,
    else http://. FileNotFoundError without nginx; ProcessFailed (with its output) if it exits."""
    def render(port: int) -> str:
        return render_outer(prefix=prefix, port=port, sidecars=sidecars, cert=cert, key=key,
                            rate_per_s=rate_per_s, burst=burst)

    return launch(prefix, render, ready=lambda proc, port: _wait_listening(proc, port, timeout),
                  scheme="https" if cert is not None else "http", keep_log=True, log_prefix="glmtts-nginx-")


def _wait_listening(proc: Proc, port: int, timeout: float) -> None:
    def accepts() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True

    proc.wait_ready(accepts, f"accepting on port {port}", timeout)


def self_signed(directory: Path, *, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `name` (an IP address or a host name; localhost and
    127.0.0.1 are always in it) and its key, made with the openssl CLI: (cert, key). The
    certificate is its own CA: a client verifies against it with cafile=cert."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "outer.crt", directory / "outer.key"
    kind = "IP" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", name) else "DNS"
    names = dict.fromkeys([f"{kind}:{name}", "IP:127.0.0.1", "DNS:localhost"])
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName={','.join(names)}"],
        check=True, capture_output=True, timeout=30)
    key.chmod(0o600)
    return cert, key
