"""The hostile exporter fixture itself: modes chosen by the first path segment, bounded life."""

from __future__ import annotations

import socket

from hostile_exporter import MODES, HostileExporter

from procfleet.testing import wait_until


def ask(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        sock.settimeout(5)
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        return data


def test_the_first_segment_picks_the_mode(hostile_exporter: HostileExporter) -> None:
    assert {"hang", "drip", "garbage", "nested", "gzip-chunked", "gzip-close", "desync",
            "badstatus", "slowhead", "biglist"} <= MODES.keys()
    assert hostile_exporter.url("badstatus", "2000") == \
        f"http://127.0.0.1:{hostile_exporter.port}/badstatus/2000"
    assert ask(hostile_exporter.port, "/ok/process/7").endswith(b'{"pid": 7, "name": "genuine"}')
    assert ask(hostile_exporter.port, "/badstatus/2000/process/7").startswith(b"HTTP/1.1 2000 ")
    assert ask(hostile_exporter.port, "/no-such-mode/process/7").startswith(b"HTTP/1.1 404 ")


def test_stopping_closes_a_hung_connection() -> None:
    with HostileExporter(lifetime=30) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /hang/process/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: server.stats.requests.get("hang") == 1, what="the hung request")
    with sock:
        assert sock.recv(10) == b""  # closed by the server's stop, not left hanging
