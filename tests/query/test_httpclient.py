"""The exporter client: its response parser fed in every piece size, and both transports
against a server that closes kept-alive connections behind the client's back."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from query.httpclient import (
    AsyncClient,
    BodyError,
    Disconnected,
    Origin,
    ProtocolError,
    Resolver,
    Response,
    SyncClient,
    _Reader,
    request_bytes,
)

BODY = b'{"pid": 4242, "name": "nginx"}'


def cap(limit: int = 1024):
    return lambda status: limit if status in (200, 404) else None


def parse(raw: bytes, step: int | None = None, limit: int = 1024, eof: bool = False
          ) -> tuple[Response, bool]:
    """Feed `raw` in pieces of `step` bytes (all at once when None); the answer and keep-alive."""
    reader = _Reader(cap(limit))
    step = step or len(raw)
    done = False
    for i in range(0, len(raw), step):
        assert not done, "bytes fed after the answer was complete"
        done = reader.feed(raw[i:i + step])
    if eof and not done:
        return reader.feed_eof(), False
    assert done
    assert reader.response is not None
    return reader.response, reader.keep_alive


def head(status: str = "200 OK", *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode()


CHUNKED = head("200 OK", "Transfer-Encoding: chunked") + (
    b"5;name=value\r\n" + BODY[:5] + b"\r\n" + f"{len(BODY) - 5:x}".encode() + b"\r\n"
    + BODY[5:] + b"\r\n0\r\nX-Trailer: yes\r\n\r\n")


@pytest.mark.parametrize("step", [None, 1, 2, 7, 64])
@pytest.mark.parametrize("raw", [
    head("200 OK", f"Content-Length: {len(BODY)}") + BODY,
    CHUNKED,
    head("100 Continue") + head("200 OK", f"Content-Length: {len(BODY)}") + BODY,
    head("200 OK", f"Content-Length: {len(gzip.compress(BODY))}", "Content-Encoding: gzip")
    + gzip.compress(BODY),
], ids=["length", "chunked", "continue", "gzip"])
def test_answer_in_any_pieces(raw: bytes, step: int | None) -> None:
    response, keep_alive = parse(raw, step)
    assert response == Response(200, BODY)
    assert keep_alive


@pytest.mark.parametrize("step", [None, 3])
def test_body_to_the_end_of_the_connection(step: int | None) -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY
    assert parse(raw, step, eof=True) == (Response(200, BODY), False)


def test_connection_close_is_not_kept() -> None:
    raw = head("200 OK", "Connection: close", f"Content-Length: {len(BODY)}") + BODY
    assert parse(raw) == (Response(200, BODY), False)


@pytest.mark.parametrize("raw, reusable", [
    (head("200 OK", "Content-Length: 2000") + b"x" * 10, False),
    (head("200 OK", "Transfer-Encoding: chunked") + b"400\r\n" + b"x" * 1024 + b"\r\n"
     + b"400\r\n" + b"x" * 10, False),
    # Read whole (small on the wire) before it is found too large decoded: reusable.
    (head("200 OK", f"Content-Length: {len(gzip.compress(b'x' * 5000))}",
          "Content-Encoding: gzip") + gzip.compress(b"x" * 5000), True),
], ids=["length", "chunked", "gzip"])
def test_body_past_the_cap(raw: bytes, reusable: bool) -> None:
    response, keep_alive = parse(raw)
    assert response.too_large and response.body == b""
    assert keep_alive == reusable


def test_status_without_a_wanted_body_is_not_read() -> None:
    response, keep_alive = parse(head("302 Found", "Location: /x", "Content-Length: 5"))
    assert response == Response(302) and not keep_alive


@pytest.mark.parametrize("raw, error", [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", ProtocolError),
    (head("200 OK", "Content-Length: -1"), ProtocolError),
    (head("200 OK", "Content-Length: 1", "Content-Length: 2"), ProtocolError),
    (head("200 OK", "no colon"), ProtocolError),
    (head("200 OK", "Transfer-Encoding: chunked") + b"zz\r\n", BodyError),
    (head("200 OK", "Transfer-Encoding: chunked") + b"2\r\nabcd\r\n", BodyError),
    (head("200 OK", "Content-Encoding: br", "Content-Length: 1") + b"x", BodyError),
    (head("200 OK", "Content-Encoding: gzip", "Content-Length: 3") + b"abc", BodyError),
])
def test_malformed_answers(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse(raw)


@pytest.mark.parametrize("raw, error", [
    (b"", Disconnected),
    (b"HTTP/1.1 200 OK\r\nContent-Le", ProtocolError),
    (head("200 OK", "Content-Length: 100") + b"{}", BodyError),
    (head("200 OK", "Transfer-Encoding: chunked") + b"5\r\nab", BodyError),
])
def test_connection_closed_early(raw: bytes, error: type[Exception]) -> None:
    reader = _Reader(cap())
    if raw:
        assert not reader.feed(raw)
    with pytest.raises(error):
        reader.feed_eof()


def test_request_head() -> None:
    origin = Origin.parse("http://10.0.0.1:9256")
    assert origin == Origin("http", "10.0.0.1", 9256, "10.0.0.1:9256")
    assert Origin.parse("https://[::1]/").host_header == "[::1]"
    assert Origin.parse("https://[::1]/").prefix == ""
    assert request_bytes(origin, "/process/1?a=b", {"Accept": "application/json"}) == (
        b"GET /process/1?a=b HTTP/1.1\r\nHost: 10.0.0.1:9256\r\nAccept: application/json"
        b"\r\n\r\n")


def test_a_base_url_path_prefixes_every_request() -> None:
    # docs/api.md#fan-out: the query service calls /process/{pid} on each exporter's base URL.
    origin = Origin.parse("http://gw.example:8000/hosts/web-01/")
    assert request_bytes(origin, "/process/7", {}) == (
        b"GET /hosts/web-01/process/7 HTTP/1.1\r\nHost: gw.example:8000\r\n\r\n")
    with pytest.raises(ValueError):
        request_bytes(origin, "/", {"Authorization": "Bearer x\r\nEvil: 1"})


# -- both transports against a real socket ------------------------------------------------

@pytest.fixture
def closing_server() -> Iterator[tuple[Origin, list[int]]]:
    """Answers each connection's first request, then closes it without saying so.

    A client that keeps the connection finds it closed on its next request and must retry
    on a new one. The list counts the connections accepted.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    accepted: list[int] = []
    answer = head("200 OK", f"Content-Length: {len(BODY)}") + BODY

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            accepted.append(1)
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                conn.sendall(answer)
                time.sleep(0.05)  # the client has put the connection back as idle

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield Origin.parse(f"http://127.0.0.1:{listener.getsockname()[1]}"), accepted
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_sync_client_retries_a_connection_closed_while_idle(closing_server) -> None:
    origin, accepted = closing_server
    client = SyncClient(Resolver(), lambda host, port, timeout: [])
    request = request_bytes(origin, "/process/4242", {})
    try:
        for _ in range(3):
            response = client.get(origin, request, time.monotonic() + 5, cap())
            assert response == Response(200, BODY)
            time.sleep(0.1)
    finally:
        client.close()
    assert len(accepted) == 3


def test_async_client_retries_a_connection_closed_while_idle(closing_server) -> None:
    origin, accepted = closing_server

    async def main() -> None:
        client = AsyncClient(Resolver())
        request = request_bytes(origin, "/process/4242", {})
        try:
            for _ in range(3):
                response = await asyncio.wait_for(client.get(origin, request, cap()), 5)
                assert response == Response(200, BODY)
                await asyncio.sleep(0.1)
        finally:
            client.close()
            await asyncio.sleep(0)

    asyncio.run(main())
    assert len(accepted) == 3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_a_bad_body(value: float) -> None:
    from query.fanout import BadBody, clean_process

    with pytest.raises(BadBody):
        clean_process({"pid": 1, "cpu_percent": value})
