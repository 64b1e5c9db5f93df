"""``glmtts-sidecar``: run the sidecar, or check and print its configuration."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import sys
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from glmtts import __version__
from glmtts.loop import new_event_loop
from scheduler.config import ConfigError, SidecarConfig, default_config_path, default_config_text, load_config
from scheduler.logs import setup_logging

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmtts-sidecar",
        description="Length-aware admission, fair queueing and deadlines in front of GLM-TTS backends.",
        epilog="Exit status: 0 clean stop, 1 runtime failure (e.g. the port is taken), 2 bad configuration.",
    )
    p.add_argument("--config", "-c", metavar="FILE",
                   help=f"YAML configuration (default: the packaged {default_config_path().name})")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--print-default-config", action="store_true", help="print the default configuration")
    p.add_argument("--allow-python-parser", action="store_true",
                   help="serve even when aiohttp's C HTTP parser is not in use (not for production)")
    p.add_argument("--version", action="version", version=f"glmtts-sidecar {__version__}")
    return p


def http_parser_in_use() -> str:
    """Which HTTP request parser aiohttp's server uses: "C" (llhttp) or "Python"."""
    from aiohttp import http_parser, web_protocol

    c_parser = getattr(http_parser, "HttpRequestParserC", None)
    return "C" if c_parser is not None and vars(web_protocol).get("HttpRequestParser") is c_parser else "Python"


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (before, after). Every client connection
    holds a descriptor, and a shell's usual soft limit (1024) is what a few hundred slow clients take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's default fs.nr_open
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_default_config:
        sys.stdout.write(default_config_text())
        return EXIT_OK
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"glmtts-sidecar: cannot read {args.config}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        backends = config.backends.layout()
        print(f"configuration OK: listen {config.listen.host}:{config.listen.port}, "
              f"{len(backends)} backend(s): {', '.join(b.id + '=' + b.url for b in backends)}")
        return EXIT_OK
    setup_logging(config.logging)
    log = logging.getLogger("glmtts_sidecar")
    if config.admin.allow_anonymous and not config.listen.loopback:
        log.warning("admin endpoints (prompt writes, clear_cache, /admin/*) are open to anyone who can reach "
                    "%s:%d: admin.allow_anonymous is true and no admin.token is set", config.listen.host,
                    config.listen.port)
    parser = http_parser_in_use()
    if parser != "C":
        why = ("AIOHTTP_NO_EXTENSIONS is set" if os.environ.get("AIOHTTP_NO_EXTENSIONS")
               else "its C extension is not installed")
        if not args.allow_python_parser:
            log.error("refusing to start: aiohttp's C HTTP parser is not in use (%s); the pure-Python parser "
                      "is slower and more lenient with malformed requests. Fix the installation or unset "
                      "AIOHTTP_NO_EXTENSIONS, or pass --allow-python-parser to serve anyway", why)
            return EXIT_RUNTIME
        log.warning("serving with aiohttp's pure-Python HTTP parser (%s; --allow-python-parser)", why)
    else:
        log.info("HTTP parser: aiohttp's C parser (llhttp)")
    was, now = raise_open_files_limit()
    if now != was:
        log.info("open files: soft limit raised from %d to %d (the hard limit)", was, now)
    from scheduler.http.app import build_app
    from scheduler.runtime.sdnotify import Notifier, ServiceStatus

    # unset: the backends inherit our environment and must not talk to systemd as us.
    systemd = ServiceStatus(Notifier.from_environ(unset=True))
    app = build_app(config, config_path=args.config, install_signals=True, systemd=systemd)

    def listening() -> None:  # once the listener accepts connections
        logging.getLogger("glmtts_sidecar").info("listening on http://%s:%d", config.listen.host,
                                                 config.listen.port)
        systemd.listening()

    try:
        run(app, config, listening)
    except OSError as exc:
        logging.getLogger("glmtts_sidecar").error("cannot serve on %s:%d: %s", config.listen.host,
                                                  config.listen.port, exc)
        return EXIT_RUNTIME
    return EXIT_OK


def run(app: web.Application, config: SidecarConfig, listening: Callable[[], None]) -> None:
    """Serve `app` until a drain (or a failed start) ends it: what web.run_app does, except that the
    listening site stays ours, for a drain to close (scheduler.runtime.control.register_listener)
    while the handlers of open connections go on. A finished drain raises web.GracefulExit out of
    the loop; the runner's cleanup then waits for running handlers and runs the app's cleanup."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, config, listening))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _serve(app: web.Application, config: SidecarConfig, listening: Callable[[], None]) -> None:
    from scheduler.http.app import RUNTIME
    from scheduler.runtime.control import register_listener

    # Our own signal handlers drain first (scheduler.runtime.control); aiohttp's would stop at once.
    # drain_timeout_s is also the runner's wait for running handlers at stop.
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.shutdown.drain_timeout_s,
                           handler_cancellation=True, keepalive_timeout=config.limits.idle_timeout_s,
                           access_log=None)
    await runner.setup()  # the app's startup: backends, task store
    try:
        site = web.TCPSite(runner, config.listen.host, config.listen.port)
        await site.start()

        async def stop_listening() -> None:
            # BaseSite.stop closes the listening socket only: connections already accepted, and
            # the handlers on them, go on. A proxy in front (nginx's upstream keepalive) must not
            # go on sending new requests over connections it keeps open: those close too.
            if site in runner.sites:
                await site.stop()
            for connection in runner.server.connections if runner.server is not None else ():
                _close_after_answer(connection)

        register_listener(app[RUNTIME], stop_listening)
        listening()
        await asyncio.Event().wait()  # until a drain's GracefulExit leaves the loop
    finally:
        await runner.cleanup()


def _close_after_answer(connection: RequestHandler) -> None:
    """Close a connection now when it waits for its next request (the test aiohttp's own keep-alive
    timeout makes: the future its loop awaits between requests is pending), else once the answer
    in progress is written. aiohttp's pre_shutdown is no substitute before its shutdown: an idle
    connection it closes stops reading but stays open, and a request sent on it would hang."""
    waiter = connection._waiter
    if waiter is not None and not waiter.done():
        connection.force_close()
    else:
        connection.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still running on `loop` and let it end, as asyncio.run does at exit."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during shutdown",
                                         "exception": task.exception(), "task": task})


if __name__ == "__main__":
    sys.exit(main())
