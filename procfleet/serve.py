"""Serving a WSGI app with waitress: bounded connections, a request deadline, a clean SIGTERM.

waitress's internals are used only through procfleet.waitress_adapter.
"""

from __future__ import annotations

import logging
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

from procfleet.waitress_adapter import WaitressServer, pause_reading

__all__ = ["connection_limit", "pause_reading", "raise_file_limit", "serve"]
from procfleet.webconfig import WebConfig

# Connections held at once (waitress's connection_limit counts the listening socket and its
# wake-up pipe too). Past it, new connections wait in the kernel's listen backlog until a slot
# frees, which the request deadline guarantees within HEAD_TIMEOUT seconds for clients that
# never finish a request. Capped at half the open-files limit so sockets cannot starve the
# files (/proc, exporter connections) the services need for their own work.
CONNECTION_LIMIT = 2000
# Seconds a connection may take to deliver a complete request (line, headers, any body),
# counted from its opening or from its first byte after the previous answer.
HEAD_TIMEOUT = 10.0
# Seconds an idle keep-alive connection (no request begun) is kept.
CHANNEL_TIMEOUT = 30
# Failed TLS handshakes (scanners, plain-HTTP clients, unknown client certificates) are
# logged as a count at most this often, not one line each.
TLS_FAILURE_LOG_SECONDS = 60.0


def raise_file_limit() -> None:
    """Lift the soft open-file limit to the hard one.

    The query service holds a socket per exporter connection and the exporter keeps /proc
    files of looked-up pids open; both need more than the usual soft 1024 under load.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def connection_limit() -> int:
    """CONNECTION_LIMIT, or half the open-files soft limit when that is lower."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return CONNECTION_LIMIT
    return max(16, min(CONNECTION_LIMIT, soft // 2))


def serve(
    app: Callable[..., Any],
    host: str,
    port: int,
    *,
    logger: logging.Logger,
    name: str,
    threads: int = 8,
    grace: float = 10.0,
    head_timeout: float = HEAD_TIMEOUT,
    web: WebConfig | None = None,
    pausable: bool = False,
    **adjustments: Any,
) -> None:
    """Serve `app` until SIGTERM or SIGINT, then finish the requests in flight and return.

    On the signal the listening sockets close (new connections are refused), answers being
    computed are completed and sent for up to `grace` seconds, and idle keep-alive
    connections are dropped. What a slow or greedy client can hold is bounded: request body
    and header sizes, the number of connections, `head_timeout` seconds to deliver a request
    and CHANNEL_TIMEOUT seconds of idle keep-alive.

    With a `web` configuration that has TLS, connections are TLS (procfleet.webconfig); the
    handshake counts against `head_timeout` like the request itself.
    """
    settings: dict[str, Any] = {
        "threads": threads,
        "channel_timeout": CHANNEL_TIMEOUT,
        "max_request_header_size": 16384,
        "max_request_body_size": 65536,
        "connection_limit": connection_limit(),
        "ident": name,
        "clear_untrusted_proxy_headers": True,
    }
    settings.update(adjustments)
    tls = web.tls if web is not None else None
    server = WaitressServer(
        app, host, port, head_timeout=head_timeout,
        tls=web.tls_context if web is not None else None,
        tls_allows=tls.san_allowed if tls is not None and tls.client_allowed_sans else None,
        pausable=pausable, **settings)
    stopping: list[str] = []

    def stop(signum: int, frame: object) -> None:
        # Only a flag: raising here could land inside a waitress handler and drop a channel.
        stopping.append(signal.Signals(signum).name)
        server.wake()  # end the poll now rather than at its timeout

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("%s listening on %s://%s:%s", name, web.scheme if web else "http",
                server.bound[0], server.bound[1])
    # Short enough that a deadline is enforced within a fraction of a second of passing.
    tick = min(0.5, head_timeout / 4)
    next_sweep = 0.0
    failures_logged, next_failure_log = 0, time.monotonic() + TLS_FAILURE_LOG_SECONDS
    while not stopping:
        server.poll(tick)
        now = time.monotonic()
        if now >= next_sweep:
            next_sweep = now + tick
            closed = server.sweep(now)
            if closed:
                logger.info("closed %d connection(s) that sent no complete request within "
                            "%g s", closed, head_timeout)
            if tls is not None and now >= next_failure_log:
                next_failure_log = now + TLS_FAILURE_LOG_SECONDS
                failures = server.handshake_failures()
                if failures > failures_logged:
                    logger.info("%d TLS handshake(s) failed in the last %g s (plain-HTTP "
                                "clients, unknown certificates; details at debug level)",
                                failures - failures_logged, TLS_FAILURE_LOG_SECONDS)
                    failures_logged = failures
    logger.info("received %s, finishing requests in flight", stopping[0])
    _drain(server, grace)
    logger.info("%s stopped", name)


def _drain(server: WaitressServer, grace: float) -> None:
    server.stop_accepting()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and server.busy():
        server.poll(0.05)
    server.close(worker_timeout=1)
