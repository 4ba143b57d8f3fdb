"""A hostile exporter for tests: one asyncio server whose misbehaviour is chosen by the URL.

The FIRST path segment names the mode, so an exporter configured with the base URL
`http://127.0.0.1:P/hang` receives `/hang/process/123` and hangs; what follows the mode
(`/badstatus/2000/process/1`: the variant `2000`, then the exporter path) is the handler's to
read. Every mode is one function in `MODES`; add one with `@mode("name")`:

    @mode("teapot")
    async def teapot(conn: Conn) -> bool:
        await conn.send(b"HTTP/1.1 418 I'm a teapot\\r\\nContent-Length: 0\\r\\n\\r\\n")
        return True          # True: the connection may carry another request

Run it in the test process (`with HostileExporter() as hostile: hostile.url("hang")`, or the
`hostile_exporter` fixture), or as a separate process for services under test:
`python tests/hostile_exporter.py [--port N] [--lifetime S]` prints `PORT <n>` when ready.
Either way its lifetime is bounded (`lifetime`, default 120 s): every connection, hung or
dripping, is closed when it ends or when the server is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

MAX_REQUEST_HEAD = 64 * 1024
GZIP_BLOCK = 1024 * 1024  # bytes of zeros per compressed block: ~1 KiB on the wire
GZIP_LIMIT = 8 * 1024 ** 3  # decoded bytes one gzip answer may promise before it stops


@dataclass
class Conn:
    """One request on a connection: the mode's arguments, the exporter path, and the writer."""

    mode: str
    args: list[str]  # path segments after the mode (the exporter path is in them too)
    query: str
    headers: dict[str, str]
    writer: asyncio.StreamWriter
    stopping: asyncio.Event
    stats: Stats

    @property
    def path(self) -> str:
        """The request path below the mode, as the exporter would see it (/process/1)."""
        return "/" + "/".join(self.args)

    def arg(self, default: str) -> str:
        """The variant right after the mode (`/drip/50/process/1` -> "50"), else `default`."""
        return self.args[0] if self.args and self.args[0] not in ("process", "healthz") \
            else default

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def hold(self) -> None:
        """Wait until the server stops: a connection that is never answered."""
        await self.stopping.wait()


@dataclass
class Stats:
    """What the server saw, for tests that check reuse: connections and requests per mode."""

    connections: int = 0
    requests: dict[str, int] = field(default_factory=dict)


Handler = Callable[[Conn], Awaitable[bool]]
MODES: dict[str, Handler] = {}


def mode(name: str) -> Callable[[Handler], Handler]:
    """Register a misbehaviour under the first path segment `name`."""

    def register(handler: Handler) -> Handler:
        MODES[name] = handler
        return handler

    return register


# -- the answers a genuine exporter would give --------------------------------------------

def genuine_body(path: str, name: str = "genuine") -> bytes:
    """What a well-behaved exporter answers for `path`: the process asked for, or a list."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[-2] == "process" and parts[-1].isdigit():
        return json.dumps({"pid": int(parts[-1]), "name": name}).encode()
    if parts and parts[-1] == "process":
        return json.dumps({"processes": [{"pid": 1, "name": name}]}).encode()
    return json.dumps({"status": "ok"}).encode()


def answer(body: bytes, status: str = "200 OK", *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- the modes ------------------------------------------------------------------------------

@mode("ok")
async def ok(conn: Conn) -> bool:
    """A well-behaved exporter (the baseline beside the hostile ones)."""
    await conn.send(answer(genuine_body(conn.path)))
    return True


@mode("hang")
async def hang(conn: Conn) -> bool:
    """Accepts and reads the request, never answers."""
    await conn.hold()
    return False


@mode("drip")
async def drip(conn: Conn) -> bool:
    """A genuine answer, one byte every N ms (`/drip/<ms>`, default 100)."""
    delay = int(conn.arg("100")) / 1000
    for byte in answer(genuine_body(conn.path)):
        await conn.send(bytes([byte]))
        await asyncio.sleep(delay)
    return True


@mode("garbage")
async def garbage(conn: Conn) -> bool:
    """Bytes that are not HTTP, then close."""
    await conn.send(b"\x00\xffSSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n" * 4)
    return False


@mode("nested")
async def nested(conn: Conn) -> bool:
    """A 200 whose JSON body is `[` x 5,000: deep enough to overflow a recursive decoder."""
    await conn.send(answer(b"[" * 5000))
    return True


@mode("nested-closed")
async def nested_closed(conn: Conn) -> bool:
    """Valid JSON nested 5,000 deep (`[` x 5,000 then `]` x 5,000, 10 KB)."""
    await conn.send(answer(b"[" * 5000 + b"]" * 5000))
    return True


def _gzip_stream() -> Iterator[bytes]:
    """A gzip stream of zeros, ~1,000:1, promising up to GZIP_LIMIT decoded bytes.

    Once the window holds only zeros every further block compresses to the same bytes, so
    the block is compressed once and repeated: the bomb costs the server no CPU.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(GZIP_BLOCK)
    yield compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    for _ in range(GZIP_LIMIT // GZIP_BLOCK - 1):
        yield block


@mode("gzip-chunked")
async def gzip_chunked(conn: Conn) -> bool:
    """Content-Encoding: gzip, chunked: a decompression bomb that goes on for gigabytes."""
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
    for block in _gzip_stream():
        if block:
            await conn.send(b"%x\r\n%s\r\n" % (len(block), block))
    await conn.send(b"0\r\n\r\n")
    return False


@mode("gzip-close")
async def gzip_close(conn: Conn) -> bool:
    """Content-Encoding: gzip with no length: the body runs to the close, for gigabytes."""
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Encoding: gzip\r\nConnection: close\r\n\r\n")
    for block in _gzip_stream():
        await conn.send(block)
    return False


@mode("gzip-small")
async def gzip_small(conn: Conn) -> bool:
    """A small, honest gzip answer (an encoding the client never asked for)."""
    body = zlib.compress(genuine_body(conn.path), wbits=31)
    await conn.send(answer(body, "200 OK", "Content-Encoding: gzip"))
    return True


def _injected(conn: Conn) -> bytes:
    return answer(genuine_body(conn.path, name="injected"))


@mode("desync")
async def desync(conn: Conn) -> bool:
    """A complete answer, then (a moment later, while the connection idles) a second full
    response that a careless pool serves as the next request's answer."""
    await conn.send(answer(genuine_body(conn.path)))
    await asyncio.sleep(0.05)
    await conn.send(_injected(conn))
    return True


@mode("desync-same")
async def desync_same(conn: Conn) -> bool:
    """A complete answer and an injected second response in the same write."""
    await conn.send(answer(genuine_body(conn.path)) + _injected(conn))
    return True


def _bad_heads(body: bytes) -> dict[str, bytes]:
    n = len(body)
    return {
        "2000": b"HTTP/1.1 2000 OK\r\nContent-Length: %d\r\n\r\n" % n,
        "20": b"HTTP/1.1 20 OK\r\nContent-Length: %d\r\n\r\n" % n,
        "nospace": b"HTTP/1.1 200\r\nContent-Length: %d\r\n\r\n" % n,  # valid: empty reason
        "version": b"HTTP/2.0 200 OK\r\nContent-Length: %d\r\n\r\n" % n,
        # The length hides in a continuation line of another header.
        "obsfold": b"HTTP/1.1 200 OK\r\nX-Note: a\r\n Content-Length: %d\r\n\r\n" % n,
        "spacecolon": b"HTTP/1.1 200 OK\r\nContent-Length : %d\r\n\r\n" % n,
        "te-cl": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Length: %d\r\n\r\n" % n),
        "http10-chunked": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        "barecr": b"HTTP/1.1 200 OK\r\nX-Note: a\rb\r\nContent-Length: %d\r\n\r\n" % n,
        "nul": b"HTTP/1.1 200 OK\r\nX-Note: a\x00b\r\nContent-Length: %d\r\n\r\n" % n,
        "304": b"HTTP/1.1 304 Not Modified\r\nLocation: http://elsewhere/\r\n\r\n",
    }


@mode("badstatus")
async def badstatus(conn: Conn) -> bool:
    """An answer whose head breaks HTTP/1.1 in the way `/badstatus/<variant>` names.

    The body is genuine, so a lenient parser "succeeds"; the connection is kept open so a
    parser that keeps it alive when it should not is caught by the connection count.
    """
    body = genuine_body(conn.path)
    heads = _bad_heads(body)
    variant = conn.arg("2000")
    head = heads.get(variant)
    if head is None:
        await conn.send(answer(b'{"error": "unknown variant"}', "404 Not Found"))
        return True
    if variant in ("te-cl", "http10-chunked"):
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif variant == "304":
        body = b""
    await conn.send(head + body)
    return True


@mode("slowhead")
async def slowhead(conn: Conn) -> bool:
    """A genuine answer whose head (`/slowhead/<bytes>`, default 60,000) comes a byte a time."""
    size = int(conn.arg("60000"))
    body = genuine_body(conn.path)
    start = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    pads: list[bytes] = []
    room = size - len(start) - 2
    while room > 0:
        line = b"X-Pad: " + b"a" * max(0, min(1000, room - 9)) + b"\r\n"
        pads.append(line)
        room -= len(line)
    for byte in start + b"".join(pads) + b"\r\n":
        await conn.send(bytes([byte]))
    await conn.send(body)
    return True


_BIGLIST: bytes | None = None


@mode("biglist")
async def biglist(conn: Conn) -> bool:
    """A 16 MiB list answer of tiny process objects."""
    global _BIGLIST
    if _BIGLIST is None:
        item = b'{"pid":1},'
        count = (16 * 1024 * 1024 - 20) // len(item)
        _BIGLIST = b'{"processes":[' + item * (count - 1) + b'{"pid":1}]}'
    await conn.send(answer(_BIGLIST))
    return True


# -- the server -----------------------------------------------------------------------------

async def _guarded(handler: Handler, conn: Conn) -> bool:
    # The client hanging up mid-answer is what hostile answers are for: not an error here.
    try:
        return await handler(conn)
    except OSError:
        return False

class HostileExporter:
    """The server on 127.0.0.1 in a background thread, for at most `lifetime` seconds."""

    def __init__(self, port: int = 0, lifetime: float = 120.0) -> None:
        self.port = port
        self.lifetime = lifetime
        self.stats = Stats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hostile",
                                        daemon=True)
        self._ready = threading.Event()
        self._stopping: asyncio.Event
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    def url(self, name: str, *variant: str) -> str:
        """The base URL of an exporter that misbehaves as `name` (with `variant`s)."""
        return "/".join([f"http://127.0.0.1:{self.port}", name, *variant])

    def start(self) -> HostileExporter:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> HostileExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _open(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop.call_later(self.lifetime, self._stopping.set)

    async def _close(self) -> None:
        self._stopping.set()  # every connection's task ends on its own, closing its socket
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0.05)  # connections accepted a moment ago start their tasks
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        for _ in range(3):  # let the transports run their close callbacks before the loop ends
            await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                head = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
                await asyncio.wait([head, stop], return_when=asyncio.FIRST_COMPLETED)
                if not head.done():
                    head.cancel()
                    break
                try:
                    conn = self._request(head.result(), writer)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                    break
                handler = MODES.get(conn.mode)
                self.stats.requests[conn.mode] = self.stats.requests.get(conn.mode, 0) + 1
                if handler is None:
                    await conn.send(answer(b'{"error": "no such hostile mode"}',
                                           "404 Not Found"))
                    if conn.headers.get("connection") == "close":
                        break
                    continue
                work = asyncio.ensure_future(_guarded(handler, conn))
                await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    work.cancel()
                    await asyncio.wait([work], timeout=1)
                    break
                if not work.result() or conn.headers.get("connection") == "close":
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            stop.cancel()
            writer.close()
            self._tasks.discard(task)

    def _request(self, raw: bytes, writer: asyncio.StreamWriter) -> Conn:
        lines = raw.decode("latin-1").split("\r\n")
        _method, target, _version = lines[0].split(" ", 2)
        path, _, query = target.partition("?")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        segments = [s for s in path.split("/") if s]
        if not segments:
            segments = [""]
        return Conn(segments[0], segments[1:], query, headers, writer, self._stopping,
                    self.stats)


@pytest.fixture
def hostile_exporter() -> Iterator[HostileExporter]:
    """The hostile exporter in a background thread, stopped (every connection closed) after."""
    with HostileExporter(lifetime=120.0) as server:
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=120.0)
    options = parser.parse_args()
    server = HostileExporter(options.port, options.lifetime).start()
    print(f"PORT {server.port}", flush=True)
    try:
        server._thread.join(timeout=options.lifetime + 5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
