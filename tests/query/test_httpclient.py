"""The exporter client: its response parser fed in every piece size, and both transports
against a server that closes kept-alive connections behind the client's back."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from procfleet.testing import wait_until
from query.httpclient import (
    AsyncClient,
    BodyError,
    Disconnected,
    Origin,
    Pool,
    ProtocolError,
    ResolveError,
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
    head("100 Continue") + head("103 Early Hints", "Link: </a>")
    + head("200 OK", f"Content-Length: {len(BODY)}", "Content-Encoding: identity") + BODY,
    head("200", f"Content-Length: {len(BODY)}", "X-Empty:", "X-Spaced:  a b  ") + BODY,
    head("200 OK", f"Content-Length: {len(BODY)}", f"Content-Length: {len(BODY)}") + BODY,
], ids=["length", "chunked", "continue", "interims", "no-reason", "same-length-twice"])
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
], ids=["length", "chunked"])
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
        b"GET /process/1?a=b HTTP/1.1\r\nHost: 10.0.0.1:9256\r\nAccept-Encoding: identity"
        b"\r\nAccept: application/json\r\n\r\n")


def test_a_base_url_path_prefixes_every_request() -> None:
    # docs/api.md#fan-out: the query service calls /process/{pid} on each exporter's base URL.
    origin = Origin.parse("http://gw.example:8000/hosts/web-01/")
    assert request_bytes(origin, "/process/7", {}) == (
        b"GET /hosts/web-01/process/7 HTTP/1.1\r\nHost: gw.example:8000\r\n"
        b"Accept-Encoding: identity\r\n\r\n")
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


# -- strict HTTP/1.1 (h11's grammar): a lenient parser lets a hostile exporter pick framing --

LENGTH = f"Content-Length: {len(BODY)}"


@pytest.mark.parametrize("raw, error", [
    (b"HTTP/1.1 2000 OK\r\n" + LENGTH.encode() + b"\r\n\r\n" + BODY, ProtocolError),
    (b"HTTP/1.1 20 OK\r\n" + LENGTH.encode() + b"\r\n\r\n" + BODY, ProtocolError),
    (b"HTTP/2.0 200 OK\r\n" + LENGTH.encode() + b"\r\n\r\n" + BODY, ProtocolError),
    (b"HTTP/1.1  200 OK\r\n\r\n", ProtocolError),
    (head("200 OK", "X-Note: a", " " + LENGTH) + BODY, ProtocolError),  # obs-fold
    (head("200 OK", "X-Note: a", "\t" + LENGTH) + BODY, ProtocolError),
    (head("200 OK", "Content-Length : 10") + BODY, ProtocolError),
    (head("200 OK", "Content Length: 10") + BODY, ProtocolError),
    (head("200 OK", "Transfer-Encoding: chunked", LENGTH) + BODY, ProtocolError),
    (head("200 OK", "Transfer-Encoding: gzip, chunked"), ProtocolError),
    (head("200 OK", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), ProtocolError),
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ProtocolError),
    (head("200 OK", "X-Note: a\rb", LENGTH) + BODY, ProtocolError),  # bare CR
    (head("200 OK", "X-Note: a\x00b", LENGTH) + BODY, ProtocolError),
    (b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\n{}", ProtocolError),  # bare LF
    (head("200 OK", "Content-Length: 1" + "0" * 18), ProtocolError),
    (head("200 OK", "Content-Length: +5") + b"12345", ProtocolError),
    (head("101 Switching Protocols", "Upgrade: websocket"), ProtocolError),
    (head("100 Continue") * 9 + head("200 OK", LENGTH) + BODY, ProtocolError),
    # The client never asks for an encoding: refused at the head, before any body is read.
    (head("200 OK", "Content-Encoding: gzip", "Content-Length: 3") + b"abc", BodyError),
    (head("200 OK", "Content-Encoding: br", "Transfer-Encoding: chunked"), BodyError),
], ids=["status-2000", "status-20", "version-2", "double-space", "obs-fold-sp", "obs-fold-tab",
        "space-before-colon", "space-in-name", "te-and-cl", "te-not-chunked", "te-twice",
        "http10-chunked", "bare-cr", "nul", "bare-lf", "huge-length", "signed-length",
        "upgrade", "endless-interims", "gzip", "br"])
def test_strict_grammar(raw: bytes, error: type[Exception]) -> None:
    for step in (None, 1):
        with pytest.raises(error):
            parse(raw, step)


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_204_and_304_have_no_body_whatever_the_headers_say(status: str) -> None:
    response, keep_alive = parse(head(status, "Location: /elsewhere", "Content-Length: 10"))
    assert response == Response(int(status[:3])) and keep_alive


def test_a_304_is_not_reported_as_a_redirect() -> None:
    from query.fanout import classify, process_call

    result = classify("web-01", process_call(7), Response(304))
    assert result.kind == "bad_status" and "redirect" not in (result.error or "")


@pytest.mark.parametrize("raw", [
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n" + LENGTH.encode() + b"\r\n\r\n" + BODY,
    head("200 OK", "Connection: Keep-Alive, Close", LENGTH) + BODY,
    head("200 OK", LENGTH) + BODY + b"HTTP/1.1 200 OK\r\n",  # bytes past the answer
], ids=["http10", "close-token", "extra-bytes"])
def test_answers_that_end_the_connection(raw: bytes) -> None:
    assert parse(raw) == (Response(200, BODY), False)


def test_a_connection_token_containing_close_does_not_close() -> None:
    assert parse(head("200 OK", "Connection: not-closed", LENGTH) + BODY)[1]


def test_a_head_fed_a_byte_at_a_time_is_bounded() -> None:
    pad = "X-Pad: " + "a" * 1000
    small = head("200 OK", *[pad] * 60, LENGTH) + BODY  # 60 KiB: under the bound
    assert parse(small, 1) == (Response(200, BODY), True)
    reader = _Reader(cap())
    with pytest.raises(ProtocolError, match="head larger"):
        for byte in head("200 OK", *[pad] * 70, LENGTH):
            reader.feed(bytes([byte]))


def test_chunk_framing_is_bounded() -> None:
    with pytest.raises(BodyError):
        parse(head("200 OK", "Transfer-Encoding: chunked") + b"1" + b" " * 9000 + b"\r\n", 1)
    with pytest.raises(BodyError, match="trailers"):
        parse(head("200 OK", "Transfer-Encoding: chunked") + b"0\r\nX: " + b"a" * 9000, 7)


# -- both transports against the hostile exporter -----------------------------------------

def sync_client(**pool: Any) -> SyncClient:
    return SyncClient(Resolver(), lambda host, port, timeout: [], **pool)


def sync_get(client: SyncClient, url: str, pid: int, limit: int = 1024) -> Response:
    origin = Origin.parse(url)
    return client.get(origin, request_bytes(origin, f"/process/{pid}", {}),
                      time.monotonic() + 5, cap(limit))


async def async_get(client: AsyncClient, url: str, pid: int) -> Response:
    origin = Origin.parse(url)
    return await asyncio.wait_for(
        client.get(origin, request_bytes(origin, f"/process/{pid}", {}), cap()), 5)


def genuine(pid: int) -> Response:
    return Response(200, b'{"pid": %d, "name": "genuine"}' % pid)


@pytest.mark.parametrize("mode", ["desync", "desync-same"])
def test_sync_client_never_serves_bytes_sent_after_an_answer(hostile_exporter, mode) -> None:
    client = sync_client()
    try:
        assert sync_get(client, hostile_exporter.url(mode), 100) == genuine(100)
        time.sleep(0.2)  # the injected response arrives while the connection is idle
        assert sync_get(client, hostile_exporter.url(mode), 100) == genuine(100)
    finally:
        client.close()
    assert hostile_exporter.stats.connections == 2  # the tainted connection was dropped


@pytest.mark.parametrize("mode", ["desync", "desync-same"])
def test_async_client_never_serves_bytes_sent_after_an_answer(hostile_exporter, mode) -> None:
    async def main() -> list[Response]:
        client = AsyncClient(Resolver())
        try:
            first = await async_get(client, hostile_exporter.url(mode), 100)
            # Block the loop: the injected bytes wait in the socket, not yet seen by the
            # connection's data_received, when the connection is taken for reuse.
            time.sleep(0.2)
            return [first, await async_get(client, hostile_exporter.url(mode), 100)]
        finally:
            client.close()
            await asyncio.sleep(0)

    assert asyncio.run(main()) == [genuine(100), genuine(100)]
    assert hostile_exporter.stats.connections == 2


@pytest.mark.parametrize("variant", ["2000", "20", "version", "obsfold", "spacecolon", "te-cl",
                                     "http10-chunked", "barecr", "nul"])
def test_bad_heads_from_a_real_socket_are_protocol_errors(hostile_exporter, variant) -> None:
    client = sync_client()
    try:
        with pytest.raises(ProtocolError):
            sync_get(client, hostile_exporter.url("badstatus", variant), 1)
        assert not len(client.pool)
    finally:
        client.close()


def test_a_304_keeps_the_connection(hostile_exporter) -> None:
    client = sync_client()
    try:
        for _ in range(2):
            assert sync_get(client, hostile_exporter.url("badstatus", "304"), 1) == \
                Response(304)
    finally:
        client.close()
    assert hostile_exporter.stats.connections == 1


def test_a_head_dripped_a_byte_at_a_time(hostile_exporter) -> None:
    client = sync_client()
    try:
        assert sync_get(client, hostile_exporter.url("slowhead", "20000"), 9) == genuine(9)
    finally:
        client.close()


GZIP_PEAK = r"""
import asyncio, json, sys, time
from query.httpclient import AsyncClient, Origin, Resolver, SyncClient, request_bytes

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def cap(status):
    return 1024 * 1024

outcomes = []
before = hwm_kib()
sync = SyncClient(Resolver(), lambda host, port, timeout: [])
for url in sys.argv[1:]:
    origin = Origin.parse(url)
    try:
        sync.get(origin, request_bytes(origin, "/process/1", {}), time.monotonic() + 3, cap)
        outcomes.append("answered")
    except Exception as exc:
        outcomes.append(type(exc).__name__)

async def fan_out():
    client = AsyncClient(Resolver())
    for url in sys.argv[1:]:
        origin = Origin.parse(url)
        try:
            async with asyncio.timeout(3):
                await client.get(origin, request_bytes(origin, "/process/1", {}), cap)
            outcomes.append("answered")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    client.close()
    await asyncio.sleep(0)

asyncio.run(fan_out())
print(json.dumps({"outcomes": outcomes, "growth_kib": hwm_kib() - before}))
"""


def test_compressed_answers_cost_no_memory(hostile_exporter) -> None:
    urls = [hostile_exporter.url(m) for m in ("gzip-chunked", "gzip-close", "gzip-small")]
    done = subprocess.run([sys.executable, "-c", GZIP_PEAK, *urls], capture_output=True,
                          text=True, timeout=60, check=True)
    measured = json.loads(done.stdout)
    assert measured["outcomes"] == ["BodyError"] * 6
    assert measured["growth_kib"] < 32 * 1024, measured  # each bomb inflates to gigabytes


# -- the pool and the resolver: bounded, swept, negative answers remembered ---------------

def test_the_pool_bounds_per_origin_and_in_total() -> None:
    pairs = [socket.socketpair() for _ in range(4)]
    pool: Pool[socket.socket] = Pool(socket.socket.close, lambda s: s.fileno() >= 0,
                                     per_origin=2, total=3)
    a, b, c = (Origin.parse(f"http://127.0.0.1:{port}") for port in (1, 2, 3))
    try:
        assert [pool.put(a, pairs[i][0]) for i in range(3)] == [True, True, False]
        assert pairs[2][0].fileno() == -1  # past the bound: closed, not kept
        assert pool.put(b, pairs[3][0]) and len(pool) == 3
        spare = socket.socketpair()
        assert not pool.put(c, spare[0]) and len(pool) == 3
        assert pool.take(a) is pairs[1][0] and len(pool) == 2
    finally:
        pool.close()
        for one, other in [*pairs, spare]:
            one.close()
            other.close()


def test_the_pool_discards_a_socket_readable_while_idle() -> None:
    mine, theirs = socket.socketpair()
    client = sync_client()
    origin = Origin.parse("http://127.0.0.1:1")
    try:
        client.pool.put(origin, mine)
        theirs.sendall(b"HTTP/1.1 200 OK\r\n")  # unasked bytes
        assert client.pool.take(origin) is None
        assert mine.fileno() == -1
    finally:
        client.close()
        theirs.close()


def test_sync_idle_connections_are_swept_on_a_timer(hostile_exporter) -> None:
    client = sync_client(idle_seconds=0.2)
    try:
        sync_get(client, hostile_exporter.url("ok"), 3)
        assert len(client.pool) == 1
        wait_until(lambda: len(client.pool) == 0, timeout=10, what="the sweep")
    finally:
        client.close()


def test_async_idle_connections_are_swept_on_a_timer(hostile_exporter) -> None:
    async def main() -> list[int]:
        client = AsyncClient(Resolver(), idle_seconds=0.2)
        try:
            await async_get(client, hostile_exporter.url("ok"), 3)
            sizes = [len(client.pool)]
            for _ in range(100):  # bounded: 10 s
                await asyncio.sleep(0.1)
                if not len(client.pool):
                    break
            return [*sizes, len(client.pool)]
        finally:
            client.close()
            await asyncio.sleep(0)

    assert asyncio.run(main()) == [1, 0]


def test_a_failed_lookup_is_remembered_briefly_and_bounded() -> None:
    resolver = Resolver(max_failed=3, negative_ttl=0.3)

    async def resolve(host: str) -> None:
        await resolver.resolve(host, 80)

    with pytest.raises(ResolveError):
        asyncio.run(resolve("no-such-exporter.invalid"))
    with pytest.raises(ResolveError, match="moments ago"):
        resolver.cached("no-such-exporter.invalid", 80)  # no new lookup

    def forgotten() -> bool:
        try:
            return resolver.cached("no-such-exporter.invalid", 80) is None
        except ResolveError:
            return False

    wait_until(forgotten, timeout=5, what="the negative entry to expire")
    for i in range(5):
        with pytest.raises(ResolveError):
            asyncio.run(resolve(f"no-such-exporter-{i}.invalid"))
    assert len(resolver) == 3
    with pytest.raises(ResolveError):  # the newest are the ones kept
        resolver.cached("no-such-exporter-4.invalid", 80)


def test_the_name_cache_is_bounded() -> None:
    resolver = Resolver(max_names=3)
    for port in range(1, 6):
        asyncio.run(resolver.resolve("localhost", port))
    assert len(resolver) == 3
    assert resolver.cached("localhost", 5) is not None
    assert resolver.cached("localhost", 1) is None
