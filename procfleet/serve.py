"""Serving a WSGI app with waitress: listen-address parsing and a clean SIGTERM."""

from __future__ import annotations

import ipaddress
import logging
import resource
import signal
from collections.abc import Callable
from typing import Any

import waitress


class ListenError(ValueError):
    """A listen address that is not HOST:PORT."""


def parse_listen(text: str) -> tuple[str, int]:
    """Split `HOST:PORT` (or `[v6]:PORT`) into its parts, checking the port range."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ListenError(f"listen address must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ListenError(f"port must be 0 to 65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    """True when `host` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def serve(
    app: Callable[..., Any],
    host: str,
    port: int,
    *,
    logger: logging.Logger,
    name: str,
    threads: int = 8,
    **adjustments: Any,
) -> None:
    """Serve `app` until SIGTERM or SIGINT, then let in-flight requests finish and return.

    The waitress settings bound what a slow or greedy client can hold: a request body limit,
    header limit and channel timeout.
    """
    settings: dict[str, Any] = {
        "threads": threads,
        "channel_timeout": 30,
        "max_request_header_size": 16384,
        "max_request_body_size": 65536,
        "connection_limit": 1000,
        "ident": name,
        "clear_untrusted_proxy_headers": True,
    }
    settings.update(adjustments)
    server = waitress.create_server(app, host=host, port=port, **settings)

    def stop(signum: int, frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound = server.effective_host, server.effective_port  # type: ignore[union-attr]
    logger.info("%s listening on http://%s:%s", name, bound[0], bound[1])
    server.run()
    logger.info("%s stopped", name)
