"""procfleet.waitress_adapter: the waitress it was written for, and what it builds on it."""

from __future__ import annotations

import importlib.metadata
import socket
import time

import pytest
import waitress.utilities

from procfleet.waitress_adapter import (
    INTERNALS,
    SUPPORTED,
    Channel,
    WaitressServer,
    waitress_problems,
)
from procfleet.web import error_body


def test_installed_waitress_is_the_one_the_adapter_was_written_for():
    """Fails loudly on a waitress outside SUPPORTED or with a changed internal."""
    problems = waitress_problems()
    assert problems == [], "\n".join(
        [f"installed waitress {importlib.metadata.version('waitress')}:", *problems])


@pytest.mark.parametrize("version", ["2.1.2", "3.1.0", "4.0", "3.1.0rc1"])
def test_other_versions_are_reported(version):
    (problem,) = waitress_problems(version)
    assert version in problem and "supported range" in problem


@pytest.mark.parametrize("version", ["3.0.0", "3.0.2", "3.0.9.post1"])
def test_supported_versions_pass(version):
    low, high = SUPPORTED
    assert waitress_problems(version) == []


def test_every_internal_is_looked_up():
    """The checked list names callables with their parameters, not just modules."""
    names = {name for _, name, _ in INTERNALS}
    assert {"received", "parse_header", "channel_class", "loop", "execute"} <= names


def _app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def _serve_until(server: WaitressServer, done, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        server.poll(0.05)


def _exchange(server: WaitressServer, request: bytes) -> bytes:
    """Send `request`, run the server's loop here until the answer is complete."""
    with socket.create_connection(("127.0.0.1", server.bound[1]),
                                  timeout=5) as sock:
        sock.sendall(request)
        sock.setblocking(False)
        chunks: list[bytes] = []
        closed: list[bool] = []

        def answered() -> bool:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return False
            if not chunk:
                closed.append(True)
                return True
            chunks.append(chunk)
            return False

        _serve_until(server, answered)
        assert closed, "the server did not close the connection"
        return b"".join(chunks)


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:  # closed with bytes unread: also closed
        return True


@pytest.fixture
def server():
    built = WaitressServer(_app, "127.0.0.1", 0, head_timeout=1.0, threads=1)
    yield built
    built.close()


def test_the_server_listens_with_the_strict_channel(server):
    assert server.bound[1] > 0 and server.connections() == 0
    assert all(listener.channel_class is Channel for listener in server.listeners)
    assert server.map and not server.busy()


def test_content_length_with_transfer_encoding_is_a_json_400(server):
    reply = _exchange(server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400"
    assert b"Content-Type: application/json" in head
    assert body == (b'{"error": "bad request", "details": "a request must not carry both '
                    b'Content-Length and Transfer-Encoding", "code": 400}')


def test_errors_are_json_without_patching_waitress_for_everyone(server):
    reply = _exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert reply.split(b" ", 2)[1] == b"501"
    assert reply.endswith(b'"code": 501}')
    assert error_body(501, "x", "y").keys() <= {"error", "details", "code"}
    # waitress's class is as waitress wrote it: other servers in the process are unaffected.
    assert waitress.utilities.Error.to_response.__module__ == "waitress.utilities"


def test_sweep_closes_a_connection_that_owes_a_request_past_the_deadline(server):
    with socket.create_connection(("127.0.0.1", server.bound[1]), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        _serve_until(server, lambda: server.connections() == 1)
        opened = time.monotonic()
        assert server.sweep(opened) == 0  # within the deadline
        assert server.sweep(opened + 1.5) == 1  # past it
        _serve_until(server, lambda: server.connections() == 0)
        assert server.connections() == 0
        assert _closed_by_server(sock)


def test_blank_lines_do_not_reset_the_deadline(server):
    """CRLFs complete "empty" requests that waitress drops: they must not restart the clock."""
    with socket.create_connection(("127.0.0.1", server.bound[1]), timeout=5) as sock:
        _serve_until(server, lambda: server.connections() == 1)
        accepted = time.monotonic()
        time.sleep(0.3)
        for _ in range(3):
            sock.sendall(b"\r\n\r\n")
            server.poll(0.05)
        # Counted from the accept, not from the blank lines 0.3 s later.
        assert server.sweep(accepted + 1.05) == 1


def test_an_idle_connection_after_an_answer_owes_nothing(server):
    with socket.create_connection(("127.0.0.1", server.bound[1]), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.setblocking(False)
        got: list[bytes] = []

        def answered() -> bool:
            try:
                got.append(sock.recv(65536))
            except BlockingIOError:
                return False
            return b"ok" in b"".join(got)

        _serve_until(server, answered)
        _serve_until(server, lambda: not server.busy())
        assert server.sweep(time.monotonic() + 5) == 0  # channel_timeout's business
        assert server.connections() == 1


def test_waiting_connections_are_accepted_in_a_burst(server):
    """One pass of the loop takes in a backlog (waitress alone takes one per pass)."""
    clients = [socket.create_connection(("127.0.0.1", server.bound[1]), timeout=5)
               for _ in range(10)]
    try:
        server.poll(1.0)
        assert server.connections() == 10
    finally:
        for client in clients:
            client.close()
