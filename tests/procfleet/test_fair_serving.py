"""A flood of requests for one target cannot keep the others waiting (issue 8: 64 clients on a
hung exporter, and /healthz and healthy hosts answered meanwhile): the workers take waiting
connections round-robin by what they ask for (`FairQueue`), and a connection whose answer
cost next to nothing can be read again only after a pause (`pause_reading`). And a client that
reads nothing of a streamed answer cannot hold a worker for ever."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from procfleet import waitress_adapter
from procfleet.testing import wait_until
from procfleet.waitress_adapter import FairQueue, WaitressServer, pause_reading


def _channel(path: str | None) -> Any:
    return SimpleNamespace(requests=[SimpleNamespace(path=path)] if path else [])


def test_the_queue_takes_flows_in_turn_and_each_flow_in_order() -> None:
    queue = FairQueue()
    flood = [_channel("/node/hung/process/1") for _ in range(4)]
    health, other, bare = _channel("/healthz"), _channel("/node/web-01/process/7"), _channel(None)
    for channel in (*flood, health, other, bare):
        queue.append(channel)
    assert len(queue) == 7
    taken = [queue.popleft() for _ in range(7)]
    assert taken == [flood[0], health, other, bare, flood[1], flood[2], flood[3]]
    assert len(queue) == 0 and not queue


@contextmanager
def _serving(app: Callable[..., Any], threads: int, **settings: Any
             ) -> Iterator[WaitressServer]:
    server = WaitressServer(app, "127.0.0.1", 0, head_timeout=10, threads=threads, **settings)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.poll(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def _send(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return sock


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while not (b"\r\n\r\n" in data and data.endswith(b"ok")):
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data


def test_a_flood_for_one_target_does_not_queue_the_others_behind_it() -> None:
    gate = threading.Event()
    served: list[str] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/flood/x":
            gate.wait(10)
        served.append(f"{environ['PATH_INFO']}?{environ['QUERY_STRING']}")
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    with _serving(app, threads=1) as server:
        port = server.bound[1]
        first = _send(port, "/flood/x?n=1")  # holds the one worker until the gate opens
        wait_until(lambda: server.busy() and len(server._server.task_dispatcher.queue) == 0)
        socks = [_send(port, f"/flood/x?n={n}") for n in (2, 3, 4)]
        wait_until(lambda: len(server._server.task_dispatcher.queue) == 3)
        socks.append(_send(port, "/healthz?n=5"))
        wait_until(lambda: len(server._server.task_dispatcher.queue) == 4)
        gate.set()
        for sock in (first, *socks):
            _answer(sock)
            sock.close()
    # First come first served would put /healthz last, behind the whole flood.
    assert served == ["/flood/x?n=1", "/flood/x?n=2", "/healthz?n=5", "/flood/x?n=3",
                      "/flood/x?n=4"]


def test_a_paused_connection_is_read_again_only_after_the_pause() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/cheap":
            pause_reading(2.0)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    with _serving(app, threads=2, pausable=True) as server:
        port = server.bound[1]
        paused = _send(port, "/cheap")
        _answer(paused)
        paused.sendall(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        paused.settimeout(0.5)
        try:
            early = paused.recv(4096)
        except TimeoutError:
            early = b""
        assert early == b"", "the next request was read during the pause"
        # Other connections are served meanwhile.
        other = _send(port, "/next")
        _answer(other)
        other.close()
        paused.settimeout(10)
        _answer(paused)  # once the pause is over
        paused.close()


def test_a_client_that_reads_nothing_of_a_stream_frees_its_worker(monkeypatch) -> None:
    """waitress makes a worker writing a stream wait, with no timeout, while more than the high
    watermark is unsent. With one worker, a client that asks for a stream and never reads
    would keep every other request waiting for ever; now its connection is closed once it has
    taken nothing for WRITE_STALL_TIMEOUT, and the next request is served."""
    monkeypatch.setattr(waitress_adapter, "WRITE_STALL_TIMEOUT", 1.0)
    chunk = b"x" * 65536
    finished = threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        if environ["PATH_INFO"] == "/stream":
            start_response("200 OK", [("Content-Type", "application/x-ndjson")])
            return _stream(chunk, 512, finished)  # 32 MiB
        start_response("200 OK", [("Content-Length", "2")])
        return iter([b"ok"])

    with _serving(app, threads=1, outbuf_high_watermark=256 * 1024) as server:
        port = server.bound[1]
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", port))
        reader.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")  # and never read
        wait_until(lambda: server.busy() and len(server._server.task_dispatcher.queue) == 0)
        other = _send(port, "/quick")
        other.settimeout(15)
        _answer(other)  # served by the one worker once it was freed
        other.close()
        assert finished.wait(10), "the stream's iterator was not closed"
        # And the connection itself is gone, though its client still reads nothing.
        wait_until(lambda: server.connections() == 0, timeout=15)
        reader.close()


def _stream(chunk: bytes, count: int, finished: threading.Event) -> Iterator[bytes]:
    try:
        for _ in range(count):
            yield chunk
    finally:
        finished.set()
