"""Helpers for the reliability tests: configs, API keys, raw requests, misbehaving exporters.

Servers and children are started with procfleet.testing (as users start them, on free
127.0.0.1 ports, always cleaned up); every loop here is bounded in count and in time.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from http.client import HTTPResponse

from procfleet.testing import QUERY, free_port, reap

# A fixed token for tests; only its SHA-256 goes into the exporter's config.
TOKEN = "reliability-test-token-Zq7u2Lw9"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()
ERROR_KEYS = {"error", "details", "code"}


def token_config(*, protect_metrics: bool = True) -> str:
    return (f"auth:\n  token_sha256: {TOKEN_SHA256}\n"
            f"  protect_metrics: {'true' if protect_metrics else 'false'}\n")


def new_api_key(name: str, *permissions: str) -> tuple[str, str]:
    """(key, config lines) from `procfleet-query keygen`, as an operator makes them."""
    argv = [QUERY, "keygen", "--name", name]
    for permission in permissions:
        argv += ["--permission", permission]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("#   "))
    entry = "\n".join("    " + line for line in out.splitlines() if not line.startswith("#"))
    return key, entry


def query_config(exporters: list[tuple[str, str]], *, key_entries: list[str] | None = None,
                 exporter_token: str | None = None, timeouts: tuple[float, float] = (2.0, 5.0),
                 log_level: str = "info", extra: str = "") -> str:
    """Query service YAML: static exporters (hostname, url), API keys (or auth off)."""
    lines = [f"log_level: {log_level}",
             f"timeouts: {{exporter: {timeouts[0]}, request: {timeouts[1]}}}"]
    if key_entries:
        lines += ["auth:", "  enabled: true", "  api_keys:", *key_entries]
    else:
        lines += ["auth:", "  enabled: false"]
    if exporter_token is not None:
        lines.append(f"exporter_token: {exporter_token}")
    lines.append("exporters:")
    lines += [f"  - {{hostname: {name}, url: \"{url}\"}}" for name, url in exporters]
    return "\n".join(lines) + "\n" + extra


def raw_request(port: int, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
                timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send one GET with exactly this request-target and these header lines; read the answer."""
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        response = HTTPResponse(sock)
        response.begin()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return whatever comes back until the server closes (or b"")."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may close before reading it all: that is a fine answer
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


def assert_error_body(status: int, headers: dict[str, str], body: bytes) -> dict:
    """The one error shape: JSON {error, details, code}, all set, code equal to the status."""
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = json.loads(body)
    assert doc.keys() == ERROR_KEYS, doc
    assert doc["code"] == status and doc["error"] and doc["details"], doc
    return doc


# -- misbehaving exporters ---------------------------------------------------------------------
#
# `python reliability_testing.py BEHAVIOUR=PORT ...` serves one misbehaving exporter per port
# (stdlib asyncio only, so what goes on the wire is exactly what is written here). It prints
# "ready" once every port listens. Behaviours:
#
#   hang       accepts, reads the request, never answers (keeps the connection open)
#   slow       answers a valid 404 after 30 s (far past any timeout)
#   trickle    sends the status line and headers, then one body byte every 0.5 s
#   html       200 with an HTML page
#   truncated  200 JSON whose Content-Length promises more than is sent, then closes
#   cut        200 JSON with a correct length but a cut-off document: {"pid": 1, "na
#   big        200 with a valid 2 MB JSON process object
#   redirect   302 to a real-looking exporter URL
#   drop       reads the request and closes the connection without a byte
#   reset      reads the request and resets the connection (RST)
#   garbage    answers bytes that are not HTTP

FAULTS = ("hang", "slow", "trickle", "html", "truncated", "cut", "big", "redirect", "drop",
          "reset", "garbage")


async def _fake_exporter(behaviour: str, reader, writer) -> None:  # pragma: no cover - subprocess
    import asyncio
    import struct

    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            if behaviour == "hang":
                await asyncio.sleep(3600)
            if behaviour == "slow":
                await asyncio.sleep(30)
            if behaviour in ("drop", "reset"):
                if behaviour == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                writer.close()
                return
            if behaviour == "garbage":
                writer.write(b"\x00\x01 this is not HTTP \xff\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            bodies = {
                "slow": (404, "application/json",
                         b'{"error": "process not found", "details": "x", "code": 404}'),
                "html": (200, "text/html", b"<html><body><h1>Welcome to nginx!</h1></body>"
                                           b"</html>"),
                "cut": (200, "application/json", b'{"pid": 1, "na'),
                "big": (200, "application/json",
                        b'{"pid": 1, "name": "big", "command": "' + b"a" * (2 * 1024 * 1024)
                        + b'"}'),
                "trickle": (200, "application/json", b'{"pid": 1, "name": "slowpoke"}'),
                "truncated": (200, "application/json", b'{"pid": 1, "name": "trunc'),
                "redirect": (302, "text/plain", b"moved"),
            }
            status, ctype, body = bodies[behaviour]
            length = len(body) + (500 if behaviour == "truncated" else 0)
            head = (f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {length}\r\n")
            if behaviour == "redirect":
                head += "Location: http://127.0.0.1:9/process/1\r\n"
            writer.write(head.encode() + b"\r\n")
            if behaviour == "trickle":
                for byte in body:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.5)
            else:
                writer.write(body)
            await writer.drain()
            if behaviour == "truncated":
                writer.close()
                return
    except (ConnectionError, OSError):
        return


def _serve_fakes(pairs: list[str]) -> None:  # pragma: no cover - runs in a subprocess
    import asyncio
    import functools

    async def main() -> None:
        servers = []
        for pair in pairs:
            behaviour, port = pair.split("=")
            handler = functools.partial(_fake_exporter, behaviour)
            servers.append(await asyncio.start_server(handler, "127.0.0.1", int(port)))
        print("ready", flush=True)
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main())


def start_fakes(behaviours: Sequence[str]) -> tuple[subprocess.Popen, dict[str, str]]:
    """Serve these misbehaving exporters from one process; returns it and behaviour -> URL."""
    ports = {b: free_port() for b in behaviours}
    proc = subprocess.Popen([sys.executable, __file__, *(f"{b}={p}" for b, p in ports.items())],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the process prints "ready" or exits
    proc.stdout.close()  # it prints nothing more
    if line.strip() != "ready":
        reap(proc)
        raise AssertionError(f"fake exporters did not start: {line!r}")
    return proc, {b: f"http://127.0.0.1:{p}" for b, p in ports.items()}


if __name__ == "__main__":  # pragma: no cover
    _serve_fakes(sys.argv[1:])
