"""Listen addresses: `HOST:PORT` parsing and the loopback test.

Standard library only, so configuration parsing and the command lines can use it without
loading a web server or framework.
"""

from __future__ import annotations

import ipaddress


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
