"""Serving a WSGI app with waitress: listen-address parsing and a clean SIGTERM."""

from __future__ import annotations

import ipaddress
import json
import logging
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

import waitress
import waitress.utilities
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer

from procfleet.web import error_body


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


def _json_error(self: waitress.utilities.Error, ident: str | None = None
                ) -> tuple[str, list[tuple[str, str]], bytes]:
    """waitress's own error answers (431, 413, bad request line) in the one error shape."""
    body = json.dumps(error_body(self.code, self.reason.lower(), str(self.body) or self.reason))
    return (f"{self.code} {self.reason}", [("Content-Type", "application/json")],
            body.encode("utf-8"))


def serve(
    app: Callable[..., Any],
    host: str,
    port: int,
    *,
    logger: logging.Logger,
    name: str,
    threads: int = 8,
    grace: float = 10.0,
    **adjustments: Any,
) -> None:
    """Serve `app` until SIGTERM or SIGINT, then finish the requests in flight and return.

    On the signal the listening sockets close (new connections are refused), answers being
    computed are completed and sent for up to `grace` seconds, and idle keep-alive
    connections are dropped. The waitress settings bound what a slow or greedy client can
    hold: request body and header limits and a channel timeout.
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
    # Patched once, here at the boundary: waitress answers some errors before the app runs.
    waitress.utilities.Error.to_response = _json_error  # type: ignore[method-assign]
    server = waitress.create_server(app, host=host, port=port, **settings)
    socket_map = getattr(server, "map", None) or server._map  # Multi- or single-socket
    stopping: list[str] = []

    def stop(signum: int, frame: object) -> None:
        # Only a flag: raising here could land inside a waitress handler and drop a channel.
        stopping.append(signal.Signals(signum).name)
        if hasattr(server, "pull_trigger"):
            server.pull_trigger()  # wake the poll now rather than at its next timeout

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound = getattr(server, "effective_host", host), getattr(server, "effective_port", port)
    logger.info("%s listening on http://%s:%s", name, bound[0], bound[1])
    loop = server.asyncore
    while not stopping:
        loop.loop(timeout=server.adj.asyncore_loop_timeout, map=socket_map,
                  use_poll=server.adj.asyncore_use_poll, count=1)
    logger.info("received %s, finishing requests in flight", stopping[0])
    _drain(server, socket_map, grace)
    logger.info("%s stopped", name)


def _drain(server: Any, socket_map: dict[int, Any], grace: float) -> None:
    for channel in list(socket_map.values()):
        if isinstance(channel, BaseWSGIServer):
            wasyncore.dispatcher.close(channel)  # stop accepting; keep the others
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(
        isinstance(c, HTTPChannel) and (c.requests or c.total_outbufs_len)
        for c in list(socket_map.values())
    ):
        server.asyncore.loop(timeout=0.05, map=socket_map, use_poll=True, count=1)
    server.task_dispatcher.shutdown(timeout=1)
    wasyncore.close_all(socket_map)
