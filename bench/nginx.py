"""nginx as the baseline proxy: `least_conn` over the same backends, configured in a temp directory.

The configuration is what an operator would put in front of GLM-TTS without a scheduler: one
upstream with least_conn and keepalive, timeouts long enough never to cut a request (the
backends' own timeouts answer first), no body size limit, no access log. It runs in the
foreground (`daemon off`) with its pid file, error log and temp paths inside the directory, and
is stopped by its own pid.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.procs import Proc, free_port, spawn

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
MISSING = "nginx not installed (no `nginx` on PATH or in /usr/sbin): arm skipped"


def nginx_binary() -> str | None:
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def nginx_conf(prefix: Path, port: int, upstreams: Sequence[str], *, workers: int = 1) -> str:
    """nginx.conf listening on 127.0.0.1:`port`, least_conn over `upstreams` (host:port)."""
    servers = "\n".join(f"        server {u} max_fails=0;" for u in upstreams)
    temp = "\n".join(f"    {kind}_temp_path {prefix / ('tmp-' + kind)};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temp}
    client_max_body_size 0;
    client_body_buffer_size 1m;
    keepalive_timeout 65s;
    keepalive_requests 100000;
    upstream glmtts {{
        least_conn;
{servers}
        keepalive 256;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://glmtts;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_connect_timeout 10s;
            proxy_send_timeout 3600s;
            proxy_read_timeout 3600s;
            proxy_next_upstream error;
            proxy_buffering on;
            proxy_buffers 64 64k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def start_nginx(prefix: Path, upstreams: Sequence[str], *, workers: int = 1) -> Proc:
    """Write the configuration under `prefix` and start nginx on a free loopback port.

    keepalive_timeout to the backends (4 s) stays under uvicorn's (and the emulator's) 5 s, so nginx
    never reuses a connection the backend is closing."""
    return launch(prefix, lambda port: nginx_conf(prefix, port, upstreams, workers=workers),
                  ready=lambda proc, port: proc.wait_http("/api/v1/health", timeout=30))


def launch(prefix: Path, render: Callable[[int], str], *, ready: Callable[[Proc, int], None],
           scheme: str = "http", **spawn_args: Any) -> Proc:
    """nginx with the configuration `render` writes for a free loopback port, in `prefix` (its
    nginx.conf, error log and temp paths), once `ready` returns; stopped again if it fails.
    FileNotFoundError without nginx."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError(MISSING)
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render(port))
    proc = spawn([binary, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")],
                 f"{scheme}://127.0.0.1:{port}", **spawn_args)
    try:
        ready(proc, port)
    except BaseException:
        proc.stop()
        raise
    return proc
